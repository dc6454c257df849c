"""The scheduler's single-caller output stream: chunks, keep-alives, the end.

The call is a fake with the client side of a ``grpc.aio`` server-streaming
call: ``await read()`` gives the scripted messages (or raises the scripted
errors), then ``grpc.aio.EOF``; ``cancel()`` ends it, and a read that is
cancelled while it waits cancels the call, as in ``grpc.aio``. A call whose
script fails is wrapped as the use cases wrap a worker's calls, so that its
gRPC error is read as the domain error.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from asyncsupport import FakeError, run_async

from jobgate.errors import NotFound, Unavailable
from jobgate.v1 import common_pb2, worker_pb2
from scheduler.usecases import OutputStream, job_to_dict
from scheduler.worker_errors import StreamCall, convert

HANG = object()  # a read that waits until the call is cancelled


class FakeCall:
    """A server-streaming call that reads out a script, then the end."""

    def __init__(self, script):
        self._script = list(script)
        self.cancelled = False
        self.reads = 0
        self._cancel = asyncio.Event()

    async def read(self):
        if self.cancelled:
            raise asyncio.CancelledError()
        self.reads += 1
        if not self._script:
            return grpc.aio.EOF
        item = self._script.pop(0)
        if item is HANG:
            try:
                await self._cancel.wait()
            except asyncio.CancelledError:
                self.cancel()  # what grpc.aio does with a cancelled read
                raise
            raise asyncio.CancelledError()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        if self.cancelled:
            return False
        self.cancelled = True
        self._cancel.set()
        return True


def chunks_then_end(state: str) -> list:
    job = common_pb2.Job(job_id="j1", command="bash", path="a.sh", output_bytes=6)
    job.state = common_pb2.JobState.Value(f"JOB_STATE_{state.upper()}")
    return [
        worker_pb2.OutputChunk(offset=0, data=b"abc"),
        worker_pb2.OutputChunk(offset=3),  # a keep-alive
        worker_pb2.OutputChunk(offset=3, data=b"def"),
        worker_pb2.OutputChunk(final=job),
    ]


class Recorder:
    """``on_final``: renders the job's status and remembers what it handed on."""

    def __init__(self):
        self.seen: list[dict] = []

    async def __call__(self, job) -> dict:
        status = job_to_dict(job, "w1")
        self.seen.append(status)
        return status


class Busy(Exception):
    pass


async def busy() -> Exception:
    return Busy("busy")


def wrapped(call: FakeCall) -> StreamCall:
    return StreamCall(call, lambda exc: convert(exc, "w1", 5, busy, stream=True))


async def read_all(stream: OutputStream) -> list:
    return [item async for item in stream]


@run_async
async def test_the_end_is_handed_on_before_the_reader_sees_it():
    call, on_final = FakeCall(chunks_then_end("succeeded")), Recorder()
    stream = OutputStream(call, "w1", on_final)
    await stream.first(1.0, busy)
    assert await read_all(stream) == [(0, b"abc", 0), (3, b"", 0), (3, b"def", 0)]
    assert stream.final is not None
    assert stream.final["state"] == "succeeded"
    assert (stream.final["job_id"], stream.final["worker_id"]) == ("j1", "w1")
    assert on_final.seen == [stream.final]
    assert call.cancelled  # let go once read out


@run_async
async def test_without_an_end_nothing_is_handed_on():
    call, on_final = FakeCall(chunks_then_end("running")[:2]), Recorder()
    stream = OutputStream(call, "w1", on_final)
    await stream.first(1.0, busy)
    assert await read_all(stream) == [(0, b"abc", 0), (3, b"", 0)]
    assert stream.final is None
    assert on_final.seen == []


@run_async
async def test_first_waits_for_the_first_message_only():
    call = FakeCall(chunks_then_end("succeeded"))
    stream = OutputStream(call, "w1", Recorder())
    await stream.first(1.0, busy)
    assert call.reads == 1
    assert not call.cancelled
    it = aiter(stream)
    assert await anext(it) == (0, b"abc", 0)  # the message first() took
    assert call.reads == 1
    await it.aclose()


