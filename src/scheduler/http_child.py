"""The HTTP side of the scheduler, as its main process sees it.

The main process binds the HTTP socket, then starts ``python -m
scheduler.http_server`` (gunicorn) with fork+exec and hands the socket down,
so gunicorn's own forking never copies gRPC state. gunicorn's processes tell
the main process what they do on a pipe, one line per event: ``up PID`` when
an HTTP process has loaded the app, ``exit PID`` when the gunicorn master saw
one exit. From that and from the gunicorn master's own exit, :class:`HttpChild`
knows whether the HTTP side serves:

- ready: an HTTP process is up;
- failed: the gunicorn master exited, or its processes keep exiting, more
  than ``[http].max_restarts`` within ``[http].restart_window_s``. gunicorn
  replaces a process that dies as often as it dies (a key that does not match
  its certificate kills each one as it starts to listen), so without this
  the scheduler would stay up, and READY, with no HTTP process serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from jobgate.config import parse_hostport
from scheduler.config import SchedulerConfig

log = logging.getLogger(__name__)

# Only the main process talks to systemd (NotifyAccess=main).
SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def listen(bind: str) -> socket.socket:
    """The HTTP API's listening socket, inheritable by the HTTP side."""
    host, port = parse_hostport(bind, "bind")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        raise OSError(f"cannot listen on {bind} for HTTP: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock


def loopback_target(bind: str, port: int) -> str:
    """Where the HTTP side reaches the gRPC server bound on ``bind``."""
    host, _ = parse_hostport(bind, "bind")
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RestartLimit:
    """At most ``limit`` exits within any ``window_s`` seconds."""

    def __init__(
        self,
        limit: int,
        window_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._exits: deque[float] = deque()

    def exited(self) -> int:
        """Count one exit; returns the exits within the window, this one too."""
        now = self._clock()
        self._exits.append(now)
        while self._exits[0] <= now - self.window_s:
            self._exits.popleft()
        return len(self._exits)

    def exceeded(self, count: int) -> bool:
        return count > self.limit


class HttpChild:
    """The gunicorn child serving the HTTP API: started, watched, stopped."""

    def __init__(
        self,
        cfg: SchedulerConfig,
        config_path: Path,
        listener: socket.socket,
        grpc_target: str,
    ):
        self.cfg = cfg
        self.port = listener.getsockname()[1]
        self.restarts = RestartLimit(cfg.http.max_restarts, cfg.http.restart_window_s)
        self.failure = ""  # why the HTTP side cannot serve; empty while it can
        self._cond = threading.Condition()
        self._up: set[int] = set()
        self._exited = False
        self._stopping = False
        self._on_failure: Callable[[str], None] | None = None
        self._reported = False

        metrics_dir = cfg.state.path.parent / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)  # counters start at zero
        metrics_dir.mkdir(parents=True)
        events_r, events_w = os.pipe()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scheduler.http_server",
                str(config_path),
                "--listen-fd",
                str(listener.fileno()),
                "--events-fd",
                str(events_w),
                "--grpc-target",
                grpc_target,
                "--parent-pid",
                str(os.getpid()),
            ],
            pass_fds=(listener.fileno(), events_w),
            env={
                **{k: v for k, v in os.environ.items() if k not in SYSTEMD_ONLY},
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            },
        )
        os.close(events_w)
        listener.close()  # gunicorn owns the listener now
        threading.Thread(
            target=self._read_events, args=(events_r,), name="http-events", daemon=True
        ).start()
        threading.Thread(target=self._watch, name="http-watch", daemon=True).start()

    @property
    def exited(self) -> bool:
        """Whether the gunicorn master has exited."""
        return self._exited

    @property
    def processes_up(self) -> int:
        return len(self._up)

    def wait_ready(self, timeout: float) -> bool:
        """True once an HTTP process is up; false if the HTTP side failed first."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._up or self._exited or self.failure, timeout
            )
            return bool(self._up) and not self._exited and not self.failure

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` once if the HTTP side fails (or has failed)."""
        with self._cond:
            self._on_failure = callback
        self._report()

    def healthy(self) -> bool:
        return not self.failure and self._proc.poll() is None

    def stop(self) -> None:
        """Stop gunicorn gracefully ([http].graceful_timeout_s), then kill it."""
        with self._cond:
            self._stopping = True
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(self.cfg.http.graceful_timeout_s + 5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    # -- what the HTTP side tells ---------------------------------------------------

    def _read_events(self, fd: int) -> None:
        # Read to the end, also while stopping: a full pipe would block the
        # HTTP processes that write to it.
        pending = b""
        with open(fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(4096):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    self._event(line.decode("ascii", "replace"))

    def _event(self, line: str) -> None:
        what, _, pid_text = line.partition(" ")
        if not pid_text.isdigit():
            log.warning("unexpected message from the HTTP side: %r", line)
            return
        pid = int(pid_text)
        with self._cond:
            if what == "up":
                self._up.add(pid)
            elif what == "exit":
                self._up.discard(pid)
                if not self._stopping and not self.failure:
                    count = self.restarts.exited()
                    if self.restarts.exceeded(count):
                        self.failure = (
                            f"the HTTP gateway's processes keep exiting: {count} "
                            f"in the last {self.restarts.window_s:g} s, more than "
                            f"[http].max_restarts ({self.restarts.limit}); see "
                            "their messages above for why"
                        )
            self._cond.notify_all()
        self._report()

    def _watch(self) -> None:
        code = self._proc.wait()
        with self._cond:
            self._exited = True
            if not self._stopping and not self.failure:
                self.failure = f"the HTTP gateway exited unexpectedly (code {code})"
            self._cond.notify_all()
        self._report()

    def _report(self) -> None:
        with self._cond:
            if self._reported or not self.failure or self._on_failure is None:
                return
            self._reported = True
            callback, reason = self._on_failure, self.failure
        callback(reason)
