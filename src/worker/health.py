"""Whether the worker can do its job: ``degraded`` and why, or healthy.

A worker that cannot write its state directory (a full disk, an I/O error)
cannot keep the output or the records of the jobs it would start. It says so
instead of failing them one by one: it refuses new jobs (UNAVAILABLE, naming
the reason), tells the scheduler with its next heartbeat (sent at once), and
the scheduler stops sending it jobs. It recovers by itself: every
``[jobs].alive_interval_s`` it checks the state directory's filesystem again,
and once at least ``[jobs].min_free_bytes`` are free and a probe write
succeeds, it is healthy again.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_NAME = ".probe"
PROBE_BYTES = 4096


class Health:
    def __init__(self, state_dir: Path, min_free_bytes: int):
        self.state_dir = state_dir
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        self._reason = ""
        self._listeners: list[Callable[[str], None]] = []

    @property
    def reason(self) -> str:
        """Why the worker is degraded; empty while it is healthy."""
        return self._reason

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(reason)`` whenever the worker degrades or recovers."""
        self._listeners.append(listener)

    def write_failed(self, what: str, exc: OSError) -> None:
        """Writing ``what`` to the state directory failed with ``exc``."""
        self._set(
            f"cannot write {what} in {self.state_dir}: "
            f"{exc.strerror or exc}; the worker starts no jobs until it can"
        )

    def check(self) -> str:
        """Look at the state directory again; returns the reason, or empty."""
        try:
            st = os.statvfs(self.state_dir)
            free = st.f_bavail * st.f_frsize
            if free < self.min_free_bytes:
                self._set(
                    f"{self.state_dir} has {free} bytes free, less than "
                    f"[jobs].min_free_bytes ({self.min_free_bytes}); the worker "
                    "starts no jobs until there is more"
                )
                return self._reason
            if self._reason:
                self._probe()
        except OSError as exc:
            self.write_failed("a probe file", exc)
            return self._reason
        self._set("")
        return ""

    def _probe(self) -> None:
        path = self.state_dir / PROBE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"\0" * PROBE_BYTES)
        finally:
            os.close(fd)
            os.unlink(path)

    def _set(self, reason: str) -> None:
        with self._lock:
            if reason == self._reason:
                return
            self._reason = reason
        if reason:
            log.error("degraded: %s", reason)
        else:
            log.warning("recovered: the state directory is writable again")
        for listener in self._listeners:
            try:
                listener(reason)
            except Exception:  # noqa: BLE001 - the others are told all the same
                log.exception("telling of a change of health failed")
