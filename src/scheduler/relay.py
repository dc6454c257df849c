"""Followers of one job in one HTTP process share one stream from the worker.

Without sharing, each HTTP follower of a job holds its own ``StreamOutput``
call, and each call buffers what the worker sent until its follower takes it:
ten thousand followers of a chatty job would cost the scheduler ten thousand
copies of the output in flight and the worker ten thousand streams. The relay
opens one upstream call per (worker, job) and keeps a bounded window of the
newest chunks; every follower reads the window at its own pace.

- A follower that asks for an offset inside the window (or past it) joins.
- A follower that asks for an offset before the window is not served here
  (:meth:`Relay.follow` returns ``None``): it gets a call of its own.
- A follower that falls behind (the bytes it needs next were dropped from
  the window) leaves and continues on a call of its own from where it was.
- Nobody reads upstream in the background: the first follower that wants
  bytes nobody has yet pulls the next message while the others wait, so with
  every follower busy writing to its client, flow control holds the worker
  back just as with a call of one's own.
- The upstream call is cancelled when its last follower leaves.

Everything runs on the HTTP process's event loop: state changes between two
``await`` points are atomic, so there are no locks; a follower with nothing
to read awaits a future that the next change resolves.

A follower (:class:`scheduler.follower.Follower`) yields what
:class:`scheduler.usecases.OutputStream` yields, ``(offset, data, skipped)``,
with an empty ``data`` for each keep-alive the worker sends while the job is
quiet; ``final`` is the job's status once the stream ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import grpc

from jobgate.errors import DeadlineExceeded
from scheduler.follower import Follower

log = logging.getLogger(__name__)

# Wake-ups of an upstream's followers are spaced so that they take at most
# about a quarter of a process's time: in bench scenario 5 (10,000 followers
# of one job, 5,000 per HTTP process) waking one follower and writing its
# bytes cost about 60 microseconds of the process's CPU, so the gap is 240
# microseconds per follower, and at most a second (see Upstream._notify_soon).
# 120 microseconds had status p99 at 20 ms beside the followers, 240 at 16.
NOTIFY_GAP_PER_FOLLOWER_S = 240e-6
MAX_NOTIFY_GAP_S = 1.0
# Followers woken at a time (see _wake). Scenario 5's status p99 with 32 (in
# the same turn of the event loop, one slice after the other) was 44 ms, with
# 4 26 ms; spread over half the gap (SPREAD_PART), 21 ms with 32 and 19 with 8.
WAKE_SLICE = 8
# The wake-ups of one round are spread over this part of the gap, a slice at
# a time, so that a round's writes (and its readers' reads) load the cores
# evenly instead of in bursts (see Upstream._notify).
SPREAD_PART = 0.5

Chunk = tuple[int, bytes, int]  # offset, data, bytes skipped just before offset

# open_call(offset, timeout_s): a new follow call of the job's output from
# ``offset``; ``await call.read()`` gives OutputChunk messages, then
# ``grpc.aio.EOF``; it has cancel().
OpenCall = Callable[[int, float], Any]
FinalToDict = Callable[[Any], Awaitable[dict]]


class Relay:
    """The shared upstream calls of one process, by key (worker and job).

    ``window_bytes`` bounds the recent output each upstream keeps for its
    followers; ``budget_bytes`` bounds what all upstreams keep together (an
    upstream over either gives up its oldest chunks, always keeping its newest
    one). ``first_message_timeout_s`` is how long a new upstream may take to
    produce its first message before it is cancelled and diagnosed. A
    follower that lags gets consecutive chunks joined into items of at most
    ``write_bytes`` (larger chunks pass whole).
    """

    def __init__(
        self,
        window_bytes: int,
        budget_bytes: int,
        first_message_timeout_s: float,
        write_bytes: int = 16384,
    ):
        self.window_bytes = window_bytes
        self.write_bytes = write_bytes
        self.budget_bytes = budget_bytes
        self.first_message_timeout_s = first_message_timeout_s
        self._upstreams: dict[Hashable, Upstream] = {}
        self.kept_bytes = 0

    @property
    def enabled(self) -> bool:
        return self.window_bytes > 0 and self.budget_bytes > 0

    async def follow(
        self,
        key: Hashable,
        offset: int,
        open_call: OpenCall,
        final_to_dict: FinalToDict,
        diagnose: Callable[[], Awaitable[Exception]],
        worker_id: str,
        stream_timeout_s: float,
    ) -> Follower | None:
        """A follower of ``key`` from ``offset``, or None if it needs its own call.

        Errors before the first message (a missing job, a worker that does
        not answer in time) are raised here, as a call of one's own would.
        """
        if not self.enabled:
            return None
        deadline = time.monotonic() + stream_timeout_s
        up = self._upstreams.get(key)
        if up is not None and up.finished:
            del self._upstreams[key]
            up = None
        creator = up is None
        if creator:
            up = Upstream(self, key, offset, open_call, final_to_dict, stream_timeout_s)
            self._upstreams[key] = up
        up.followers += 1
        follower = Follower(
            self, up, offset, open_call, final_to_dict, worker_id, deadline
        )
        try:
            if creator:
                await up.start(diagnose)
            elif not await up.wait_started():
                follower.close()
                return None
            if not follower.attach():
                follower.close()
                return None
        except BaseException:
            follower.close()
            raise
        return follower

    def detach(self, up: Upstream) -> None:
        """One follower left ``up``; the last one cancels its call."""
        up.followers -= 1
        if up.followers == 0:
            if self._upstreams.get(up.key) is up:
                del self._upstreams[up.key]
            up.cancel()

    def forget(self, up: Upstream) -> None:
        """``up`` has ended: later followers start a new upstream."""
        if self._upstreams.get(up.key) is up:
            del self._upstreams[up.key]

    def account(self, delta: int) -> int:
        """Add ``delta`` to the bytes kept by all upstreams; returns the excess."""
        self.kept_bytes += delta
        return self.kept_bytes - self.budget_bytes

    def upstreams(self) -> int:
        return len(self._upstreams)


class Upstream:
    """One ``StreamOutput`` call and the window of its newest chunks.

    Chunks are numbered in arrival order; ``base`` is the number of the
    oldest kept, ``next_seq`` that of the next to come. ``lo`` is the first
    position the window still covers: a follower at a position before it can
    no longer be served from here.
    """

    def __init__(
        self,
        relay: Relay,
        key: Hashable,
        offset: int,
        open_call: OpenCall,
        final_to_dict: FinalToDict,
        timeout_s: float,
    ):
        self.relay = relay
        self.key = key
        self.followers = 0
        self.chunks: dict[int, Chunk] = {}
        self.base = 0
        self.next_seq = 0
        self.lo = offset
        self.hi = offset  # the position just past the newest chunk
        self.kept = 0
        self.keepalives = 0
        self.started = False
        self.pulling = False
        self.done = False  # the call ended: final, or error
        self.final: dict | None = None
        self.error: BaseException | None = None
        self.failed_first = False  # the call failed before its first message
        self.cancelled = False
        self._waiters: list[asyncio.Future] = []
        self._notify_handle: asyncio.TimerHandle | None = None
        self._notified_at = 0.0
        self.unseen = 0  # bytes taken since the followers were last woken
        self.waiting = 0  # followers waiting for the next chunk, or just woken
        self._start_task: asyncio.Future | None = None
        self._final_to_dict = final_to_dict
        self._offset = offset
        self._open_call = open_call
        self._timeout_s = timeout_s
        self.call: Any = None

    @property
    def finished(self) -> bool:
        return self.done or self.cancelled

    def changed(self) -> asyncio.Future:
        """A future of the caller's own, resolved at the next change.

        One each, rather than one shared: a follower whose client leaves is
        cancelled while it waits, and must cancel nobody else's wait.
        """
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def _notify_soon(self) -> None:
        """Wake the followers for new output, at most once per gap.

        With thousands of followers of a chatty job, waking them all for
        every message would take the event loop's whole time, and every
        other request of the process would wait. So wake-ups are spaced by
        a gap that grows with the followers (nothing for one, 24 ms for 100,
        a second for 4,200 and more: NOTIFY_GAP_PER_FOLLOWER_S), and each
        wake-up carries all that came meanwhile; a full write's worth
        (``write_bytes``) is passed on at once.
        """
        if self.unseen >= self.relay.write_bytes:
            self._notify(spread=True)  # a full write's worth: no reason to wait
            return
        if self._notify_handle is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._notified_at + self._gap() - loop.time()
        if wait <= 0:
            self._notify(spread=True)
        else:
            self._notify_handle = loop.call_later(wait, self._notify, True)

    def _gap(self) -> float:
        return min(self.followers * NOTIFY_GAP_PER_FOLLOWER_S, MAX_NOTIFY_GAP_S)

    def _notify(self, spread: bool = False) -> None:
        """Wake every waiting follower; for new output, ``spread`` over a
        part of the gap (SPREAD_PART), at the end of the stream at once."""
        if self._notify_handle is not None:
            self._notify_handle.cancel()
            self._notify_handle = None
        loop = asyncio.get_running_loop()
        self._notified_at = loop.time()
        self.unseen = 0
        waiters, self._waiters = self._waiters, []
        step = 0.0
        if spread and len(waiters) > WAKE_SLICE:
            step = self._gap() * SPREAD_PART * WAKE_SLICE / len(waiters)
        _wake(loop, waiters, 0, step)

    # -- the first message ----------------------------------------------------

    async def start(self, diagnose: Callable[[], Awaitable[Exception]]) -> None:
        """Open the call and take its first message (by the first follower).

        The reading runs in a task of the upstream's own, here and in
        :meth:`pull`: a follower whose client leaves mid-read is cancelled,
        and must not cancel the call the other followers share.
        """
        self._start_task = asyncio.ensure_future(self._first(diagnose))
        await asyncio.shield(self._start_task)

    async def _first(self, diagnose: Callable[[], Awaitable[Exception]]) -> None:
        try:
            self.call = self._open_call(self._offset, self._timeout_s)
        except BaseException as exc:
            self._finish(error=exc, first=True)
            raise
        self.pulling = True
        try:
            msg = await asyncio.wait_for(
                self.call.read(), self.relay.first_message_timeout_s
            )
        except TimeoutError:
            self.call.cancel()
            error = await diagnose()
            self._finish(error=error, first=True)
            raise error from None
        except BaseException as exc:
            self._finish(error=exc, first=True)
            raise
        self.pulling = False
        await self._took(msg)

    async def wait_started(self) -> bool:
        """Wait for the first message; raise the error the first follower got.

        False if the call failed after its first message: the follower had
        better open a call of its own than join a stream that ends in error.
        """
        while not self.started:
            await self.changed()
        if self.error is None:
            return True
        if self.failed_first:
            raise self.error.with_traceback(None)
        return False

    # -- pulling ----------------------------------------------------------------

    def pull(self) -> None:
        """Have messages taken from the call, unless that is under way.

        Called by a follower that needs bytes nobody has yet; it then waits
        for :meth:`changed` like every other follower. The reading goes on
        while any follower waits for more (one woken by the last message
        counts until it has run), so a chatty job's messages are taken as
        they come, not one per round of every follower; when every follower
        is busy writing to its client, it stops, and flow control holds the
        worker back.
        """
        if not self.pulling and not self.done:
            self.pulling = True
            asyncio.ensure_future(self._pull())

    async def _pull(self) -> None:
        try:
            while not self.done and not self.cancelled:
                try:
                    msg = await self.call.read()
                except asyncio.CancelledError:
                    self._finish(
                        error=DeadlineExceeded("the output stream was cancelled")
                    )
                    return
                except BaseException as exc:  # noqa: BLE001 - followers re-raise it
                    self._finish(error=exc)
                    return
                await self._took(msg)
                # Let the woken followers take it; whoever is still short of
                # bytes afterwards is waiting again.
                await asyncio.sleep(0)
                # Nobody short of bytes, or half a window not yet shown to
                # anyone: wait for the followers rather than read further
                # ahead of them.
                if self.waiting == 0 or self.unseen * 2 >= self.relay.window_bytes:
                    break
        finally:
            self.pulling = False

    async def _took(self, msg) -> None:
        if msg is grpc.aio.EOF or msg is None:
            self._finish()
            return
        if msg.HasField("final"):
            try:
                final = await self._final_to_dict(msg.final)
            except BaseException as exc:  # noqa: BLE001 - followers re-raise it
                self._finish(error=exc)
                return
            self._finish(final=final)
            return
        self.started = True
        if msg.data:
            self._append((msg.offset, msg.data, msg.skipped))
        else:
            self.keepalives += 1
        self._notify_soon()

    def _append(self, chunk: Chunk) -> None:
        """Keep ``chunk``; drop the oldest chunks over the limits."""
        if self.cancelled:
            # A read under way when the last follower left: the window was
            # given back already, and nobody will read this.
            return
        offset, data, _ = chunk
        self.chunks[self.next_seq] = chunk
        self.next_seq += 1
        self.hi = offset + len(data)
        self.kept += len(data)
        self.unseen += len(data)
        excess = self.relay.account(len(data))
        freed = 0
        while self.next_seq - self.base > 1 and (
            self.kept > self.relay.window_bytes or excess - freed > 0
        ):
            old_offset, old_data, _ = self.chunks.pop(self.base)
            self.base += 1
            self.lo = old_offset + len(old_data)
            self.kept -= len(old_data)
            freed += len(old_data)
        if freed:
            self.relay.account(-freed)

    def _finish(
        self,
        final: dict | None = None,
        error: BaseException | None = None,
        first: bool = False,
    ) -> None:
        self.pulling = False
        self.started = True
        self.done = True
        self.final = final
        self.error = error
        if first:
            self.failed_first = error is not None
        self._notify()
        self.relay.forget(self)

    def cancel(self) -> None:
        """Cancel the call and give back the window (the last follower left)."""
        self.cancelled = True
        kept, self.kept = self.kept, 0
        self.chunks.clear()
        if kept:
            self.relay.account(-kept)
        self._notify()
        if self.call is not None:
            self.call.cancel()

    # -- what followers see ---------------------------------------------------

    def first_seq(self, pos: int) -> int | None:
        """The number of the first chunk a follower at ``pos`` needs.

        None when ``pos`` lies before the window.
        """
        if pos < self.lo:
            return None
        seq = self.base
        while seq < self.next_seq:
            offset, data, _ = self.chunks[seq]
            if offset + len(data) > pos:
                break
            seq += 1
        return seq


def _wake(
    loop: asyncio.AbstractEventLoop, waiters: list, start: int, step: float
) -> None:
    """Wake ``waiters`` a slice at a time, ``step`` seconds apart (0: a slice
    per turn of the event loop).

    Thousands of followers woken in one turn would make that turn as long as
    all their writes together, and every other request on the process would
    wait for it; a slice at a time, other requests get a turn in between.
    """
    end = start + WAKE_SLICE
    for waiter in waiters[start:end]:
        if not waiter.done():
            waiter.set_result(None)
    if end < len(waiters):
        if step > 0:
            loop.call_later(step, _wake, loop, waiters, end, step)
        else:
            loop.call_soon(_wake, loop, waiters, end, step)
