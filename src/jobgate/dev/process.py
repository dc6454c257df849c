"""The child processes of the local development cluster.

:class:`Process` starts one service (a scheduler or a worker) with its output
in a log file, waits until the service writes its ready file and returns what
it wrote there, and stops it: SIGTERM, then SIGKILL. It raises
:class:`ClusterError` when a service exits or is not ready in time, as
``cluster.py`` does when the cluster goes wrong. :func:`descendants` and
:func:`alive` read ``/proc``: the processes below one, and whether one still
runs. ``cluster.py`` imports this module; this module does not import it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path


class ClusterError(Exception):
    pass


class Process:
    def __init__(self, name: str, argv: list[str], log_path: Path, ready_file: Path):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.ready_file = ready_file
        self.proc: subprocess.Popen | None = None

    def start(self, env: dict | None = None) -> None:
        self.ready_file.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv + ["--ready-file", str(self.ready_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        log.close()

    def wait_ready(self, timeout: float = 30.0) -> dict:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                return json.loads(self.ready_file.read_text())
            if self.proc.poll() is not None:
                raise ClusterError(
                    f"{self.name} exited with code {self.proc.returncode}; "
                    f"log:\n{self.log_tail()}"
                )
            time.sleep(0.05)  # waiting on another process's file: nothing to block on
        raise ClusterError(
            f"{self.name} was not ready after {timeout}s; log:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)  # type: ignore[union-attr]

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            # A stopped (SIGSTOP) process would never act on the SIGTERM.
            self.proc.send_signal(signal.SIGCONT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``."""
    found, todo = [], [pid]
    while todo:
        try:
            tasks = list(Path(f"/proc/{todo.pop()}/task").iterdir())
            kids = [int(k) for t in tasks for k in (t / "children").read_text().split()]
        except OSError:  # it exited meanwhile
            continue
        found += kids
        todo += kids
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
