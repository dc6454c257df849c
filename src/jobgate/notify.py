"""systemd service notifications (``sd_notify``) through the sdnotify package.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the same code
runs under ``make run``, the tests and systemd.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        self._status = ""
        self._stop = threading.Event()

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str = "") -> None:
        self._status = status
        self._send("READY=1\n" + (f"STATUS={status}\n" if status else ""))

    def status(self, status: str) -> None:
        if status != self._status:
            self._status = status
            self._send(f"STATUS={status}\n")

    def stopping(self, status: str = "") -> None:
        self._stop.set()
        self._send("STOPPING=1\n" + (f"STATUS={status}\n" if status else ""))

    def start_watchdog(
        self,
        healthy: Callable[[], bool],
        status: Callable[[], str] | None = None,
        every_s: float = 2.0,
    ) -> None:
        """Ping the watchdog while ``healthy()`` holds; refresh STATUS meanwhile.

        Runs every ``every_s`` (at most half of ``WATCHDOG_USEC`` when systemd
        set one), so STATUS stays current and a hung service (``healthy()``
        false, or this thread stuck) is restarted.
        """
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and (not pid or pid == str(os.getpid()))
        interval = min(int(usec) / 2e6, every_s) if watchdog else every_s
        if not self.enabled:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    ok = healthy()
                    if status is not None:
                        self.status(status())
                except Exception:  # noqa: BLE001 - a failing check is "unhealthy"
                    log.exception("health check failed")
                    ok = False
                if ok and watchdog:
                    self._send("WATCHDOG=1\n")
                elif not ok:
                    log.warning("health check failed; not pinging the watchdog")

        threading.Thread(target=loop, name="watchdog", daemon=True).start()
