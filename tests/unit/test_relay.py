"""The relay that lets the followers of a job share one stream from the worker.

Calls are fakes: queues the test feeds with ``OutputChunk`` messages, errors
or the end of the stream.
"""

from __future__ import annotations

import queue
import threading

import grpc
import pytest

from jobgate.v1 import common_pb2, worker_pb2
from scheduler.relay import Relay

END = object()
KEY = ("worker-id", "127.0.0.1:1", "job-id")


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


class FakeCall:
    """A server-streaming call whose messages the test puts in by hand."""

    def __init__(self, offset: int):
        self.offset = offset
        self.items: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        item = self.items.get(timeout=10)
        if item is END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled.set()
        self.items.put(FakeError(grpc.StatusCode.CANCELLED))

    def data(self, offset: int, data: bytes, skipped: int = 0) -> None:
        self.items.put(
            worker_pb2.OutputChunk(offset=offset, data=data, skipped=skipped)
        )

    def keepalive(self, offset: int) -> None:
        self.items.put(worker_pb2.OutputChunk(offset=offset))

    def final(self, total: int) -> None:
        self.items.put(
            worker_pb2.OutputChunk(
                offset=total, final=common_pb2.Job(job_id="job-id", output_bytes=total)
            )
        )
        self.items.put(END)


class Calls:
    """open_call for the relay: hands out FakeCalls and remembers them."""

    def __init__(self):
        self.made: list[FakeCall] = []
        self.ready = threading.Condition()

    def __call__(self, offset: int, timeout_s: float) -> FakeCall:
        call = FakeCall(offset)
        with self.ready:
            self.made.append(call)
            self.ready.notify_all()
        return call

    def wait(self, n: int) -> FakeCall:
        with self.ready:
            assert self.ready.wait_for(lambda: len(self.made) >= n, 10)
            return self.made[n - 1]


def final_to_dict(job) -> dict:
    return {"job_id": job.job_id, "output_bytes": job.output_bytes}


class Busy(Exception):
    pass


def follow(relay: Relay, calls: Calls, offset: int = 0, timeout_s: float = 3600):
    return relay.follow(
        KEY, offset, calls, final_to_dict, lambda: Busy("busy"), "worker-id", timeout_s
    )


def follow_soon(relay: Relay, calls: Calls, offset: int = 0):
    """Start following in a thread (the first message may not be there yet)."""
    box: dict = {}

    def run():
        try:
            box["f"] = follow(relay, calls, offset)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, box


def read_all(stream) -> tuple[list, dict | None]:
    items = list(stream)
    return items, stream.final


def collect(stream) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        try:
            box["items"], box["final"] = read_all(stream)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, box


def text(items) -> bytes:
    return b"".join(d for _, d, _ in items)


def new_relay(window: int = 1 << 20, budget: int = 1 << 24, first_s: float = 5.0):
    return Relay(window, budget, first_s)


def test_followers_share_one_call_and_all_get_every_byte_and_the_final_status():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"abc")
    t.join(5)
    followers = [box["f"]] + [follow(relay, calls) for _ in range(3)]
    readers = [collect(f) for f in followers]
    first.data(3, b"def")
    first.keepalive(6)
    first.data(6, b"ghi")
    first.final(9)
    for t, _ in readers:
        t.join(5)
    assert len(calls.made) == 1
    for _, box in readers:
        assert text(box["items"]) == b"abcdefghi"
        assert box["final"] == {"job_id": "job-id", "output_bytes": 9}
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0 or first.cancelled.is_set()


def test_keepalives_reach_every_idle_follower():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"abc")
    t.join(5)
    a, b = box["f"], follow(relay, calls, offset=1)
    its = [iter(a.chunks), iter(b.chunks)]
    assert [next(it) for it in its] == [(0, b"abc", 0), (1, b"bc", 0)]
    first.keepalive(3)
    assert [next(it) for it in its] == [(3, b"", 0), (3, b"", 0)]
    first.keepalive(3)
    assert [next(it) for it in its] == [(3, b"", 0), (3, b"", 0)]
    first.final(3)
    assert [list(it) for it in its] == [[], []]
    assert a.final == b.final == {"job_id": "job-id", "output_bytes": 3}


def test_late_follower_inside_the_window_starts_at_its_offset_without_a_call():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"hello ")
    t.join(5)
    a = box["f"]
    reader = collect(a)
    first.data(6, b"world")
    late = follow(relay, calls, offset=3)
    late_reader = collect(late)
    first.final(11)
    for t, _ in (reader, late_reader):
        t.join(5)
    assert len(calls.made) == 1
    assert text(reader[1]["items"]) == b"hello world"
    assert late_reader[1]["items"][0][0] == 3
    assert text(late_reader[1]["items"]) == b"lo world"
    assert late_reader[1]["final"]["output_bytes"] == 11


def test_follower_ahead_of_the_output_gets_bytes_from_its_offset_on():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"0123")
    t.join(5)
    ahead = follow(relay, calls, offset=6)
    reader = collect(ahead)
    first.data(4, b"4567")
    first.data(8, b"89")
    first.final(10)
    reader[0].join(5)
    box["f"].close()
    assert reader[1]["items"] == [(6, b"67", 0), (8, b"89", 0)]


def test_follower_before_the_window_gets_no_shared_stream():
    relay, calls = new_relay(window=4), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"aaaa")
    t.join(5)
    a = box["f"]
    it = iter(a.chunks)
    assert next(it) == (0, b"aaaa", 0)
    first.data(4, b"bbbb")  # pushes "aaaa" out of the window
    assert next(it) == (4, b"bbbb", 0)
    assert follow(relay, calls, offset=2) is None
    assert len(calls.made) == 1
    assert follow(relay, calls, offset=5) is not None  # inside: joins
    a.close()


