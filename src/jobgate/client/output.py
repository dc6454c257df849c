"""How the ``jobgate`` command shows jobs, workers and tables, and its progress line."""

from __future__ import annotations

import json
import shlex
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from jobgate import model
from jobgate.client.exits import (
    PROG,
)

# -- output ------------------------------------------------------------------------

JOB_KEYS = model.JOB_COLUMNS
WORKER_KEYS = (
    "name",
    "id",
    "state",
    "draining",
    "degraded",
    "address",
    "labels",
    "running_jobs",
    "capacity",
    "version",
    "registered_at",
    "last_seen_at",
)


def value_text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return shlex.join(str(v) for v in value) if value else "-"
    return str(value)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def format_object(obj: Mapping[str, Any], order: Sequence[str] = ()) -> str:
    """``key: value`` lines, keys aligned, ``order`` first, then the rest."""
    keys = [k for k in order if k in obj] + [k for k in obj if k not in order]
    width = max((len(k) for k in keys), default=0) + 1
    lines = []
    for key in keys:
        value = obj[key]
        text = value_text(value)
        if key == "signal" and isinstance(value, int):
            text = f"{value} ({_signal_name(value)})"
        lines.append(f"{key + ':':<{width}} {text}")
    return "\n".join(lines)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns aligned with two spaces; the last column is not padded."""
    cells = [list(headers)] + [[value_text(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            c if i == len(r) - 1 else f"{c:<{widths[i]}}" for i, c in enumerate(r)
        )
        for r in cells
    )


def exit_text(job: Mapping[str, Any]) -> str:
    if job.get("exit_code") is not None:
        return str(job["exit_code"])
    if job.get("signal"):
        return _signal_name(int(job["signal"]))
    return "-"


def script_text(obj: Mapping[str, Any]) -> str:
    return shlex.join(
        [str(obj.get("command") or ""), str(obj.get("path") or "")]
        + [str(a) for a in obj.get("args") or []]
    )


class Output:
    """Where a command writes: human text or JSON on stdout, notes on stderr."""

    def __init__(self, as_json: bool, out: TextIO, err: TextIO):
        self.as_json = as_json
        self.out = out
        self.err = err

    def json(self, data: Any) -> None:
        self.out.write(json.dumps(data, indent=2) + "\n")

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def note(self, text: str) -> None:
        self.err.write(f"{PROG}: {text}\n")
        self.err.flush()


# -- progress on a terminal ------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A line on stderr, rewritten every second while a wait lasts.

    Shown only when the stream is a terminal, so logs and pipes stay clean.
    """

    def __init__(self, label: str, stream: TextIO, interval: float = 1.0):
        self.label = label
        self.stream = stream
        self.interval = interval
        self.enabled = _isatty(stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False
        self._start = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            elapsed = _duration(time.monotonic() - self._start)
            self.stream.write(f"\r\x1b[K{PROG}: {self.label} ({elapsed})")
            self.stream.flush()
            self._shown = True

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
