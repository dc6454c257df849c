"""A worker's gRPC errors as domain errors: the one place they are converted.

Every call to a worker is made through ``scheduler.worker_calls.WorkerCalls``; a
call that fails hands its ``grpc.RpcError`` to :func:`convert`, and the reads
of an output stream do so through :class:`StreamCall`. Past this point only
:mod:`jobgate.errors` exceptions travel: the relay, the fan-out and the HTTP
error map (``scheduler.http.errors``) never see a gRPC error.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import grpc

from jobgate.errors import JobgateError, StreamExpired, Unavailable, from_status

# The domain error of a failed call: (the call's error) -> the error to raise.
Convert = Callable[[grpc.RpcError], Awaitable[JobgateError]]


async def convert(
    exc: grpc.RpcError,
    worker: str,
    retry_after_s: int,
    diagnose: Callable[[], Awaitable[JobgateError]],
    stream: bool = False,
) -> JobgateError:
    """The domain error a call to ``worker`` that failed with ``exc`` reports.

    The worker's message is kept. A worker that cannot be reached is named.
    A unary call past its deadline is diagnosed (``diagnose`` tells a busy
    worker from a hung one); a stream past its deadline has run for its
    longest allowed time, the deadline it was opened with.
    """
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return Unavailable(
            f"worker {worker!r} cannot be reached: {details}", retry_after_s
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return StreamExpired() if stream else await diagnose()
    return from_status(code, details)


class StreamCall:
    """A server-streaming call to a worker whose reads raise domain errors.

    It has what the readers of a stream use of a ``grpc.aio`` call:
    ``await read()`` (the messages, then ``grpc.aio.EOF``) and ``cancel()``.
    """

    def __init__(self, call, to_domain: Convert):
        self._call = call
        self._to_domain = to_domain

    async def read(self):
        try:
            return await self._call.read()
        except grpc.RpcError as exc:
            raise await self._to_domain(exc) from None

    def cancel(self) -> bool:
        return self._call.cancel()
