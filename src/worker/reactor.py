"""One thread that waits on many file descriptors and deadlines at once.

The job runner watches every running job through it: the job's output pipe
and a pidfd that becomes readable when the job's main process exits, plus
deadlines (timeouts, the SIGTERM to SIGKILL grace, the output drain). One
thread with ``epoll`` costs the same whether ten jobs run or a thousand, where
a thread per job made hundreds of threads compete for the GIL: with 200 jobs
(bench scenario 7) the worker went from 410 threads to 11 and the status p99
from 82 to 35 ms.

Callbacks run on the reactor's thread and must not block. Other threads hand
work to it with :meth:`Reactor.call_soon` and :meth:`Reactor.call_later`; an
eventfd wakes the loop. An exception in a callback is logged and the loop goes
on: one failing job never stops the others from being watched.

:meth:`Reactor.close` runs the calls handed over before it in a last round, so
none is lost; deadlines still pending are dropped, and later calls raise.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Timer:
    """A deadline on the reactor; :meth:`cancel` may be called from any thread."""

    __slots__ = ("when", "fn", "args", "cancelled", "_reactor")

    def __init__(self, reactor: Reactor, when: float, fn: Callable, args: tuple):
        self._reactor = reactor
        self.when = when
        self.fn = fn
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        with self._reactor._lock:
            if not self.cancelled:
                self.cancelled = True
                self.fn = self.args = None  # drop references to the job early
                self._reactor._cancelled += 1


class Reactor:
    """An epoll loop with deadlines, on a thread of its own."""

    def __init__(self, name: str = "job-reactor"):
        self._selector = selectors.EpollSelector()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._selector.register(self._wake_fd, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: collections.deque = collections.deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._cancelled = 0  # cancelled timers still in the heap
        self._seq = itertools.count()
        self._woken = False
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- from any thread --------------------------------------------------------

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def call_soon(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the reactor's thread, soon."""
        with self._lock:
            if self._closing:
                raise RuntimeError("the reactor is closed")
            self._calls.append((fn, args))
            self._wake()

    def call_later(self, delay: float, fn: Callable, *args) -> Timer:
        """Run ``fn(*args)`` on the reactor's thread after ``delay`` seconds."""
        timer = Timer(self, time.monotonic() + max(delay, 0.0), fn, args)
        with self._lock:
            if self._closing:
                raise RuntimeError("the reactor is closed")
            first = not self._timers or timer.when < self._timers[0][0]
            heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
            if first and not self.in_loop():
                self._wake()
        return timer

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop and release its descriptors (registered ones stay open).

        Calls handed over before run first; pending deadlines are dropped.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._woken = False
            self._wake()
        if not self.in_loop():
            self._thread.join(timeout)

    def _wake(self) -> None:
        # Under _lock: the loop closes the eventfd under it too, so a write
        # never reaches a closed descriptor (or one reused for something else).
        if not self._woken and self._wake_fd >= 0:
            self._woken = True
            os.eventfd_write(self._wake_fd, 1)

    # -- on the reactor's thread ------------------------------------------------

    def add_reader(self, fd: int, fn: Callable[[], None]) -> None:
        """Call ``fn()`` whenever ``fd`` is readable (or at its end or error)."""
        self._selector.register(fd, selectors.EVENT_READ, fn)

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd``; do this before closing it."""
        try:
            self._selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _run(self) -> None:
        while True:
            try:
                if self._iterate():
                    break
            except Exception:  # noqa: BLE001 - the loop must outlive any error
                log.exception("the job reactor hit an error; it keeps running")
                time.sleep(0.01)  # never spin on an error that repeats
        # Calls handed over before close() still run, so that none is lost.
        self._run_calls()
        with self._lock:
            self._selector.close()
            os.close(self._wake_fd)
            self._wake_fd = -1
            self._calls.clear()
            self._timers.clear()

    def _iterate(self) -> bool:
        """One round of waiting and dispatching; True once closed."""
        timeout = None
        with self._lock:
            if self._calls:
                timeout = 0
            elif self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            closing = self._closing
        if closing:
            return True
        for key, _ in self._selector.select(timeout):
            fn = key.data
            if fn is None:
                self._clear_wake()
                continue
            _guard(fn, ())
        self._run_timers()
        self._run_calls()
        return False

    def _clear_wake(self) -> None:
        # Read, then clear the flag: whatever was handed over meanwhile is
        # picked up by this round (calls) or the next wait (timers).
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        with self._lock:
            self._woken = False

    def _run_timers(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            timers = self._timers
            while timers and timers[0][0] <= now:
                timer = heapq.heappop(timers)[2]
                if timer.cancelled:
                    self._cancelled -= 1
                else:
                    due.append((timer.fn, timer.args))
                    timer.cancelled = True  # fired: a later cancel() does nothing
            # Cancelled timers wait in the heap until their time; drop them
            # once they are most of it, so long timeouts of jobs that ended
            # early do not pile up.
            if self._cancelled > 64 and self._cancelled * 2 > len(timers):
                self._timers = [t for t in timers if not t[2].cancelled]
                heapq.heapify(self._timers)
                self._cancelled = 0
        for fn, args in due:
            _guard(fn, args)

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, collections.deque()
        for fn, args in calls:
            _guard(fn, args)


def _guard(fn: Callable, args: tuple) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - one failing callback must not stop the loop
        log.exception("job reactor callback %r failed", fn)
