"""One error map per boundary: gRPC status to domain error, domain error to HTTP.

A worker's gRPC error becomes a domain error where the call is made
(``scheduler.worker_errors`` through ``scheduler.worker_calls.WorkerCalls``); the app's
one handler answers a domain error with the status, title and description
``scheduler.http.errors`` gives it, and a fan-out reports each worker's error
with the same three.
"""

from __future__ import annotations

import asyncio
import logging

import falcon
import falcon.asgi
import falcon.testing
import grpc
import grpc.aio
import pytest
from asyncsupport import FakeError, run_async
from grpc_health.v1 import health_pb2

from jobgate import errors
from jobgate.errors import (
    DeadlineExceeded,
    JobgateError,
    NotFound,
    ResourceExhausted,
    StreamExpired,
    Unavailable,
    from_status,
)
from scheduler.http import streams
from scheduler.http.errors import (
    HTTP_STATUS,
    INTERNAL_DESCRIPTION,
    json_errors,
    make_handlers,
    problem,
)
from scheduler.store import WorkerRow
from scheduler.worker_calls import WorkerCalls

ERROR_CODES = [c for c in grpc.StatusCode if c != grpc.StatusCode.OK]


# -- gRPC status <-> domain error ---------------------------------------------------


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
def test_each_status_code_converts_to_the_error_that_carries_it(code):
    exc = from_status(code, "what the worker said")
    assert isinstance(exc, JobgateError)
    assert exc.code == code
    assert exc.message == "what the worker said"


def test_a_code_without_a_class_is_unknown_and_keeps_its_name():
    exc = from_status(grpc.StatusCode.OK, "no error given")
    assert exc.code == grpc.StatusCode.UNKNOWN
    assert exc.message == "OK: no error given"


@pytest.mark.parametrize("code", ERROR_CODES, ids=lambda c: c.name)
def test_every_status_code_has_an_http_status(code):
    assert 400 <= HTTP_STATUS[code] < 600


def test_stream_expired_is_a_deadline_that_says_what_to_do():
    exc = StreamExpired()
    assert isinstance(exc, DeadlineExceeded)
    assert "[workers].stream_timeout_s" in exc.message
    assert problem(exc).status == 504


# -- domain error -> HTTP ------------------------------------------------------------


