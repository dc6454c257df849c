"""How a job's output is sent over HTTP: plain chunks, run-and-follow, SSE.

Each function turns an :class:`~scheduler.gateway.OutputStream` into the bytes
of a response body; :func:`guarded` wraps the stream's chunks so that a
revoked token ends it.
"""

from __future__ import annotations

import codecs
import errno
import json
import logging
from collections.abc import Callable, Iterator

from scheduler import metrics
from scheduler.gateway import OutputStream

log = logging.getLogger(__name__)


def plain(stream: OutputStream) -> Iterator[bytes]:
    try:
        for offset, data, skipped in stream.chunks:
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


class JobFailed(ConnectionResetError):
    """Ends a run-and-follow response without its last chunk (see README).

    gunicorn treats a connection reset as a client gone away: it closes the
    connection quietly, so curl sees an incomplete transfer and exits non-zero.
    """


def run_and_follow(stream: OutputStream) -> Iterator[bytes]:
    """The job's output, then: on failure, a last line and an aborted stream."""
    yield from plain(stream)
    final = stream.final
    if final is not None and final["state"] != "succeeded":
        yield (
            f"\n[jobgate: job {final['job_id']} {final['state']}: {final['reason']}]\n"
        ).encode()
        raise JobFailed(errno.ECONNRESET, f"job {final['state']}")


def _sse_event(event: str, data: str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return (
        head + f"event: {event}\n" + "".join(f"data: {x}\n" for x in lines) + "\n"
    ).encode()


def sse(stream: OutputStream) -> Iterator[bytes]:
    """Server-Sent Events: ``output`` events whose ids are byte offsets.

    An event's id is the offset just past the bytes it carries, so a client
    reconnecting with ``Last-Event-ID`` resumes exactly after them. Bytes that
    do not end a UTF-8 character wait for the next chunk, so ids always fall
    on character boundaries. The stream ends with an ``end`` event carrying
    the job's status.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for offset, data, skipped in stream.chunks:
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
            yield _sse_event("output", text)
        yield _sse_event("end", json.dumps(stream.final))
    finally:
        stream.close()


class StreamRevoked(ConnectionResetError):
    """Ends an open output stream whose token was revoked (the stream is cut)."""


def guarded(
    stream: OutputStream, still_valid: Callable[[], bool]
) -> Iterator[tuple[int, bytes, int]]:
    """The stream's chunks while the caller's credentials stay valid.

    Keep-alives from the worker come at least every second while a job is
    quiet, so a revoked token ends even an idle stream promptly.
    """
    metrics.OPEN_STREAMS.inc()
    try:
        for item in stream:
            if not still_valid():
                log.info("ending an output stream: its token was revoked")
                stream.close()
                raise StreamRevoked(errno.ECONNRESET, "token revoked")
            if item[1]:
                metrics.OUTPUT_BYTES.inc(len(item[1]))
            yield item
    finally:
        metrics.OPEN_STREAMS.dec()
