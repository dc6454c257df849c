"""The gunicorn worker class of the HTTP gateway: one asyncio loop per process.

gunicorn's arbiter keeps doing what it is good at (forking the processes,
restarting one that dies or hangs, graceful stops and reloads); each worker
process serves all its connections from one event loop with
:class:`scheduler.http.connection.HttpConnection`, so a slow, idle or
streaming client holds a coroutine, not a thread.

Why not gunicorn's own ``asgi`` worker or uvicorn's: neither puts a deadline
on a request's head (a client that sends ``GET /v1/wor`` and nothing more
holds its connection for ever), neither enforces a connection cap, and both
answer their own errors in plain text. Those are the three properties the
scheduler's HTTP contract needs, and the connection class is where they live.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys

from gunicorn import sock as gunicorn_sock
from gunicorn.workers.base import Worker

from scheduler.http.connection import Counter, HttpConnection, Limits

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent check in the serving loop still holds


class AsyncHttpWorker(Worker):
    """Serves the ASGI app the gunicorn application loads, on one event loop.

    The limits come from ``[http]`` through :attr:`limits`, set by
    :mod:`scheduler.http_server` before the fork.
    """

    limits = Limits()

    def init_process(self) -> None:
        die_with_parent()
        if os.getppid() != self.ppid:
            sys.exit(0)  # the arbiter died while this process was forked
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.counter = Counter()
        self.stopping = asyncio.Event()
        self.quick = False
        super().init_process()

    def init_signals(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        add = self.loop.add_signal_handler
        add(signal.SIGTERM, self._stop, False)
        add(signal.SIGQUIT, self._stop, True)
        add(signal.SIGINT, self._stop, True)
        add(signal.SIGUSR1, self.log.reopen_files)
        add(signal.SIGWINCH, lambda: None)
        add(signal.SIGABRT, self._abort)

    def _stop(self, quick: bool) -> None:
        self.alive = False
        self.quick = self.quick or quick
        self.stopping.set()

    def _abort(self) -> None:
        self.alive = False
        self.cfg.worker_abort(self)
        sys.exit(1)

    def run(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        ssl_context = gunicorn_sock.ssl_context(self.cfg) if self.cfg.is_ssl else None
        scheme = "https" if ssl_context else "http"
        limits = self.limits
        app = self.wsgi  # the ASGI app; gunicorn names what it loads so

        def protocol() -> HttpConnection:
            return HttpConnection(app, limits, self.counter, scheme)

        servers = []
        for listener in self.sockets:
            servers.append(
                await self.loop.create_server(
                    protocol,
                    sock=listener.sock,
                    ssl=ssl_context,
                    ssl_handshake_timeout=limits.request_timeout_s
                    if ssl_context
                    else None,
                    backlog=2048,
                )
            )
        # The arbiter's liveness check wants a sign of life well within its
        # timeout; the parent check ends this process if the arbiter died.
        beat = max(0.5, min(self.timeout / 2, 5.0))
        while self.alive:
            self.notify()
            if os.getppid() != self.ppid:
                self.log.info("the gunicorn arbiter is gone; stopping")
                break
            try:
                await asyncio.wait_for(self.stopping.wait(), beat)
            except TimeoutError:
                pass
        for server in servers:
            server.close()
        if not self.quick:
            await self._drain(self.cfg.graceful_timeout)

    async def _drain(self, grace: float) -> None:
        """Let requests under way finish, for at most ``grace`` seconds."""
        idle = self.counter.idle_event()
        try:
            await asyncio.wait_for(idle.wait(), grace)
        except TimeoutError:
            self.log.warning(
                "cutting %d connections still open after %g s",
                self.counter.open,
                grace,
            )
