"""A small client of the scheduler's HTTP API, on the standard library only.

    client = Client("http://127.0.0.1:8080", token)
    job = client.start_job("worker-1", "count.sh", ["3"], wait=True)
    for chunk in client.output("worker-1", job["job_id"], follow=True):
        sys.stdout.buffer.write(chunk)

Errors the API answers with become :class:`ApiError` (status, title and the
API's description); a scheduler that cannot be reached, or a stream that ends
early, becomes :class:`ConnectionFailed`.

The errors are defined in :mod:`jobgate.client.errors`.
:func:`~jobgate.client.settings.resolve_settings`, in
:mod:`jobgate.client.settings`, finds the URL, token and TLS files the way the
``jobgate`` command does: flags, then the environment, then a TOML file.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from jobgate.client.errors import (
    ApiError,
    ConnectionFailed,
    SettingsError,
    StreamBroken,
    api_error,
)

DEFAULT_TIMEOUT_S = 30.0
# The idempotency keys the client makes for starts it may have to repeat.
OWN_KEY_PREFIX = "jobgate-client-"
CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 65536

# The title of a 503 from a scheduler that cannot serve now (its state
# database does not answer it) while another may: jobgate.errors'
# SchedulerUnavailable (this module does without gRPC; a test ties the two).
SCHEDULER_UNAVAILABLE = "Scheduler unavailable"


# -- the client -----------------------------------------------------------------


def _segment(value: str) -> str:
    return quote(value, safe="")


@dataclass(frozen=True)
class Endpoint:
    """One scheduler's URL, taken apart."""

    url: str
    scheme: str
    host: str
    port: int | None
    prefix: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(
                f"url: {url!r} is not an http:// or https:// URL "
                "(e.g. http://127.0.0.1:8080)"
            )
        try:
            port = parts.port
        except ValueError:
            raise SettingsError(f"url: {url!r} has an invalid port") from None
        return cls(
            url.rstrip("/"), parts.scheme, parts.hostname, port, parts.path.rstrip("/")
        )


def split_urls(url: str) -> list[str]:
    """The URLs of ``url``: one, or several separated by commas."""
    urls = [u.strip() for u in url.split(",")]
    if not all(urls):
        raise SettingsError(f"url: {url!r} has an empty URL between its commas")
    return urls


