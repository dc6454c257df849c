"""The scheduler's single-caller output stream: chunks, keep-alives, the end."""

from __future__ import annotations

from jobgate.v1 import common_pb2, worker_pb2
from scheduler.gateway import OutputStream


class FakeCall:
    """A server-streaming call's client side: an iterator that can be cancelled."""

    def __init__(self, messages):
        self._messages = iter(messages)
        self.cancelled = False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._messages)

    def cancel(self):
        self.cancelled = True


def chunks_then_end(state: str) -> list:
    job = common_pb2.Job(job_id="j1", command="bash", path="a.sh", output_bytes=6)
    job.state = common_pb2.JobState.Value(f"JOB_STATE_{state.upper()}")
    return [
        worker_pb2.OutputChunk(offset=0, data=b"abc"),
        worker_pb2.OutputChunk(offset=3),  # a keep-alive
        worker_pb2.OutputChunk(offset=3, data=b"def"),
        worker_pb2.OutputChunk(final=job),
    ]


def test_the_end_is_handed_on_before_the_reader_sees_it():
    seen = []
    call = FakeCall(chunks_then_end("succeeded"))
    stream = OutputStream(call, "w1", lambda status: seen.append(status) or status)
    assert list(stream) == [(0, b"abc", 0), (3, b"", 0), (3, b"def", 0)]
    assert stream.final is not None
    assert stream.final["state"] == "succeeded"
    assert (stream.final["job_id"], stream.final["worker_id"]) == ("j1", "w1")
    assert seen == [stream.final]
    assert call.cancelled


def test_without_an_end_nothing_is_handed_on():
    seen = []
    call = FakeCall(chunks_then_end("running")[:2])
    stream = OutputStream(call, "w1", seen.append)
    assert list(stream) == [(0, b"abc", 0), (3, b"", 0)]
    assert stream.final is None
    assert seen == []
