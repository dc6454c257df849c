"""What the failover scenario watches while it kills schedulers.

:class:`RequestLoop` is a client (``jobgate.client``'s :class:`Client`, given
every scheduler's URL, as the ``jobgate`` command is) asking the same thing
again and again in a thread, and noting when each answer came and from which
scheduler. :func:`worker_scheduler` tells which scheduler a worker talks to,
from its log; :func:`last_seen` when a scheduler last heard from a worker,
from the database the schedulers share.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from jobgate.client.errors import ClientError

# The worker's log lines naming the scheduler it talks to from then on
# (worker/registration.py).
_IN_USE = re.compile(
    r"registered with the scheduler at (\S+) as|"
    r"does not answer \(\w+\); trying the one at (\S+)$",
    re.M,
)


class RequestLoop:
    """``call`` in a loop on a thread; each answer's (time.monotonic(), the
    URL of the scheduler that gave it), and each error, are kept.

    ``url`` returns the scheduler the client sends to now; it is read after
    each answer, so the answer is attributed to the scheduler that gave it
    (a client that failed over moved on before answering).
    """

    def __init__(self, call: Callable[[], object], url: Callable[[], str]):
        self.call = call
        self.url = url
        self.answers: list[tuple[float, str]] = []
        self.errors: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.call()
            except ClientError as exc:
                self.errors.append((time.monotonic(), str(exc)))
                continue
            self.answers.append((time.monotonic(), self.url()))

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)

    def answered_by(self, url: str, after: float, timeout: float) -> float | None:
        """The time of the first answer from ``url`` after ``after``, waiting
        up to ``timeout`` seconds for it; None if none came."""
        deadline = after + timeout
        seen = 0
        while True:
            answers = self.answers[seen:]  # appended to by the loop's thread
            seen += len(answers)
            for t, by in answers:
                if t > after and by == url:
                    return t
            if time.monotonic() > deadline:
                return None
            time.sleep(0.001)  # the loop's thread appends; nothing to block on


def worker_scheduler(log: Path) -> str:
    """The gRPC address of the scheduler the worker whose log this is talks
    to (as its last registration or failover said), or ""."""
    found = _IN_USE.findall(log.read_text(errors="replace"))
    return next((a for a in found[-1] if a), "") if found else ""


def last_seen(db, worker: str) -> float:
    """When a scheduler last heard from ``worker`` (its ``last_seen_at``: the
    time the heartbeat or registration arrived), as the database the
    schedulers share has it (``db``: a psycopg connection to it).

    Heartbeats reach the database with the next flush
    (``[workers].heartbeat_flush_s``), but each carries its arrival time.
    """
    row = db.execute(
        "SELECT last_seen_at FROM workers WHERE name = %s", (worker,)
    ).fetchone()
    return float(row[0]) if row else 0.0
