"""One HTTP follower of a job's output, as :mod:`scheduler.relay` serves it.

A follower reads the window of the upstream it joined; when it falls behind
the window, or the shared call ran out of time before the follower's own
stream did, it goes on with a call of its own from where it was. Its stream
lasts at most ``[workers].stream_timeout_s`` from when it began, however it
is served: past that it ends with :class:`~jobgate.errors.StreamExpired`.
Errors it raises are domain errors (:mod:`jobgate.errors`): the calls it
reads convert the worker's (:mod:`scheduler.worker_errors`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc

from jobgate.errors import StreamExpired

if TYPE_CHECKING:
    from scheduler.relay import Chunk, FinalToDict, OpenCall, Relay, Upstream

log = logging.getLogger(__name__)


class Follower:
    """One HTTP follower: reads its upstream's window, or a call of its own.

    The same interface as :class:`scheduler.usecases.OutputStream`: iterate
    it (or :attr:`chunks`, which the HTTP layer may wrap) with ``async for``
    for ``(offset, data, skipped)``; :attr:`final` is the job's status once
    the stream has ended; :meth:`close` lets go of the stream.
    """

    def __init__(
        self,
        relay: Relay,
        up: Upstream,
        offset: int,
        open_call: OpenCall,
        final_to_dict: FinalToDict,
        worker_id: str,
        deadline: float,
    ):
        self.worker_id = worker_id
        self.final: dict | None = None
        self.chunks: AsyncIterator[Chunk] = self._iterate()
        self._relay = relay
        self._up: Upstream | None = up
        self._pos = offset
        self._seq = 0
        self._keepalives = 0
        self._open_call = open_call
        self._final_to_dict = final_to_dict
        self._deadline = deadline
        self._waiter: asyncio.Future | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._own_call: Any = None
        self._closed = False

    @property
    def shared(self) -> bool:
        """Whether this follower still reads the shared window."""
        return self._up is not None

    def attach(self) -> bool:
        """Find where to start in the window; False if the offset is before it."""
        up = self._up
        seq = up.first_seq(self._pos)
        if seq is None:
            return False
        self._seq = seq
        self._keepalives = up.keepalives
        return True

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self.chunks

    async def _iterate(self) -> AsyncIterator[Chunk]:
        try:
            if self._up is not None:
                async for item in self._from_window():
                    yield item
            if not self._closed and self._up is None and self.final is None:
                async for item in self._from_own_call():
                    yield item
        finally:
            self.close()

    async def _from_window(self) -> AsyncIterator[Chunk]:
        up = self._up
        while True:
            item, fallback = await self._next(up)
            if fallback:
                self._leave()
                return
            if item is None:
                return
            yield item

    async def _next(self, up: Upstream) -> tuple[Chunk | None, bool]:
        """The next item from the window: (item, False), (None, False) at the
        end, (None, True) when this follower must continue on its own call."""
        while True:
            if self._closed or up.cancelled:
                return None, False
            chunk = up.chunks.get(self._seq)
            if chunk is not None:
                self._seq += 1
                item = self._clip(chunk)
                if item is not None:
                    return self._gather(up, item), False
                continue
            if self._seq < up.base:
                seq = up.first_seq(self._pos)
                if seq is None:
                    return None, True  # fell behind: the window moved on
                self._seq = seq
                continue
            if up.done:
                return self._ended(up)
            if up.keepalives != self._keepalives:
                self._keepalives = up.keepalives
                return (self._pos, b"", 0), False
            if self._expired():
                raise StreamExpired()
            waiter = self._waiter = up.changed()
            if self._timer is None:
                # One timer for the stream's whole life, not one per wait.
                loop = asyncio.get_running_loop()
                self._timer = loop.call_at(
                    loop.time() + self._deadline - time.monotonic(), self._wake
                )
            up.waiting += 1
            up.pull()
            try:
                await waiter
            finally:
                up.waiting -= 1
                self._waiter = None

    def _gather(self, up: Upstream, item: Chunk) -> Chunk:
        """``item`` joined with the chunks right after it.

        A follower that lags gets what it missed in a few large writes rather
        than in as many small ones as the job made, as it would from a call
        of its own; a gap ends the gathering, so it keeps its notice.
        """
        offset, data, skipped = item
        parts, size = [data], len(data)
        limit = self._relay.write_bytes
        while True:
            chunk = up.chunks.get(self._seq)
            if chunk is None:
                break
            next_offset, next_data, next_skipped = chunk
            if next_skipped or next_offset != self._pos:
                break
            if size + len(next_data) > limit:
                break
            parts.append(next_data)
            size += len(next_data)
            self._pos = next_offset + len(next_data)
            self._seq += 1
        if len(parts) == 1:
            return item
        return offset, b"".join(parts), skipped

    def _clip(self, chunk: Chunk) -> Chunk | None:
        """``chunk`` as this follower sees it from its position, or None."""
        offset, data, _ = chunk
        end = offset + len(data)
        pos = self._pos
        if end <= pos:
            return None  # all before this follower's offset
        self._pos = end
        if offset >= pos:
            return offset, data, offset - pos
        return pos, data[pos - offset :], 0

    def _ended(self, up: Upstream) -> tuple[Chunk | None, bool]:
        """At the end of the window of an upstream that ended."""
        if up.error is None:
            self.final = up.final
            return None, False
        if isinstance(up.error, StreamExpired) and time.monotonic() < self._deadline:
            # The shared call ran out of time before this follower did.
            return None, True
        raise up.error.with_traceback(None)

    def _leave(self) -> None:
        up, self._up = self._up, None
        if up is not None:
            self._relay.detach(up)

    async def _from_own_call(self) -> AsyncIterator[Chunk]:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise StreamExpired()
        log.debug("an output follower continues on a call of its own at %d", self._pos)
        call = self._own_call = self._open_call(self._pos, remaining)
        while True:
            msg = await call.read()
            if msg is grpc.aio.EOF:
                return
            if msg.HasField("final"):
                self.final = await self._final_to_dict(msg.final)
                return  # the last message of a stream
            yield msg.offset, msg.data, msg.skipped

    def _expired(self) -> bool:
        return time.monotonic() >= self._deadline

    def _wake(self) -> None:
        """The stream's time is up: wake the follower to end it."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._leave()
        if self._own_call is not None:
            self._own_call.cancel()
