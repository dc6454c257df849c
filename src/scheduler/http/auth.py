"""Bearer-token authentication of HTTP requests.

The tokens file holds one token hash per line, ``sha256:<hex> <name>``
(comments start with ``#``); ``jobgate-scheduler hash-token`` makes the lines.
Only hashes are stored, so reading the file does not reveal a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from pathlib import Path

import falcon

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class TokenFileError(Exception):
    pass


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: Path) -> dict[str, str]:
    """Map of token hash to token name, from ``path``."""
    tokens: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise TokenFileError(
            f"{path}: cannot read the tokens file: {exc.strerror}"
        ) from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        digest, _, name = line.partition(" ")
        hexpart = digest.removeprefix("sha256:")
        if (
            not digest.startswith("sha256:")
            or len(hexpart) != 64
            or not all(c in "0123456789abcdef" for c in hexpart)
        ):
            raise TokenFileError(
                f"{path}:{n}: expected 'sha256:<64 hex digits> <name>'; "
                "make lines with 'jobgate-scheduler hash-token'"
            )
        tokens[digest] = name.strip() or f"line {n}"
    if not tokens:
        log.warning("%s holds no tokens: every API request will be refused", path)
    return tokens


class TokenAuth:
    """Falcon middleware: 401 unless the request carries a known bearer token."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.path in OPEN_PATHS:
            return
        header = req.get_header("Authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise falcon.HTTPUnauthorized(
                title="Unauthorized",
                description="send 'Authorization: Bearer <token>'",
                challenges=['Bearer realm="jobgate"'],
            )
        digest = hash_token(token.strip())
        name = None
        for known, who in self.tokens.items():
            if hmac.compare_digest(known, digest):
                name = who
        if name is None:
            raise falcon.HTTPUnauthorized(
                title="Unauthorized",
                description="the bearer token is not valid",
                challenges=['Bearer realm="jobgate" error="invalid_token"'],
            )
        req.context.token_name = name
