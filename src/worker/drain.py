"""The worker's drain: out of service for maintenance, kept on disk.

A drained worker starts no new jobs; the jobs it runs go on to their end.
The drain is an operator's decision, so unlike :mod:`worker.health` it does
not lift by itself: it is written to ``<state_dir>/drain.json`` (a new file
that replaces the old, so a crash leaves one or the other whole) before it is
answered, and a worker restarted during maintenance comes back drained.
A drain file that cannot be read keeps the worker drained: taking jobs again
is only ever done on request.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_NAME = "drain.json"
# Seconds since the epoch beyond which a drain record's time is nonsense
# (the year 5138): such a record is read as unreadable, not trusted.
MAX_SINCE = 1e11


@dataclass(frozen=True)
class DrainState:
    requested_by: str
    since: float  # Unix time

    @property
    def reason(self) -> str:
        """What ``degraded`` says while the worker is drained."""
        return f"draining: asked by {self.requested_by} at {_timestamp(self.since)}"


class Drain:
    """Whether the worker is drained, who asked and when; persisted."""

    def __init__(self, state_dir: Path):
        self.path = state_dir / FILE_NAME
        self._lock = threading.Lock()
        self._listeners: list[Callable[[DrainState | None], None]] = []
        self._state = self._load()
        if self._state is not None:
            log.warning(
                "the worker is drained (%s); it starts no jobs until the drain "
                "is lifted",
                self._state.reason,
            )

    @property
    def state(self) -> DrainState | None:
        """The drain in force, or None while the worker takes jobs."""
        return self._state

    @property
    def reason(self) -> str:
        """Why the worker starts no jobs for the drain; empty if not drained."""
        state = self._state
        return state.reason if state is not None else ""

    def on_change(self, listener: Callable[[DrainState | None], None]) -> None:
        """Call ``listener(state)`` whenever the worker is drained or undrained."""
        self._listeners.append(listener)

    def set(self, enable: bool, requested_by: str, now: float) -> DrainState | None:
        """Drain or undrain; returns the state in force.

        Written to disk before it takes effect; an OSError leaves the state
        as it was. Draining a drained worker keeps who asked first and when.
        """
        with self._lock:
            if enable == (self._state is not None):
                return self._state
            state = DrainState(requested_by or "an unnamed client", now)
            if enable:
                self._write(state)
            else:
                self._remove()
            self._state = state if enable else None
        if enable:
            log.warning("drained: %s; running jobs go on to their end", state.reason)
        else:
            log.warning(
                "the drain was lifted by %s; starting jobs again", state.requested_by
            )
        for listener in self._listeners:
            try:
                listener(self._state)
            except Exception:  # noqa: BLE001 - the others are told all the same
                log.exception("telling of a change of drain failed")
        return self._state

    def _load(self) -> DrainState | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._unreadable(f"cannot read {self.path}: {exc.strerror or exc}")
        try:
            data = json.loads(text)
            since = float(data["since"])
            if not 0 <= since < MAX_SINCE:  # NaN too: it compares false
                raise ValueError(f"since {data['since']!r} is not a time")
            return DrainState(str(data["requested_by"]), since)
        except (ValueError, TypeError, KeyError) as exc:
            return self._unreadable(f"{self.path} is not a drain record ({exc})")

    def _unreadable(self, problem: str) -> DrainState:
        log.error("%s; the worker stays drained until the drain is lifted", problem)
        since = 0.0
        try:
            since = self.path.stat().st_mtime
        except OSError:
            pass
        return DrainState(
            f"an unknown client (the drain file is unreadable: {problem})", since
        )

    def _write(self, state: DrainState) -> None:
        tmp = self.path.with_name(FILE_NAME + ".new")
        data = json.dumps({"requested_by": state.requested_by, "since": state.since})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        self._sync_dir()

    def _remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            return
        self._sync_dir()

    def _sync_dir(self) -> None:
        """Make the rename or removal durable. The file has changed already,
        so a failure here is logged, not raised: the change stands, and
        answering that nothing changed would be untrue."""
        try:
            fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error(
                "the drain file %s changed, but syncing its directory failed "
                "(%s): a crash of the host now could bring back the old state",
                self.path,
                exc.strerror or exc,
            )


def _timestamp(t: float) -> str:
    """RFC 3339 UTC with milliseconds, as the API writes times."""
    return (
        dt.datetime.fromtimestamp(t, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
