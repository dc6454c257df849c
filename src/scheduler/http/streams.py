"""How a job's output is sent over HTTP: plain chunks, run-and-follow, SSE.

Each function turns an :class:`~scheduler.usecases.OutputStream` into the bytes
of a response body; :func:`guarded` wraps the stream's chunks so that a
revoked token ends it. An error after the response began (the worker went
away, the stream ran for its longest allowed time) cannot change the status
any more: :class:`Body` ends the response early and logs why, in one line.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable

from jobgate.errors import JobgateError, StreamExpired, Unavailable
from scheduler import metrics
from scheduler.http.connection import AbortResponse
from scheduler.usecases import OutputStream

log = logging.getLogger(__name__)

# How often an open stream checks that its token is still valid (keep-alives
# come at least every second, so a revoked token ends a stream within about
# a second either way).
CHECK_INTERVAL_S = 0.5


async def plain(stream: OutputStream) -> AsyncIterator[bytes]:
    try:
        async for offset, data, skipped in stream.chunks:
            if skipped:
                yield _gap_notice(offset, skipped)
            if data:
                yield data
    finally:
        stream.close()


def _gap_notice(offset: int, skipped: int) -> bytes:
    return (
        f"\n[jobgate: {skipped} bytes of output were dropped here by the output "
        f"cap; the output resumes at byte {offset}]\n"
    ).encode()


class StreamAborted(AbortResponse):
    """Ends a response without its last chunk: the server closes the
    connection, so the client sees an incomplete transfer (curl exits
    non-zero). Raised for a failed job of a run-and-follow, and for a stream
    whose token was revoked."""


async def run_and_follow(stream: OutputStream) -> AsyncIterator[bytes]:
    """The job's output, then: on failure, a last line and an aborted stream."""
    async for data in plain(stream):
        yield data
    final = stream.final
    if final is not None and final["state"] != "succeeded":
        yield (
            f"\n[jobgate: job {final['job_id']} {final['state']}: {final['reason']}]\n"
        ).encode()
        raise StreamAborted(f"job {final['state']}")


def _sse_event(event: str, data: str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return (
        head + f"event: {event}\n" + "".join(f"data: {x}\n" for x in lines) + "\n"
    ).encode()


async def sse(stream: OutputStream) -> AsyncIterator[bytes]:
    """Server-Sent Events: ``output`` events whose ids are byte offsets.

    An event's id is the offset just past the bytes it carries, so a client
    reconnecting with ``Last-Event-ID`` resumes exactly after them. Bytes that
    do not end a UTF-8 character wait for the next chunk, so ids always fall
    on character boundaries. The stream ends with an ``end`` event carrying
    the job's status.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    end = 0  # the offset just past the last byte read
    try:
        async for offset, data, skipped in stream.chunks:
            end = offset + len(data)
            if skipped:
                decoder.reset()
                yield _sse_event(
                    "gap", json.dumps({"skipped": skipped, "offset": offset})
                )
            if not data:
                yield b": keep-alive\n\n"
                continue
            text = decoder.decode(data)
            pending = len(decoder.getstate()[0])
            if text:
                yield _sse_event("output", text, offset + len(data) - pending)
        text = decoder.decode(b"", final=True)
        if text:
            # The bytes of a character the output ended in the middle of.
            yield _sse_event("output", text, end)
        yield _sse_event("end", json.dumps(stream.final))
    finally:
        stream.close()


def guarded(
    stream: OutputStream, still_valid: Callable[[], bool]
) -> AsyncIterator[tuple[int, bytes, int]]:
    """The stream's chunks while the caller's credentials stay valid.

    Keep-alives from the worker come at least every second while a job is
    quiet, so a revoked token ends even an idle stream promptly.
    """
    return _guarded(stream.chunks, stream.close, still_valid)


async def _guarded(
    chunks: AsyncIterator[tuple[int, bytes, int]],
    close: Callable[[], None],
    still_valid: Callable[[], bool],
) -> AsyncIterator[tuple[int, bytes, int]]:
    # The token and the byte counter are looked at twice a second rather
    # than for every chunk: with thousands of followers, a file check and a
    # shared-memory counter update per chunk each were several percent of
    # the process's time (bench scenario 5).
    loop = asyncio.get_running_loop()
    checked = loop.time()
    unsent = 0
    metrics.OPEN_STREAMS.inc()
    try:
        async for item in chunks:
            unsent += len(item[1])
            now = loop.time()
            if now - checked >= CHECK_INTERVAL_S:
                checked = now
                metrics.OUTPUT_BYTES.inc(unsent)
                unsent = 0
                if not still_valid():
                    log.info("ending an output stream: its token was revoked")
                    close()
                    raise StreamAborted("token revoked")
            yield item
    finally:
        metrics.OUTPUT_BYTES.inc(unsent)
        metrics.OPEN_STREAMS.dec()


class StreamSlots:
    """Caps on the output streams that follow a job, per process and per caller.

    A follower costs a coroutine and its buffers, so the caps are not about
    threads: they keep one caller (a runaway script, a leaked token) from
    taking what everyone else needs, and bound the process's memory. A
    stream over either cap is refused with 503 and ``Retry-After``.
    """

    def __init__(self, per_process: int, per_caller: int, retry_after_s: int):
        self.per_process = per_process
        self.per_caller = per_caller
        self.retry_after_s = retry_after_s
        self.open = 0
        self.by_caller: dict[str, int] = {}

    def take(self, caller: str) -> Slot:
        if self.open >= self.per_process:
            raise Unavailable(
                f"this server process already serves {self.open} output streams "
                "([http].max_followers); retry later",
                self.retry_after_s,
            )
        held = self.by_caller.get(caller, 0)
        if held >= self.per_caller:
            raise Unavailable(
                f"{caller} already holds {held} output streams on this server "
                "process ([http].max_followers_per_caller); close some or retry "
                "later",
                self.retry_after_s,
            )
        self.open += 1
        self.by_caller[caller] = held + 1
        return Slot(self, caller)

    def _give_back(self, caller: str) -> None:
        self.open -= 1
        left = self.by_caller[caller] - 1
        if left:
            self.by_caller[caller] = left
        else:
            del self.by_caller[caller]


class Slot:
    """One stream's place under the caps; given back once, however it ends."""

    def __init__(self, slots: StreamSlots, caller: str):
        # Also given back when the slot is dropped unused (the client left
        # before its response began, so no body was ever iterated).
        self._finalizer = weakref.finalize(self, slots._give_back, caller)

    def release(self) -> None:
        self._finalizer()


class Body:
    """A streamed response body that lets go of its stream however it ends.

    A domain error while it is sent ends the response early (the client sees
    an incomplete transfer, so curl exits non-zero) rather than as a defect
    with a traceback: its status was no longer the response's to give.
    """

    def __init__(
        self, chunks: AsyncIterator[bytes], stream: OutputStream, slot: Slot | None
    ):
        self._chunks = chunks
        self._sent = _ending_early(chunks)
        self._stream = stream
        self._slot = slot

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._sent

    async def close(self) -> None:
        try:
            await self._sent.aclose()
            await self._chunks.aclose()
        finally:
            self._stream.close()
            if self._slot is not None:
                self._slot.release()


async def _ending_early(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for data in chunks:
            yield data
    except JobgateError as exc:
        level = logging.INFO if isinstance(exc, StreamExpired) else logging.WARNING
        log.log(level, "an output stream ended early: %s", exc.message)
        raise StreamAborted(exc.message) from exc
