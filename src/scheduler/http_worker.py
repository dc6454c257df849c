"""gunicorn's threaded worker, keeping a busy keep-alive connection on its thread.

In gunicorn's ``gthread`` worker every request on a kept-alive connection
travels: the main thread's poller sees the socket readable, hands the
connection to a pool thread, which answers and hands it back through a pipe
to the main thread, which registers it with the poller again. A client that
sends its next request at once (a script polling a job, a CI step starting
jobs one after another) pays for that round trip on every request, and the
main thread's share of the interpreter lock is taken from the requests.

:class:`LingeringThreadWorker` lets the thread that answered wait a little
(``[http].linger_ms``) for the next request on the same connection and answer
it directly. It lingers only while no other connection waits for a thread,
and hands the connection back as before when the client is quiet, so a
connection that idles never holds a thread longer than the linger.
"""

from __future__ import annotations

import select

from gunicorn.workers.gthread import ThreadWorker


class LingeringThreadWorker(ThreadWorker):
    """``gthread`` with a short wait for the next request on the same thread."""

    # Set from [http].linger_ms by scheduler.http_server before the fork.
    linger_s = 0.0

    def handle(self, conn):
        keepalive = super().handle(conn)
        while keepalive is True and self.alive and self._next_request_soon(conn):
            keepalive = super().handle(conn)
        return keepalive

    def _next_request_soon(self, conn) -> bool:
        """Whether the next request on ``conn`` is here or comes within the linger."""
        if getattr(conn, "is_http2", False):
            return False
        unreader = getattr(conn.parser, "unreader", None)
        buf = getattr(unreader, "buf", None)
        if buf is not None and buf.getvalue():
            return True  # read ahead with the last request
        pending = getattr(conn.sock, "pending", None)
        if pending is not None and pending():
            return True  # decrypted bytes the socket already holds
        if self.linger_s <= 0 or self._others_waiting():
            return False
        poller = select.poll()
        poller.register(conn.sock, select.POLLIN)
        try:
            return bool(poller.poll(self.linger_s * 1000))
        except (OSError, ValueError):
            return False

    def _others_waiting(self) -> bool:
        """Whether connections are queued for a thread of this process."""
        queue = getattr(self.tpool, "_work_queue", None)
        return queue is None or not queue.empty()
