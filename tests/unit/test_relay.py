"""The relay that lets the followers of a job share one stream from the worker.

Calls are fakes with the client side of a ``grpc.aio`` server-streaming call:
``await read()`` gives what the test fed them (``OutputChunk`` messages,
errors), then ``grpc.aio.EOF``; ``cancel()`` ends them, and a read that is
cancelled while it waits cancels its call, as in ``grpc.aio``. The relay gets
them as the use cases hand them over, wrapped so that a gRPC error is read as
its domain error. Nothing waits on time: a test feeds a call, then lets the
loop run what can run.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from asyncsupport import FakeError, run_async, settle

from jobgate.errors import DeadlineExceeded, NotFound, StreamExpired, Unavailable
from jobgate.v1 import common_pb2, worker_pb2
from scheduler.relay import Relay
from scheduler.worker_errors import StreamCall, convert

KEY = ("worker-id", "127.0.0.1:1", "job-id")
END = object()  # the end of the stream: read as grpc.aio.EOF
CANCEL = object()  # wakes a read of a cancelled call


class FakeCall:
    """A server-streaming call whose messages the test puts in by hand."""

    def __init__(self, offset: int, timeout_s: float):
        self.offset = offset
        self.timeout_s = timeout_s
        self.items: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.ended = False
        self.reads = 0  # reads begun
        self.waiting = False  # a read waits for the next message

    async def read(self):
        if self.cancelled:
            raise asyncio.CancelledError()
        if self.ended:
            return grpc.aio.EOF
        self.reads += 1
        self.waiting = True
        try:
            item = await self.items.get()
        except asyncio.CancelledError:
            self.cancel()  # what grpc.aio does with a cancelled read
            raise
        finally:
            self.waiting = False
        if item is CANCEL:
            raise asyncio.CancelledError()
        if item is END:
            self.ended = True
            return grpc.aio.EOF
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> bool:
        if self.cancelled or self.ended:
            return False
        self.cancelled = True
        self.items.put_nowait(CANCEL)
        return True

    def data(self, offset: int, data: bytes, skipped: int = 0) -> None:
        self.items.put_nowait(
            worker_pb2.OutputChunk(offset=offset, data=data, skipped=skipped)
        )

    def keepalive(self, offset: int) -> None:
        self.items.put_nowait(worker_pb2.OutputChunk(offset=offset))

    def final(self, total: int) -> None:
        self.items.put_nowait(
            worker_pb2.OutputChunk(
                offset=total, final=common_pb2.Job(job_id="job-id", output_bytes=total)
            )
        )
        self.items.put_nowait(END)

    def fail(self, code: grpc.StatusCode) -> None:
        self.items.put_nowait(FakeError(code))


class Calls:
    """open_call for the relay: hands out FakeCalls and remembers them."""

    def __init__(self):
        self.made: list[FakeCall] = []

    def __call__(self, offset: int, timeout_s: float) -> StreamCall:
        call = FakeCall(offset, timeout_s)
        self.made.append(call)
        return StreamCall(call, to_domain)

    async def wait(self, n: int) -> FakeCall:
        """The n-th call made, once it waits for its first message."""
        for _ in range(100):
            if len(self.made) >= n and self.made[n - 1].waiting:
                return self.made[n - 1]
            await asyncio.sleep(0)
        raise AssertionError(f"call {n} was never read ({len(self.made)} made)")


def to_domain(exc: grpc.RpcError):
    return convert(exc, "worker-1", 5, busy, stream=True)


async def final_to_dict(job) -> dict:
    return {"job_id": job.job_id, "output_bytes": job.output_bytes}


class Busy(Exception):
    pass


async def busy() -> Exception:
    return Busy("busy")


async def follow(relay: Relay, calls: Calls, offset: int = 0, timeout_s=3600.0):
    return await relay.follow(
        KEY, offset, calls, final_to_dict, busy, "worker-id", timeout_s
    )


def follow_soon(relay: Relay, calls: Calls, offset: int = 0) -> asyncio.Task:
    """Start following in a task (the first message may not be there yet)."""
    return asyncio.ensure_future(follow(relay, calls, offset))


async def first_follower(relay: Relay, calls: Calls, data: bytes = b"abc"):
    """The follower that opens the shared call, and that call, after ``data``."""
    task = follow_soon(relay, calls)
    call = await calls.wait(len(calls.made) + 1)
    call.data(0, data)
    return await task, call


async def read_all(stream) -> tuple[list, dict | None]:
    items = [item async for item in stream]
    return items, stream.final


async def rest_of(it) -> list:
    return [item async for item in it]


def collect(stream) -> asyncio.Task:
    """Read ``stream`` to its end in a task: (items, final)."""
    return asyncio.ensure_future(read_all(stream))


async def next_of(it):
    return await anext(it)


def text(items) -> bytes:
    return b"".join(d for _, d, _ in items)


def new_relay(
    window: int = 1 << 20,
    budget: int = 1 << 24,
    first_s: float = 5.0,
    write_bytes: int = 16384,
) -> Relay:
    return Relay(window, budget, first_s, write_bytes)


@run_async
async def test_followers_share_one_call_and_all_get_every_byte_and_the_final_status():
    relay, calls = new_relay(), Calls()
    first, call = await first_follower(relay, calls)
    followers = [first] + [await follow(relay, calls) for _ in range(3)]
    assert all(f.shared for f in followers)
    readers = [collect(f) for f in followers]
    call.data(3, b"def")
    call.keepalive(6)
    call.data(6, b"ghi")
    call.final(9)
    for items, final in await asyncio.gather(*readers):
        assert text(items) == b"abcdefghi"
        assert final == {"job_id": "job-id", "output_bytes": 9}
    assert len(calls.made) == 1
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0


@run_async
async def test_nobody_reads_ahead_of_the_followers():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    b = await follow(relay, calls)
    call.data(3, b"def")
    await settle()
    assert call.reads == 1  # the first message only: nobody wanted more yet
    a_it, b_it = aiter(a), aiter(b)
    assert await anext(a_it) == await anext(b_it) == (0, b"abc", 0)
    assert call.reads == 1  # served from the window
    # Both want bytes nobody has yet: one read serves them both (while they
    # still wait to be woken, the reading may go on: one more read is out).
    waiting = [asyncio.ensure_future(next_of(it)) for it in (a_it, b_it)]
    await settle()
    assert call.reads >= 2
    assert [await w for w in waiting] == [(3, b"def", 0), (3, b"def", 0)]
    reads = call.reads
    assert reads <= 3
    # Nobody waits now: what comes is taken by the read that is out, and no
    # further read is made.
    call.data(6, b"ghi")
    await settle()
    assert call.reads == reads
    a.close()
    b.close()


@run_async
async def test_keepalives_reach_every_idle_follower():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    b = await follow(relay, calls, offset=1)
    its = [aiter(a), aiter(b)]
    assert [await anext(it) for it in its] == [(0, b"abc", 0), (1, b"bc", 0)]
    call.keepalive(3)
    assert [await anext(it) for it in its] == [(3, b"", 0), (3, b"", 0)]
    call.keepalive(3)
    assert [await anext(it) for it in its] == [(3, b"", 0), (3, b"", 0)]
    call.final(3)
    assert [[x async for x in it] for it in its] == [[], []]
    assert a.final == b.final == {"job_id": "job-id", "output_bytes": 3}


@run_async
async def test_late_follower_inside_the_window_starts_at_its_offset_without_a_call():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls, b"hello ")
    reader = collect(a)
    call.data(6, b"world")
    await settle()
    late = await follow(relay, calls, offset=3)
    late_reader = collect(late)
    call.final(11)
    (items, _), (late_items, late_final) = await asyncio.gather(reader, late_reader)
    assert len(calls.made) == 1
    assert text(items) == b"hello world"
    assert late_items[0][0] == 3
    assert text(late_items) == b"lo world"
    assert late_final["output_bytes"] == 11


@run_async
async def test_follower_ahead_of_the_output_gets_bytes_from_its_offset_on():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls, b"0123")
    ahead = await follow(relay, calls, offset=6)
    reader = collect(ahead)
    call.data(4, b"4567")
    call.data(8, b"89")
    call.final(10)
    items, final = await reader
    a.close()
    # From its offset on, in one item or two (chunks that came between two
    # wake-ups are joined).
    assert items[0][0] == 6
    assert b"".join(data for _, data, _ in items) == b"6789"
    assert all(skipped == 0 for _, _, skipped in items)
    assert final["output_bytes"] == 10


@run_async
async def test_follower_before_the_window_gets_no_shared_stream():
    relay, calls = new_relay(window=4), Calls()
    a, call = await first_follower(relay, calls, b"aaaa")
    it = aiter(a)
    assert await anext(it) == (0, b"aaaa", 0)
    call.data(4, b"bbbb")  # pushes "aaaa" out of the window
    assert await anext(it) == (4, b"bbbb", 0)
    assert await follow(relay, calls, offset=2) is None
    assert len(calls.made) == 1
    inside = await follow(relay, calls, offset=5)  # inside: joins
    assert inside is not None
    assert len(calls.made) == 1
    a.close()
    inside.close()
    assert relay.kept_bytes == 0


@run_async
async def test_a_follower_refused_by_the_window_leaves_the_others_their_call():
    relay, calls = new_relay(window=4), Calls()
    a, call = await first_follower(relay, calls, b"aaaa")
    call.data(4, b"bbbb")
    it = aiter(a)
    assert [await anext(it) for _ in range(2)] == [(0, b"aaaa", 0), (4, b"bbbb", 0)]
    assert await follow(relay, calls, offset=0) is None
    assert not call.cancelled
    assert relay.upstreams() == 1
    a.close()
    assert call.cancelled


@run_async
async def test_slow_follower_that_falls_behind_continues_on_its_own_call():
    relay, calls = new_relay(window=6), Calls()
    fast, call = await first_follower(relay, calls, b"aaa")
    slow = await follow(relay, calls)
    slow_it = aiter(slow)
    assert await anext(slow_it) == (0, b"aaa", 0)  # then it stops reading a while
    fast_reader = collect(fast)
    for i, part in enumerate((b"bbb", b"ccc", b"ddd")):
        call.data(3 + 3 * i, part)
    call.final(12)
    fast_items, _ = await fast_reader
    assert text(fast_items) == b"aaabbbcccddd"
    # "bbb" left the window while the slow one was away: it gets its own call
    # from where it was, and the rest from there.
    rest = asyncio.ensure_future(rest_of(slow_it))
    own = await calls.wait(2)
    assert own.offset == 3
    assert not slow.shared
    own.data(3, b"bbbccc")
    own.data(9, b"ddd")
    own.final(12)
    rest_items = await rest
    assert text(rest_items) == b"bbbcccddd"
    assert slow.final["output_bytes"] == 12
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0


@run_async
async def test_gaps_are_reported_from_each_followers_position():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls, b"head")
    reader = collect(a)
    call.data(10, b"tail", skipped=6)  # bytes 4-9 were dropped by the cap
    await settle()
    mid_gap = await follow(relay, calls, offset=7)
    mid_reader = collect(mid_gap)
    call.final(14)
    (items, _), (mid_items, _) = await asyncio.gather(reader, mid_reader)
    assert items == [(0, b"head", 0), (10, b"tail", 6)]
    assert mid_items == [(10, b"tail", 3)]


@run_async
async def test_error_before_the_first_message_is_raised_to_every_waiting_follower():
    relay, calls = new_relay(), Calls()
    creator = follow_soon(relay, calls)
    call = await calls.wait(1)
    joiner = follow_soon(relay, calls)  # joins the same, not yet started call
    await settle()
    call.fail(grpc.StatusCode.NOT_FOUND)
    for result in await asyncio.gather(creator, joiner, return_exceptions=True):
        assert isinstance(result, NotFound)
    assert len(calls.made) == 1
    assert relay.upstreams() == 0


@run_async
async def test_first_message_too_late_is_diagnosed():
    relay, calls = new_relay(first_s=0), Calls()  # no time at all
    with pytest.raises(Busy):
        await follow(relay, calls)
    assert calls.made[0].cancelled
    assert relay.upstreams() == 0


@run_async
async def test_job_that_already_ended_gives_its_end_and_the_next_follower_a_new_call():
    relay, calls = new_relay(), Calls()
    creator = follow_soon(relay, calls, offset=5)
    call = await calls.wait(1)
    call.final(5)
    f = await creator
    assert await read_all(f) == ([], {"job_id": "job-id", "output_bytes": 5})
    assert relay.upstreams() == 0
    follow_soon(relay, calls, offset=5)
    await calls.wait(2)  # not the ended one
    assert relay.upstreams() == 1


@run_async
async def test_error_in_mid_stream_ends_each_follower_after_the_bytes_before_it():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    b = await follow(relay, calls)
    got: dict = {a: [], b: []}

    async def read(f):
        async for item in f:
            got[f].append(item)

    readers = [asyncio.ensure_future(read(f)) for f in (a, b)]
    call.fail(grpc.StatusCode.UNAVAILABLE)
    for result in await asyncio.gather(*readers, return_exceptions=True):
        assert isinstance(result, Unavailable)
        assert "worker-1" in result.message
    assert got[a] == got[b] == [(0, b"abc", 0)]
    # A follower arriving now starts a new call rather than join a failed one.
    c, second = await first_follower(relay, calls)
    assert second is calls.made[1]
    c.close()
    assert relay.kept_bytes == 0


@run_async
async def test_shared_call_running_out_of_time_hands_followers_their_own_calls():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    reader = collect(a)
    call.fail(grpc.StatusCode.DEADLINE_EXCEEDED)
    own = await calls.wait(2)
    assert own.offset == 3
    own.data(3, b"def")
    own.final(6)
    items, final = await reader
    assert text(items) == b"abcdef"
    assert final["output_bytes"] == 6


@run_async
async def test_shared_call_cancelled_under_the_followers_ends_them_with_an_error():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    reader = collect(a)
    await settle()
    call.items.put_nowait(CANCEL)  # as when the channel is torn down
    with pytest.raises(DeadlineExceeded):
        await reader


@run_async
async def test_follower_past_its_longest_time_ends_with_stream_expired():
    relay, calls = new_relay(), Calls()
    creator = asyncio.ensure_future(follow(relay, calls, timeout_s=0))
    call = await calls.wait(1)
    call.data(0, b"abc")
    f = await creator
    it = aiter(f)
    assert await anext(it) == (0, b"abc", 0)  # what the window holds
    with pytest.raises(StreamExpired):
        await anext(it)
    assert call.cancelled
    assert relay.upstreams() == 0


@run_async
async def test_last_follower_leaving_cancels_the_call():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    b = await follow(relay, calls)
    a_it = aiter(a)
    assert await anext(a_it) == (0, b"abc", 0)
    await a_it.aclose()  # the client went away mid-stream
    assert not call.cancelled
    assert relay.upstreams() == 1
    b.close()
    assert call.cancelled
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0


@run_async
async def test_follower_cancelled_mid_read_does_not_cancel_the_call_of_the_others():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    b = await follow(relay, calls)
    a_it, b_it = aiter(a), aiter(b)
    assert await anext(a_it) == await anext(b_it) == (0, b"abc", 0)
    a_next = asyncio.ensure_future(next_of(a_it))  # it pulls the next message
    await settle()
    assert call.waiting
    b_next = asyncio.ensure_future(next_of(b_it))
    await settle()
    a_next.cancel()  # its client went away while it waited
    await settle()
    assert a_next.cancelled()
    assert not call.cancelled
    assert relay.upstreams() == 1
    call.data(3, b"def")
    assert await b_next == (3, b"def", 0)
    call.final(6)
    assert await rest_of(b_it) == []
    assert b.final == {"job_id": "job-id", "output_bytes": 6}
    assert len(calls.made) == 1


@run_async
async def test_only_follower_cancelled_mid_read_cancels_the_call_and_frees_its_window():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    it = aiter(a)
    assert await anext(it) == (0, b"abc", 0)
    reading = asyncio.ensure_future(next_of(it))
    await settle()
    reading.cancel()
    await settle()
    assert reading.cancelled()
    assert call.cancelled
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0


@run_async
async def test_creator_cancelled_before_the_first_message_leaves_others_the_call():
    relay, calls = new_relay(), Calls()
    creator = follow_soon(relay, calls)
    call = await calls.wait(1)
    joiner = follow_soon(relay, calls)
    await settle()
    creator.cancel()  # the first client went away before any byte
    await settle()
    assert creator.cancelled()
    assert not call.cancelled
    call.data(0, b"abc")
    f = await joiner
    assert await anext(aiter(f)) == (0, b"abc", 0)
    assert len(calls.made) == 1
    f.close()
    assert call.cancelled
    assert relay.upstreams() == 0


@run_async
async def test_joiner_cancelled_before_the_first_message_leaves_creator_the_call():
    relay, calls = new_relay(), Calls()
    creator = follow_soon(relay, calls)
    call = await calls.wait(1)
    joiner = follow_soon(relay, calls)
    await settle()
    joiner.cancel()
    await settle()
    assert joiner.cancelled()
    assert not call.cancelled
    call.data(0, b"abc")
    f = await creator
    assert await anext(aiter(f)) == (0, b"abc", 0)
    f.close()
    assert call.cancelled


@run_async
async def test_every_follower_cancelled_before_the_first_message_cancels_the_call():
    relay, calls = new_relay(), Calls()
    creator = follow_soon(relay, calls)
    call = await calls.wait(1)
    joiner = follow_soon(relay, calls)
    await settle()
    creator.cancel()
    joiner.cancel()
    await settle()
    assert call.cancelled
    assert relay.upstreams() == 0
    # The next follower starts afresh.
    f, second = await first_follower(relay, calls)
    assert second is calls.made[1]
    f.close()


@run_async
async def test_budget_over_all_jobs_drops_the_oldest_chunks():
    relay, calls = new_relay(window=100, budget=8), Calls()
    a, call = await first_follower(relay, calls, b"aaaa")
    it = aiter(a)
    assert await anext(it) == (0, b"aaaa", 0)
    for i in range(1, 4):
        call.data(4 * i, b"xxxx")
        assert await anext(it) == (4 * i, b"xxxx", 0)
    assert relay.kept_bytes <= 8
    assert await follow(relay, calls, offset=0) is None  # dropped
    a.close()
    assert relay.kept_bytes == 0


@run_async
async def test_disabled_relay_shares_nothing():
    for relay in (new_relay(window=0), new_relay(budget=0)):
        calls = Calls()
        assert await follow(relay, calls) is None
        assert calls.made == []


@run_async
async def test_lagging_follower_gets_what_it_missed_joined_up_to_a_gap():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls, b"ab")
    lagging = await follow(relay, calls)
    a_it = aiter(a)
    assert await anext(a_it) == (0, b"ab", 0)
    for offset, data, skipped in ((2, b"cd", 0), (4, b"ef", 0), (9, b"xy", 3)):
        call.data(offset, data, skipped)
        assert await anext(a_it) == (offset, data, skipped)
    call.final(11)
    assert await read_all(lagging) == (
        [(0, b"abcdef", 0), (9, b"xy", 3)],
        {"job_id": "job-id", "output_bytes": 11},
    )
    a.close()


@run_async
async def test_lagging_follower_gets_joined_items_no_larger_than_write_bytes():
    relay, calls = new_relay(write_bytes=4), Calls()
    a, call = await first_follower(relay, calls, b"ab")
    lagging = await follow(relay, calls)
    a_it = aiter(a)
    assert await anext(a_it) == (0, b"ab", 0)
    for offset, data in ((2, b"cd"), (4, b"efghij"), (10, b"kl"), (12, b"mn")):
        call.data(offset, data)
        assert await anext(a_it) == (offset, data, 0)
    call.final(14)
    items, _ = await read_all(lagging)
    # Joined up to 4 bytes; a larger chunk passes whole.
    assert items == [(0, b"abcd", 0), (4, b"efghij", 0), (10, b"klmn", 0)]
    a.close()


@run_async
async def test_window_is_given_back_when_the_last_follower_leaves_as_a_chunk_arrives():
    relay, calls = new_relay(), Calls()
    a, call = await first_follower(relay, calls)
    it = aiter(a)
    assert await anext(it) == (0, b"abc", 0)
    reading = asyncio.ensure_future(next_of(it))  # pulls the next message
    await settle()
    call.data(3, b"def")  # the worker's next chunk is taken off the wire...
    a.close()  # ...as the client goes away, in the same turn of the loop
    await settle()
    await asyncio.gather(reading, return_exceptions=True)
    assert call.cancelled
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0


@run_async
async def test_window_is_given_back_when_the_creator_leaves_as_the_first_chunk_comes():
    relay, calls = new_relay(), Calls()
    creator = follow_soon(relay, calls)
    call = await calls.wait(1)
    creator.cancel()  # the client goes away...
    call.data(0, b"abc")  # ...as the first chunk comes, in the same turn
    await settle()
    assert creator.cancelled()
    assert call.cancelled
    assert relay.upstreams() == 0
    assert relay.kept_bytes == 0


class RecordingLoop:
    """Records what :func:`scheduler.relay._wake` schedules, to run by hand."""

    def __init__(self):
        self.later: list[tuple[float, tuple]] = []
        self.soon: list[tuple] = []

    def call_later(self, delay, fn, *args):
        self.later.append((delay, (fn, *args)))

    def call_soon(self, fn, *args):
        self.soon.append((fn, *args))


def test_wake_ups_of_a_round_are_a_slice_at_a_time_a_step_apart():
    from scheduler import relay

    loop = asyncio.new_event_loop()
    try:
        waiters = [loop.create_future() for _ in range(2 * relay.WAKE_SLICE + 1)]
        waiters[relay.WAKE_SLICE].cancel()  # a follower that left meanwhile
        rec = RecordingLoop()

        def woken():
            return sum(w.done() and not w.cancelled() for w in waiters)

        relay._wake(rec, waiters, 0, 0.002)
        assert woken() == relay.WAKE_SLICE
        assert not rec.soon
        [(delay, (fn, *args))] = rec.later
        assert delay == 0.002
        rec.later.clear()
        fn(*args)
        assert woken() == 2 * relay.WAKE_SLICE - 1
        [(_, (fn, *args))] = rec.later
        rec.later.clear()
        fn(*args)
        assert all(w.done() for w in waiters) and not rec.later
    finally:
        loop.close()


def test_wake_ups_without_a_step_take_one_slice_per_turn_of_the_loop():
    from scheduler import relay

    loop = asyncio.new_event_loop()
    try:
        waiters = [loop.create_future() for _ in range(relay.WAKE_SLICE + 1)]
        rec = RecordingLoop()
        relay._wake(rec, waiters, 0, 0.0)
        assert not rec.later and len(rec.soon) == 1
        fn, *args = rec.soon[0]
        fn(*args)
        assert all(w.done() for w in waiters)
    finally:
        loop.close()


@run_async
async def test_many_followers_all_get_each_chunk_and_the_end_with_wake_ups_spread():
    from scheduler import relay as relay_module

    relay, calls = new_relay(), Calls()
    first, call = await first_follower(relay, calls)
    n = 4 * relay_module.WAKE_SLICE
    followers = [first] + [await follow(relay, calls) for _ in range(n - 1)]
    readers = [collect(f) for f in followers]
    for k in range(3):
        call.data(3 + k, b"d")
        await asyncio.sleep(0.02)  # more than this round's spread (n*0.12 ms)
    call.final(6)
    for items, final in await asyncio.wait_for(asyncio.gather(*readers), 10):
        assert text(items) == b"abcddd"
        assert final == {"job_id": "job-id", "output_bytes": 6}
    assert len(calls.made) == 1
