"""systemd service notifications (``sd_notify``) through the sdnotify package.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op, so the same code
runs under ``make run``, the tests and systemd.
"""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None

    def _send(self, text: str) -> None:
        if self._n is not None:
            self._n.notify(text)

    def ready(self, status: str = "") -> None:
        self._send("READY=1\n" + (f"STATUS={status}\n" if status else ""))

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}\n")

    def stopping(self, status: str = "") -> None:
        self._send("STOPPING=1\n" + (f"STATUS={status}\n" if status else ""))

    def watchdog(self) -> None:
        self._send("WATCHDOG=1\n")