class Client:
    """The scheduler's HTTP API; one connection per request.

    ``token`` may be None when ``cert_file`` is a client certificate that the
    scheduler accepts instead.

    ``url`` may name several schedulers (on one database), separated by
    commas. Requests go to one; when it cannot be reached, to the next. A
    request that broke after it was sent is repeated on the next scheduler
    only if repeating it is safe: reads, stops and drains, and starts that
    carry an idempotency key (with several schedulers, :meth:`start_job` and
    :meth:`fanout` add one of their own when the caller gave none, so that
    the retry cannot start the job twice).

    ``timeout`` bounds each ordinary request. Requests that wait for jobs
    (``wait=True``, following output) have no read timeout: the scheduler
    bounds them (``[workers].max_wait_s``, ``[workers].stream_timeout_s``).
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ):
        self.endpoints = [Endpoint.parse(u) for u in split_urls(url)]
        if len({e.scheme for e in self.endpoints}) > 1:
            raise SettingsError(f"url: {url!r} mixes http:// and https:// URLs")
        self._current = 0
        self.token = token
        self.timeout = timeout
        self.ssl_context: ssl.SSLContext | None = None
        self.has_client_cert = bool(cert_file)
        if self.scheme == "https":
            self.ssl_context = make_ssl_context(ca_file, cert_file, key_file)
        elif cert_file or key_file:
            raise SettingsError("cert_file and key_file need an https:// URL")

    # -- plumbing -----------------------------------------------------------------

    @property
    def endpoint(self) -> Endpoint:
        """The scheduler requests go to now."""
        return self.endpoints[self._current]

    @property
    def url(self) -> str:
        return self.endpoint.url

    @property
    def scheme(self) -> str:
        return self.endpoint.scheme

    @property
    def host(self) -> str:
        return self.endpoint.host

    @property
    def port(self) -> int | None:
        return self.endpoint.port

    @property
    def prefix(self) -> str:
        return self.endpoint.prefix

    def fail_over(self) -> bool:
        """Move on to the next scheduler; False if there is only one."""
        if len(self.endpoints) == 1:
            return False
        self._current = (self._current + 1) % len(self.endpoints)
        return True

    def _connect(self, read_timeout: float | None) -> http.client.HTTPConnection:
        timeout = min(CONNECT_TIMEOUT_S, self.timeout)
        if self.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=timeout, context=self.ssl_context
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.connect()
        except (OSError, ssl.SSLError) as exc:
            conn.close()
            raise ConnectionFailed(self._describe(exc)) from None
        assert conn.sock is not None
        conn.sock.settimeout(read_timeout)
        return conn

    def _describe(self, exc: BaseException) -> str:
        where = f"{self.url}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"cannot verify the certificate of {where}: {exc.verify_message}; "
                "give the CA that signed it with --ca-file"
            )
        if isinstance(exc, ssl.SSLError):
            text = f"TLS with {where} failed: {exc.reason or exc}"
            if not self.has_client_cert:
                text += (
                    "; if the scheduler requires a client certificate, give "
                    "--cert-file and --key-file"
                )
            return text
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve {self.host!r}: {exc.strerror}"
        if isinstance(exc, TimeoutError | socket.timeout):
            return f"no answer from {where} in time"
        if isinstance(exc, http.client.HTTPException):
            return f"bad answer from {where}: {exc!r}"
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"cannot reach the scheduler at {where}: {text}"

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        long: bool = False,
        idempotent: bool = False,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request; return the connection and the response (2xx only).

        ``long`` requests (waits, streams) have no read timeout. With several
        schedulers, one that cannot be reached is passed over for the next;
        a request that broke once sent, or that a scheduler answered 503
        :data:`SCHEDULER_UNAVAILABLE` (cut off from the database), is sent
        again to the next only if it is a GET or ``idempotent``.
        """
        failures: list[str] = []
        for attempt in range(len(self.endpoints)):
            try:
                return self._open_once(method, path, body, query, headers, long)
            except ApiError as exc:
                # A scheduler cut off from the database: another may serve.
                # It may have done part of the request (started the job but
                # not indexed it), so the rules of a broken request apply.
                repeatable = method == "GET" or idempotent
                where = self.url
                if (
                    exc.status != 503
                    or exc.title != SCHEDULER_UNAVAILABLE
                    or not repeatable
                    or attempt == len(self.endpoints) - 1
                    or not self.fail_over()
                ):
                    raise
                failures.append(f"{where}: {exc}")
            except ConnectionFailed as exc:
                repeatable = not exc.sent or method == "GET" or idempotent
                if not repeatable or not self.fail_over():
                    if failures:
                        raise ConnectionFailed(
                            "; ".join([*failures, str(exc)]), exc.sent
                        ) from None
                    raise
                failures.append(str(exc))
        raise ConnectionFailed("no scheduler answered: " + "; ".join(failures))

    def _open_once(
        self,
        method: str,
        path: str,
        body: Any,
        query: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        long: bool,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        target = self.prefix + path
        if query:
            target += "?" + urlencode(
                {
                    k: ("true" if v is True else "false" if v is False else v)
                    for k, v in query.items()
                }
            )
        hdrs = {"Accept": "application/json"}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        conn = self._connect(None if long else self.timeout)
        try:
            conn.request(method, target, body=data, headers=hdrs)
            resp = conn.getresponse()
            if resp.status >= 400:
                raise api_error(resp.status, resp.reason, resp.headers, resp.read())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectionFailed(self._describe(exc), sent=True) from None
        except BaseException:
            conn.close()
            raise
        return conn, resp

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        long: bool = False,
        idempotent: bool = False,
    ) -> tuple[int, Any]:
        """One JSON request; returns (status, decoded body). Raises ApiError.

        ``idempotent``: sending it twice does what sending it once does (see
        :meth:`_open`).
        """
        for attempt in range(len(self.endpoints)):
            conn, resp = self._open(
                method, path, body, query, long=long, idempotent=idempotent
            )
            try:
                raw = resp.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                # The answer broke after its headers (the scheduler died
                # meanwhile): the next may answer it if it is safe to repeat.
                broken = ConnectionFailed(self._describe(exc), sent=True)
                if (
                    not (method == "GET" or idempotent)
                    or attempt == len(self.endpoints) - 1
                    or not self.fail_over()
                ):
                    raise broken from None
            finally:
                conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            raise ConnectionFailed(
                f"the answer from {self.url}{path} is not JSON; is {self.url} "
                "a jobgate scheduler?"
            ) from None

    # -- the API --------------------------------------------------------------------

    def workers(self) -> list[dict]:
        return self.request("GET", "/v1/workers")[1]["workers"]

    def worker(self, worker: str) -> dict:
        return self.request("GET", f"/v1/workers/{_segment(worker)}")[1]

    def drain(
        self, worker: str, enable: bool = True, wait: bool = False
    ) -> tuple[int, dict]:
        """Drain a worker (or, ``enable`` false, lift its drain); returns
        (HTTP status, the worker). With ``wait``, 202 means jobs still ran
        when the scheduler stopped waiting."""
        return self.request(
            "POST",
            f"/v1/workers/{_segment(worker)}/drain",
            {"enable": enable},
            query={"wait": True} if wait else None,
            long=wait,
            idempotent=True,
        )

    def start_job(
        self,
        worker: str,
        path: str,
        args: list[str] | tuple[str, ...] = (),
        *,
        command: str = "bash",
        timeout_s: int | None = None,
        idempotency_key: str | None = None,
        wait: bool = False,
        limits: dict[str, int] | None = None,
    ) -> tuple[int, dict]:
        """Start a job; returns (HTTP status, job status).

        201 is a new job, 200 one that the idempotency key already named; with
        ``wait``, 202 means the job still ran when the scheduler stopped waiting.
        """
        body: dict[str, Any] = {"command": command, "path": path, "args": list(args)}
        if timeout_s:
            body["timeout_s"] = timeout_s
        idempotency_key = idempotency_key or self._own_key()
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if limits:
            body["limits"] = limits
        return self.request(
            "POST",
            f"/v1/workers/{_segment(worker)}/jobs",
            body,
            query={"wait": True} if wait else None,
            long=wait,
            idempotent=bool(idempotency_key),
        )

    def _own_key(self) -> str | None:
        """With several schedulers, a key for a start the caller gave none,
        so that it may be sent again to the next scheduler."""
        if len(self.endpoints) == 1:
            return None
        return f"{OWN_KEY_PREFIX}{uuid.uuid4()}"

    def jobs(self, worker: str) -> tuple[list[dict], bool]:
        """The worker's jobs, newest first, and whether they may be stale."""
        data = self.request("GET", f"/v1/workers/{_segment(worker)}/jobs")[1]
        return data["jobs"], bool(data.get("stale"))

    def job(self, worker: str, job_id: str) -> dict:
        path = f"/v1/workers/{_segment(worker)}/jobs/{_segment(job_id)}"
        return self.request("GET", path)[1]

    def stop_job(self, worker: str, job_id: str) -> dict:
        path = f"/v1/workers/{_segment(worker)}/jobs/{_segment(job_id)}/stop"
        # The answer comes once the job has ended: after its grace period at most.
        return self.request("POST", path, long=True, idempotent=True)[1]

    def output(
        self, worker: str, job_id: str, offset: int = 0, follow: bool = False
    ) -> Iterator[bytes]:
        """The job's output bytes as they arrive.

        Errors before the first byte are raised when iteration starts; a stream
        that breaks later raises :class:`StreamBroken`.
        """
        path = f"/v1/workers/{_segment(worker)}/jobs/{_segment(job_id)}/output"
        query: dict[str, Any] = {"follow": follow}
        if offset:
            query["offset"] = offset
        conn, resp = self._open(
            "GET",
            path,
            query=query,
            headers={"Accept": "text/plain"},
            long=follow,
        )
        received = 0
        try:
            while True:
                try:
                    chunk = resp.read1(CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise StreamBroken(
                        f"the output stream from {self.url} broke after "
                        f"{received} bytes: {exc!r}",
                        received,
                    ) from None
                if not chunk:
                    return
                received += len(chunk)
                yield chunk
        finally:
            conn.close()

    def fanout(
        self,
        selector: dict[str, Any],
        path: str,
        args: list[str] | tuple[str, ...] = (),
        *,
        command: str = "bash",
        timeout_s: int | None = None,
        idempotency_key: str | None = None,
        limits: dict[str, int] | None = None,
    ) -> dict:
        """Start a job on several workers; ``selector`` is ``{"workers": [...]}``,
        ``{"labels": {...}}`` or ``{"all": True}``."""
        body: dict[str, Any] = {
            **selector,
            "command": command,
            "path": path,
            "args": list(args),
        }
        if timeout_s:
            body["timeout_s"] = timeout_s
        idempotency_key = idempotency_key or self._own_key()
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        if limits:
            body["limits"] = limits
        return self.request(
            "POST", "/v1/jobs", body, long=True, idempotent=bool(idempotency_key)
        )[1]

    def group(self, group_id: str, wait: bool = False) -> dict:
        return self.request(
            "GET",
            f"/v1/groups/{_segment(group_id)}",
            query={"wait": True} if wait else None,
            long=wait,
        )[1]


def make_ssl_context(
    ca_file: str | Path | None = None,
    cert_file: str | Path | None = None,
    key_file: str | Path | None = None,
) -> ssl.SSLContext:
    """A verifying TLS client context: the system's CAs or ``ca_file``, and a
    client certificate when ``cert_file`` is given."""
    if key_file and not cert_file:
        raise SettingsError("key_file: needs cert_file as well")
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"ca_file: cannot load {ca_file}: {_ssl_text(exc)}"
        ) from None
    if cert_file:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            hint = "" if key_file else " (is its key in a separate file? give key_file)"
            raise SettingsError(
                f"cert_file: cannot load {cert_file}"
                + (f" with key {key_file}" if key_file else "")
                + f": {_ssl_text(exc)}{hint}"
            ) from None
    return ctx


def _ssl_text(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
