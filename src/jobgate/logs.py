"""Logging to stderr, one line per event.

Under systemd (``JOURNAL_STREAM`` set) lines carry no timestamp, since journald
adds its own, and start with a syslog priority prefix (``<4>``) so journald
records the level. Elsewhere they carry a timestamp and the level name.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        text = super().format(record)
        # Continuation lines of a traceback keep the priority of the event.
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def make_formatter() -> logging.Formatter:
    """The formatter for this environment (journald or a terminal)."""
    if os.environ.get("JOURNAL_STREAM"):
        return _JournalFormatter("%(name)s: %(message)s")
    return logging.Formatter(
        "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
    )


def setup(level: str = "info", *, stream=None) -> None:
    """Configure the root logger once for a jobgate process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own loggers are chatty at INFO about connectivity; keep warnings.
    logging.getLogger("grpc").setLevel(max(root.level, logging.WARNING))


def gunicorn_logconfig(level: str) -> dict:
    """A ``logconfig_dict`` that makes gunicorn log like the rest of jobgate."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"jobgate": {"()": "jobgate.logs.make_formatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "jobgate",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            "gunicorn.error": {
                "level": level.upper(),
                "handlers": [],
                "propagate": True,
            },
            "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
            "grpc": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }
