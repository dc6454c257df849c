"""Who may call the HTTP API, and what they may do.

Callers prove who they are with a bearer token or, when the HTTP API serves
TLS with client certificates enabled, with a certificate of the cluster CA
naming a client (``spiffe://<cluster>/client/<name>``). Each has a scope:

* ``read``: list workers, job status and output;
* ``run``: also start, stop and fan out jobs.

The tokens file holds one token per line, ``sha256:<hex> <name> [<scope>]``
(comments start with ``#``; the scope defaults to ``read``), made with
``jobgate-scheduler hash-token``. Only hashes are stored, so reading the file
does not reveal a token. The file is re-read as soon as it changes: a token
removed from it stops working at once, also for output streams already open.
A file that is missing, unreadable or has a mistake in it fails closed: no
token is valid until it is fixed (the error is logged and ``/readyz`` names
it), since the edit that broke it may have been meant to revoke a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from jobgate import identity
from jobgate.errors import (
    INVALID_TOKEN_CHALLENGE,
    PermissionDenied,
    Unauthenticated,
)
from jobgate.tokens import PREFIX as TOKEN_PREFIX
from jobgate.tokens import hash_token

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
READ, RUN = "read", "run"
SCOPES = (READ, RUN)
_RANK = {READ: 0, RUN: 1}


class TokenFileError(Exception):
    pass


@dataclass(frozen=True)
class Principal:
    name: str
    scope: str
    via: str  # "token" or "certificate"
    digest: str = ""

    def __str__(self) -> str:
        return f"{self.via} {self.name}"


def parse_tokens(path: Path, text: str) -> dict[str, tuple[str, str]]:
    """Map of token hash to (name, scope) from the text of a tokens file."""
    tokens: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        digest, *rest = line.split()
        hexpart = digest.removeprefix(TOKEN_PREFIX)
        if (
            not digest.startswith(TOKEN_PREFIX)
            or len(hexpart) != 64
            or not all(c in "0123456789abcdef" for c in hexpart)
        ):
            raise TokenFileError(
                f"{path}:{n}: expected 'sha256:<64 hex digits> <name> [read|run]'; "
                "make lines with 'jobgate-scheduler hash-token'"
            )
        if len(rest) > 2:
            raise TokenFileError(f"{path}:{n}: expected at most a name and a scope")
        name = rest[0] if rest else f"line {n}"
        scope = rest[1] if len(rest) > 1 else READ
        if scope not in SCOPES:
            raise TokenFileError(
                f"{path}:{n}: scope {scope!r} is not one of {', '.join(SCOPES)}"
            )
        tokens[digest] = (name, scope)
    return tokens


def load_tokens(path: Path) -> dict[str, tuple[str, str]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TokenFileError(
            f"{path}: cannot read the tokens file: {exc.strerror}"
        ) from None
    tokens = parse_tokens(path, text)
    if not tokens:
        log.warning("%s holds no tokens: every token will be refused", path)
    return tokens


class TokenFile:
    """The tokens file, re-read whenever it changes on disk."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._content = b""
        self._tokens: dict[str, tuple[str, str]] = {}
        self.problem: str | None = None
        self.current()
        if self.problem is not None:
            raise TokenFileError(self.problem)

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self) -> dict[str, tuple[str, str]]:
        """The tokens in force, re-reading the file if it changed."""
        sig = self._stat()
        if sig is None:
            self._fail(f"{self.path}: the tokens file is missing or cannot be read")
            return self._tokens
        # A rewrite of the same size within one timestamp tick keeps the
        # signature, so while the file is that fresh its contents decide.
        fresh = time.time_ns() - sig[1] < 2_000_000_000
        if sig == self._signature and not fresh:
            return self._tokens
        with self._lock:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                self._fail(f"{self.path}: cannot read the tokens file: {exc.strerror}")
                return self._tokens
            digest = hashlib.sha256(data).digest()
            if digest != self._content or self.problem:
                try:
                    tokens = parse_tokens(self.path, data.decode("utf-8", "replace"))
                except TokenFileError as exc:
                    self._fail(str(exc))
                else:
                    if self._signature is not None:
                        log.info(
                            "tokens file %s reloaded: %d tokens", self.path, len(tokens)
                        )
                    self._tokens = tokens
                    self.problem = None
                self._content = digest
            self._signature = sig
        return self._tokens

    def _fail(self, problem: str) -> None:
        """No token is valid until the file is right again."""
        if problem != self.problem:
            log.error("%s; no token is valid until it is fixed", problem)
        self.problem = problem
        self._tokens = {}
        self._signature = None

    def lookup(self, token: str) -> Principal | None:
        digest = hash_token(token)
        found = None
        for known, (name, scope) in self.current().items():
            if hmac.compare_digest(known, digest):
                found = Principal(name, scope, "token", digest)
        return found


def _peer_client(req, cluster: str) -> str | None:
    """The client name in a verified TLS client certificate, if any."""
    cert = req.scope.get("jobgate.peercert") or {}
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "URI":
            ident = identity.parse_uri(value)
            if ident and ident.cluster == cluster and ident.role == identity.CLIENT:
                return ident.name
    return None


class Auth:
    """Falcon middleware: authenticate every request, then check its scope.

    Resources declare the scope each method needs in ``scopes``
    (``{"GET": "read", "POST": "run"}``); a method not declared needs ``run``.
    """

    def __init__(
        self,
        tokens: TokenFile,
        cluster: str = "",
        client_scopes: dict[str, str] | None = None,
        open_paths: frozenset[str] = OPEN_PATHS,
        open_prefix: str | None = None,
    ):
        """``open_paths`` (and paths under ``open_prefix``) need no token."""
        self.tokens = tokens
        self.cluster = cluster
        self.client_scopes = client_scopes
        self.open_paths = open_paths
        self.open_prefix = open_prefix

    def authenticate(self, req) -> Principal:
        if self.client_scopes is not None:
            name = _peer_client(req, self.cluster)
            if name is not None:
                if name not in self.client_scopes:
                    raise PermissionDenied(
                        f"client certificate {name!r} is not listed "
                        "in [http.tls].client_scopes"
                    )
                return Principal(name, self.client_scopes[name], "certificate")
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("send 'Authorization: Bearer <token>'")
        principal = self.tokens.lookup(token.strip())
        if principal is None:
            raise Unauthenticated(
                "the bearer token is not valid", challenge=INVALID_TOKEN_CHALLENGE
            )
        return principal

    async def process_request(self, req, resp) -> None:
        path = req.path
        if path in self.open_paths or (
            self.open_prefix is not None and path.startswith(self.open_prefix)
        ):
            return
        req.context.principal = self.authenticate(req)

    async def process_resource(self, req, resp, resource, params) -> None:
        principal = getattr(req.context, "principal", None)
        if principal is None:
            return
        needed = getattr(resource, "scopes", {}).get(req.method, RUN)
        if _RANK[principal.scope] < _RANK[needed]:
            raise PermissionDenied(
                f"{principal} has scope {principal.scope}; "
                f"{req.method} {req.path} needs scope {needed}"
            )

    def still_valid(self, principal: Principal) -> bool:
        """False once the token behind ``principal`` was removed or narrowed."""
        if principal.via != "token":
            return True
        entry = self.tokens.current().get(principal.digest)
        return entry is not None and _RANK[entry[1]] >= _RANK[principal.scope]