@pytest.mark.parametrize(
    "exc,status,title,retry",
    [
        (errors.InvalidArgument("args: too many"), 400, "Bad request", None),
        (errors.FailedPrecondition("no such script"), 400, "Bad request", None),
        (errors.Unauthenticated("who are you"), 401, "Unauthorized", None),
        (errors.PermissionDenied("outside the scripts"), 403, "Forbidden", None),
        (NotFound("no job 'j'"), 404, "Not found", None),
        (errors.AlreadyExists("twice"), 409, "Conflict", None),
        (ResourceExhausted("too many jobs"), 429, "Too many requests", 9),
        (errors.Unimplemented("older worker"), 501, "Not implemented", None),
        (Unavailable("worker 'w' is offline", 7), 503, "Worker unavailable", 7),
        (DeadlineExceeded("busy"), 504, "Worker timed out", None),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_problem_gives_status_title_description_and_retry_after(
    exc, status, title, retry
):
    p = problem(exc, retry_after_s=9)
    assert (p.status, p.title, p.description, p.retry_after_s) == (
        status,
        title,
        exc.message,
        retry,
    )
    assert p.entry() == {"error": exc.message, "status": status, "title": title}


def test_an_internal_error_keeps_its_message_to_the_log(caplog):
    with caplog.at_level(logging.ERROR, "scheduler.http.errors"):
        p = problem(from_status(grpc.StatusCode.INTERNAL, "disk on fire"))
    assert (p.status, p.description) == (500, INTERNAL_DESCRIPTION)
    assert "disk on fire" in caplog.text


def test_an_unexpected_exception_is_a_bare_500_logged_with_its_traceback(caplog):
    def fail():
        raise KeyError("job")

    try:
        fail()
    except KeyError as exc:
        with caplog.at_level(logging.ERROR, "scheduler.http.errors"):
            p = problem(exc, doing="starting a job")
    assert (p.status, p.title, p.description) == (
        500,
        "Internal error",
        INTERNAL_DESCRIPTION,
    )
    (record,) = caplog.records
    assert "starting a job" in record.getMessage()
    assert record.exc_info[0] is KeyError


class Raises:
    """A resource that raises what the test hands it."""

    def __init__(self):
        self.exc: BaseException | None = None

    async def on_get(self, req, resp):
        raise self.exc


@pytest.fixture
def app_client():
    app = falcon.asgi.App()
    app.set_error_serializer(json_errors)
    for exc, handler in make_handlers(retry_after_s=3):
        app.add_error_handler(exc, handler)
    resource = Raises()
    app.add_route("/raise", resource)
    return resource, falcon.testing.TestClient(app)


@pytest.mark.parametrize(
    "exc,status,retry_after",
    [
        (NotFound("no worker 'x'; GET /v1/workers lists them"), 404, None),
        (Unavailable("worker 'x' is offline", 11), 503, "11"),
        (ResourceExhausted("the worker runs 4 jobs already"), 429, "3"),
        (StreamExpired(), 504, None),
    ],
    ids=["not-found", "unavailable", "exhausted", "expired"],
)
def test_the_app_answers_a_domain_error_with_json_from_the_map(
    app_client, exc, status, retry_after
):
    resource, client = app_client
    resource.exc = exc
    result = client.simulate_get("/raise", headers={"Accept": "text/event-stream"})
    assert result.status_code == status
    assert result.headers["Content-Type"] == "application/json"
    p = problem(exc, retry_after_s=3)
    assert result.json == {"title": p.title, "description": exc.message}
    assert result.headers.get("Retry-After") == retry_after


def test_the_app_answers_a_grpc_error_that_escaped_conversion_with_a_bare_500(
    app_client, caplog
):
    resource, client = app_client
    resource.exc = FakeError(grpc.StatusCode.NOT_FOUND)
    with caplog.at_level(logging.ERROR, "scheduler.http.errors"):
        result = client.simulate_get("/raise")
    assert result.status_code == 500
    assert result.json == {
        "title": "Internal error",
        "description": INTERNAL_DESCRIPTION,
    }
    assert "GET /raise" in caplog.text


def test_the_app_passes_falcons_own_errors_through(app_client):
    resource, client = app_client
    resource.exc = falcon.HTTPContentTooLarge(description="the limit is 1 byte")
    result = client.simulate_get("/raise")
    assert result.status_code == 413
    assert result.json["description"] == "the limit is 1 byte"


# -- a worker's gRPC errors -> domain errors (WorkerCalls) ---------------------------


def worker_row() -> WorkerRow:
    return WorkerRow("w-id", "worker-7", "127.0.0.1:1", {}, 4, "1", "online", 0, 0, 0)


class FailingUnary:
    def __init__(self, exc: BaseException):
        self.exc = exc

    async def __call__(self, *args, **kwargs):
        raise self.exc


class FailingStream(grpc.aio.UnaryStreamMultiCallable):
    """A server-streaming method whose call sends ``first``, then fails."""

    def __init__(self, exc: BaseException, first=None):
        self.exc = exc
        self.first = first

    def __call__(self, *args, **kwargs):
        return FailingStreamCall(self.exc, self.first)


class FailingStreamCall:
    def __init__(self, exc: BaseException, first):
        self.exc = exc
        self.pending = [first] if first is not None else []
        self.cancelled = False

    def add_done_callback(self, callback) -> None:
        pass

    async def read(self):
        if self.pending:
            return self.pending.pop()
        raise self.exc

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Stub:
    def __init__(self, exc: BaseException):
        self.GetJob = FailingUnary(exc)
        self.StreamOutput = FailingStream(exc, first="a chunk")


class Health:
    def __init__(self, serving: bool | None):
        self.serving = serving

    async def Check(self, request, timeout):  # noqa: N802 - the gRPC method's name
        if self.serving is None:
            raise FakeError(grpc.StatusCode.DEADLINE_EXCEEDED)
        status = health_pb2.HealthCheckResponse
        return status(status=status.SERVING if self.serving else status.NOT_SERVING)


def calls(exc: BaseException, serving: bool | None = True) -> WorkerCalls:
    return WorkerCalls(Stub(exc), Health(serving), worker_row(), 6)


async def unary_error(wc: WorkerCalls) -> BaseException:
    with pytest.raises(JobgateError) as caught:
        await wc.GetJob(object(), timeout=1)
    return caught.value


async def stream_error(wc: WorkerCalls) -> BaseException:
    call = wc.StreamOutput(object(), timeout=1)
    assert await call.read() == "a chunk"
    with pytest.raises(JobgateError) as caught:
        await call.read()
    return caught.value


@pytest.mark.parametrize(
    "code,cls",
    [
        (grpc.StatusCode.NOT_FOUND, NotFound),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
    ],
    ids=lambda v: getattr(v, "name", None),
)
@run_async
async def test_a_workers_refusal_keeps_its_code_and_message(code, cls):
    wc = calls(FakeError(code))
    for exc in (await unary_error(wc), await stream_error(wc)):
        assert type(exc) is cls
        assert exc.message == code.name  # what FakeError.details() says


@run_async
async def test_a_worker_that_cannot_be_reached_is_named_with_the_retry_after():
    wc = calls(FakeError(grpc.StatusCode.UNAVAILABLE))
    for exc in (await unary_error(wc), await stream_error(wc)):
        assert isinstance(exc, Unavailable)
        assert exc.message == "worker 'worker-7' cannot be reached: UNAVAILABLE"
        assert exc.retry_after_s == 6


@run_async
async def test_a_late_call_to_a_live_worker_is_busy_and_to_a_silent_one_unavailable():
    busy = await unary_error(calls(FakeError(grpc.StatusCode.DEADLINE_EXCEEDED)))
    assert type(busy) is DeadlineExceeded
    assert "alive" in busy.message and "GetJob" in busy.message
    hung = await unary_error(calls(FakeError(grpc.StatusCode.DEADLINE_EXCEEDED), None))
    assert isinstance(hung, Unavailable)
    assert "not even its health check" in hung.message


@run_async
async def test_a_stream_past_its_deadline_has_expired():
    exc = await stream_error(calls(FakeError(grpc.StatusCode.DEADLINE_EXCEEDED)))
    assert isinstance(exc, StreamExpired)


@run_async
async def test_a_cancelled_read_stays_a_cancellation():
    wc = calls(asyncio.CancelledError())
    call = wc.StreamOutput(object(), timeout=1)
    await call.read()
    with pytest.raises(asyncio.CancelledError):
        await call.read()


# -- errors after an output stream began --------------------------------------------


class Stream:
    """What streams.Body lets go of: an OutputStream's close()."""

    def __init__(self):
        self.closed = False

    def close(self) -> None:
        self.closed = True


async def chunks_then(exc: BaseException):
    yield b"abc"
    raise exc


@pytest.mark.parametrize(
    "exc,level",
    [
        (Unavailable("worker 'w' cannot be reached: reset"), logging.WARNING),
        (StreamExpired(), logging.INFO),
    ],
    ids=["unavailable", "expired"],
)
@run_async
async def test_a_domain_error_mid_stream_ends_the_response_early_with_one_line(
    exc, level, caplog
):
    stream = Stream()
    body = streams.Body(chunks_then(exc), stream, None)
    got = []
    with caplog.at_level(logging.INFO, "scheduler.http.streams"):
        with pytest.raises(streams.StreamAborted):
            async for data in body:
                got.append(data)
    await body.close()
    assert got == [b"abc"]
    assert stream.closed
    (record,) = caplog.records
    assert record.levelno == level
    assert exc.message in record.getMessage()
    assert record.exc_info is None


@run_async
async def test_an_unexpected_error_mid_stream_is_not_taken_for_a_domain_error():
    body = streams.Body(chunks_then(KeyError("bug")), Stream(), None)
    with pytest.raises(KeyError):
        async for _ in body:
            pass