@run_async
async def test_a_job_that_already_ended_gives_its_end_and_no_bytes():
    call, on_final = FakeCall(chunks_then_end("failed")[3:]), Recorder()
    stream = OutputStream(call, "w1", on_final)
    await stream.first(1.0, busy)
    assert await read_all(stream) == []
    assert stream.final["state"] == "failed"
    assert on_final.seen == [stream.final]


@run_async
async def test_a_stream_that_ends_at_once_gives_nothing():
    call, on_final = FakeCall([]), Recorder()
    stream = OutputStream(call, "w1", on_final)
    await stream.first(1.0, busy)
    assert await read_all(stream) == []
    assert stream.final is None
    assert on_final.seen == []


@run_async
async def test_bytes_skipped_by_the_output_cap_are_reported_with_the_chunk():
    call = FakeCall(
        [
            worker_pb2.OutputChunk(offset=0, data=b"head"),
            worker_pb2.OutputChunk(offset=10, data=b"tail", skipped=6),
        ]
    )
    stream = OutputStream(call, "w1", Recorder())
    await stream.first(1.0, busy)
    assert await read_all(stream) == [(0, b"head", 0), (10, b"tail", 6)]


@run_async
async def test_an_error_before_the_first_message_is_raised_by_first():
    call = FakeCall([FakeError(grpc.StatusCode.NOT_FOUND)])
    stream = OutputStream(wrapped(call), "w1", Recorder())
    with pytest.raises(NotFound):
        await stream.first(1.0, busy)
    assert call.cancelled


@run_async
async def test_a_first_message_too_late_is_diagnosed_and_the_call_cancelled():
    call = FakeCall([HANG])
    stream = OutputStream(call, "w1", Recorder())
    with pytest.raises(Busy):
        await stream.first(0, busy)  # no time at all: times out at once
    assert call.cancelled


@run_async
async def test_a_request_cancelled_before_the_first_message_cancels_the_call():
    call = FakeCall([HANG])
    stream = OutputStream(call, "w1", Recorder())
    waiting = asyncio.ensure_future(stream.first(60.0, busy))
    while call.reads == 0:
        await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert call.cancelled


@run_async
async def test_an_error_in_mid_stream_comes_after_the_bytes_before_it():
    call = FakeCall(
        [
            worker_pb2.OutputChunk(offset=0, data=b"abc"),
            FakeError(grpc.StatusCode.UNAVAILABLE),
        ]
    )
    stream = OutputStream(wrapped(call), "w1", Recorder())
    await stream.first(1.0, busy)
    got = []
    with pytest.raises(Unavailable, match="'w1' cannot be reached"):
        async for item in stream:
            got.append(item)
    assert got == [(0, b"abc", 0)]
    assert call.cancelled


@run_async
async def test_a_reader_that_stops_early_cancels_the_call():
    call = FakeCall(chunks_then_end("running"))
    stream = OutputStream(call, "w1", Recorder())
    await stream.first(1.0, busy)
    it = aiter(stream)
    assert await anext(it) == (0, b"abc", 0)
    assert not call.cancelled
    await it.aclose()  # the client went away
    assert call.cancelled
    assert stream.final is None


@run_async
async def test_close_cancels_the_call():
    call = FakeCall([worker_pb2.OutputChunk(offset=0, data=b"abc"), HANG])
    stream = OutputStream(call, "w1", Recorder())
    await stream.first(1.0, busy)
    stream.close()
    assert call.cancelled


@run_async
async def test_the_chunks_the_http_layer_wraps_are_the_stream_itself():
    call = FakeCall(chunks_then_end("succeeded"))
    stream = OutputStream(call, "w1", Recorder())
    await stream.first(1.0, busy)
    assert aiter(stream) is stream.chunks
    items = [item async for item in stream.chunks]
    assert [data for _, data, _ in items] == [b"abc", b"", b"def"]
    assert stream.final["state"] == "succeeded"