def test_slow_follower_that_falls_behind_continues_on_its_own_call():
    relay, calls = new_relay(window=6), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"aaa")
    t.join(5)
    fast, slow = box["f"], follow(relay, calls)
    slow_it = iter(slow.chunks)
    assert next(slow_it) == (0, b"aaa", 0)  # then it stops reading a while
    fast_reader = collect(fast)
    for i, part in enumerate((b"bbb", b"ccc", b"ddd")):
        first.data(3 + 3 * i, part)
    first.final(12)
    fast_reader[0].join(5)
    assert text(fast_reader[1]["items"]) == b"aaabbbcccddd"
    # "bbb" left the window while the slow one was away: it gets its own call
    # from where it was, and the rest from there.
    rest: list = []
    t = threading.Thread(target=lambda: rest.extend(slow_it))
    t.start()
    own = calls.wait(2)
    assert own.offset == 3
    own.data(3, b"bbbccc")
    own.data(9, b"ddd")
    own.final(12)
    t.join(5)
    assert text(rest) == b"bbbcccddd"
    assert slow.final["output_bytes"] == 12
    assert first.cancelled.is_set() or relay.upstreams() == 0


def test_gaps_are_reported_from_each_followers_position():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"head")
    t.join(5)
    a = box["f"]
    reader = collect(a)
    first.data(10, b"tail", skipped=6)  # bytes 4-9 were dropped by the cap
    mid_gap = follow(relay, calls, offset=7)
    mid_reader = collect(mid_gap)
    first.final(14)
    for t, _ in (reader, mid_reader):
        t.join(5)
    assert reader[1]["items"] == [(0, b"head", 0), (10, b"tail", 6)]
    assert mid_reader[1]["items"] == [(10, b"tail", 3)]


def test_error_before_the_first_message_is_raised_to_every_waiting_follower():
    relay, calls = new_relay(), Calls()
    t1, box1 = follow_soon(relay, calls)
    first = calls.wait(1)
    t2, box2 = follow_soon(relay, calls)  # joins the same, not yet started call
    first.items.put(FakeError(grpc.StatusCode.NOT_FOUND))
    t1.join(5)
    t2.join(5)
    for box in (box1, box2):
        assert box["error"].code() == grpc.StatusCode.NOT_FOUND
    assert len(calls.made) == 1
    assert relay.upstreams() == 0


def test_first_message_too_late_is_diagnosed():
    relay, calls = new_relay(first_s=0.2), Calls()
    with pytest.raises(Busy):
        follow(relay, calls)
    assert calls.made[0].cancelled.is_set()
    assert relay.upstreams() == 0


def test_error_in_mid_stream_ends_each_follower_after_the_bytes_before_it():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"abc")
    t.join(5)
    readers = [collect(box["f"]), collect(follow(relay, calls))]
    first.items.put(FakeError(grpc.StatusCode.UNAVAILABLE))
    for t, b in readers:
        t.join(5)
        assert b["error"].code() == grpc.StatusCode.UNAVAILABLE
    # A follower arriving now starts a new call rather than join a failed one.
    t, box = follow_soon(relay, calls)
    calls.wait(2).data(0, b"abc")
    t.join(5)
    assert box["f"] is not None
    box["f"].close()


def test_shared_call_running_out_of_time_hands_followers_their_own_calls():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"abc")
    t.join(5)
    reader = collect(box["f"])
    first.items.put(FakeError(grpc.StatusCode.DEADLINE_EXCEEDED))
    own = calls.wait(2)
    assert own.offset == 3
    own.data(3, b"def")
    own.final(6)
    reader[0].join(5)
    assert "error" not in reader[1], reader[1]
    assert text(reader[1]["items"]) == b"abcdef"
    assert reader[1]["final"]["output_bytes"] == 6


def test_last_follower_leaving_cancels_the_call():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"abc")
    t.join(5)
    a, b = box["f"], follow(relay, calls)
    a_it = iter(a.chunks)
    assert next(a_it) == (0, b"abc", 0)
    a_it.close()  # the client went away mid-stream
    assert not first.cancelled.is_set()
    assert relay.upstreams() == 1
    b.close()
    assert first.cancelled.is_set()
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0


def test_budget_over_all_jobs_drops_the_oldest_chunks():
    relay, calls = new_relay(window=100, budget=8), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"aaaa")
    t.join(5)
    a = box["f"]
    it = iter(a.chunks)
    assert next(it) == (0, b"aaaa", 0)
    for i in range(1, 4):
        first.data(4 * i, b"xxxx")
        assert next(it) == (4 * i, b"xxxx", 0)
    assert relay.kept_bytes <= 8
    assert follow(relay, calls, offset=0) is None  # dropped
    a.close()
    assert relay.kept_bytes == 0


def test_disabled_relay_shares_nothing():
    relay, calls = new_relay(window=0), Calls()
    assert follow(relay, calls) is None
    assert calls.made == []


def test_lagging_follower_gets_what_it_missed_joined_up_to_a_gap():
    relay, calls = new_relay(), Calls()
    t, box = follow_soon(relay, calls)
    first = calls.wait(1)
    first.data(0, b"ab")
    t.join(5)
    a, lagging = box["f"], follow(relay, calls)
    a_it = iter(a.chunks)
    assert next(a_it) == (0, b"ab", 0)
    for offset, data, skipped in ((2, b"cd", 0), (4, b"ef", 0), (9, b"xy", 3)):
        first.data(offset, data, skipped)
        assert next(a_it) == (offset, data, skipped)
    first.final(11)
    assert list(lagging.chunks) == [(0, b"abcdef", 0), (9, b"xy", 3)]
    assert lagging.final["output_bytes"] == 11
    a.close()
