"""What a service tells systemd, its ready file, and the HTTP side's restart limit."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

import pytest

from jobgate.lifecycle import Notifier, write_ready_file
from scheduler.http_child import RestartLimit


class NotifySocket:
    """A stand-in for systemd's notification socket: a datagram socket to read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        # A short path: AF_UNIX addresses have room for about 100 bytes.
        self._dir = tempfile.TemporaryDirectory(prefix="jg-notify-")
        path = Path(self._dir.name) / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))

    def messages(self, seconds: float = 0.2) -> list[str]:
        """Every message received within the next ``seconds``."""
        deadline = time.monotonic() + seconds
        got = []
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return got

    def close(self) -> None:
        self.sock.close()
        self._dir.cleanup()


@pytest.fixture
def systemd(monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    s = NotifySocket(monkeypatch)
    yield s
    s.close()


def test_notifier_says_ready_status_once_and_stopping(systemd):
    n = Notifier()
    n.ready("serving on port 1")
    n.status("serving on port 1")  # unchanged: not sent again
    n.status("2 jobs running")
    n.stopping("deregistering")
    assert systemd.messages() == [
        "READY=1\nSTATUS=serving on port 1\n",
        "STATUS=2 jobs running\n",
        "STOPPING=1\nSTATUS=deregistering\n",
    ]


def test_watchdog_pings_at_half_the_interval_and_refreshes_status(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 0.1 s
    n = Notifier()
    n.ready("ready")
    turns = iter(range(1000))
    n.start_watchdog(lambda: True, lambda: f"turn {next(turns)}")
    got = systemd.messages(0.5)
    n.stopping()
    pings = got[1:]
    assert got[0] == "READY=1\nSTATUS=ready\n"
    assert pings.count("WATCHDOG=1\n") >= 3
    assert "STATUS=turn 0\n" in pings and "STATUS=turn 2\n" in pings


def test_watchdog_is_not_pinged_while_unhealthy(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    n = Notifier()
    healthy = {"now": False}
    n.start_watchdog(lambda: healthy["now"], lambda: "status")
    quiet = systemd.messages(0.5)
    healthy["now"] = True
    pinged = systemd.messages(0.5)
    n.stopping()
    assert "WATCHDOG=1\n" not in quiet
    assert "WATCHDOG=1\n" in pinged


def test_watchdog_of_another_process_is_not_pinged(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # systemd watches another process
    n = Notifier()
    n.start_watchdog(lambda: True, lambda: "still here", every_s=0.1)
    got = systemd.messages(0.5)
    n.stopping()
    assert got == ["STATUS=still here\n"]


def test_notifier_without_systemd_sends_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    n.ready("x")  # no socket, no error
    n.stopping("y")


def test_ready_file_is_replaced_whole(tmp_path):
    path = tmp_path / "scheduler.ready"
    path.write_text("old")
    write_ready_file(path, {"http_port": 8080, "pid": 7})
    assert json.loads(path.read_text()) == {"http_port": 8080, "pid": 7}
    assert [p.name for p in tmp_path.iterdir()] == ["scheduler.ready"]
    write_ready_file(None, {"ignored": True})  # no ready file asked for


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_restart_limit_is_exceeded_by_one_exit_too_many_within_the_window():
    clock = Clock()
    limit = RestartLimit(3, 60.0, clock)
    counts = []
    for _ in range(4):
        counts.append(limit.exited())
        clock.now += 10
    assert counts == [1, 2, 3, 4]
    assert [limit.exceeded(c) for c in counts] == [False, False, False, True]


def test_restart_limit_forgets_exits_older_than_the_window():
    clock = Clock()
    limit = RestartLimit(2, 60.0, clock)
    limit.exited()
    clock.now += 30
    limit.exited()
    clock.now += 31  # the first exit is 61 s old now
    assert limit.exited() == 2
    clock.now += 60  # and now both earlier ones are
    count = limit.exited()
    assert count == 1 and not limit.exceeded(count)
