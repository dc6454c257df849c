"""Logging: one line per event, with structured fields journald can index.

Under systemd, when stderr is the journal stream (``JOURNAL_STREAM`` names
stderr's device and inode), records go straight to journald's native socket
with their fields (``JOB_ID``, ``WORKER_ID``, ``REQUEST_ID`` ...) so that
``journalctl -u jobgate-worker JOB_ID=...`` finds a job's story; journald adds
the timestamp. Elsewhere lines go to stderr with a timestamp and level.

Fields come from ``extra={"JOB_ID": ...}`` on a call, or from the context
(:func:`bind`), e.g. the request id of the HTTP request being served.
"""

from __future__ import annotations

import contextvars
import logging
import os
import socket
import struct
import sys
from dataclasses import dataclass

from jobgate.config import setting


@dataclass(frozen=True)
class LogSection:
    """``[log]`` of both services' configs."""

    level: str = setting(
        "info",
        choices=("debug", "info", "warning", "error"),
        help="least severe level logged",
    )


JOURNAL_SOCKET = "/run/systemd/journal/socket"
FIELDS = ("JOB_ID", "WORKER_ID", "REQUEST_ID", "GROUP_ID")

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar(
    "jobgate_log_fields"
)


def bind(**fields: str) -> contextvars.Token:
    """Attach fields to every record logged in this context until reset."""
    return _context.set({**_context.get({}), **fields})


def unbind(token: contextvars.Token) -> None:
    try:
        _context.reset(token)
    except ValueError:  # reset from another context: nothing of ours to undo
        pass


def current(key: str) -> str | None:
    """The value bound to ``key`` in this context, if any."""
    return _context.get({}).get(key)


# Control characters (C0, DEL, C1) as escapes: a message or field that
# quotes a client's input (a path with %0a in it) stays one line.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    0x0A: "\\n",
    0x0D: "\\r",
    0x09: "\\t",
    0x5C: "\\\\",
}


def escape(text: str) -> str:
    """``text`` with control characters (and backslashes) escaped."""
    if text.isprintable() and "\\" not in text:
        return text
    return text.translate(_ESCAPES)


class _ContextFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get({}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def _suffix(record: logging.LogRecord) -> str:
    parts = [
        f"{k}={escape(str(getattr(record, k)))}"
        for k in FIELDS
        if getattr(record, k, None)
    ]
    return f" [{' '.join(parts)}]" if parts else ""


class TextFormatter(logging.Formatter):
    """``time LEVEL pid logger: message [FIELD=value ...]`` for terminals and files.

    The message is escaped (:func:`escape`: client input never forges a
    line) and the context fields follow it.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = (
            f"{self.formatTime(record)} {record.levelname} {record.process} "
            f"{record.name}: {escape(record.getMessage())}{_suffix(record)}"
        )
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return text


class JournalHandler(logging.Handler):
    """Sends records to journald's native protocol socket, with fields."""

    def __init__(self, identifier: str, path: str = JOURNAL_SOCKET):
        super().__init__()
        self.identifier = identifier
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.connect(path)

    @staticmethod
    def _field(key: str, value: str) -> bytes:
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            return key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        return key.encode() + b"=" + data + b"\n"

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = escape(record.getMessage())
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            fields = {
                "MESSAGE": message[:60000],
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
            }
            for key in FIELDS:
                value = getattr(record, key, None)
                if value:
                    fields[key] = escape(str(value))
            self.sock.send(b"".join(self._field(k, v) for k, v in fields.items()))
        except Exception:  # noqa: BLE001 - logging must never take the service down
            self.handleError(record)


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (
        dev.isdigit()
        and ino.isdigit()
        and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    )


def make_handler(identifier: str) -> logging.Handler:
    """The journald handler under systemd, a stderr text handler elsewhere."""
    handler: logging.Handler
    if _stderr_is_journal() and os.path.exists(JOURNAL_SOCKET):
        try:
            handler = JournalHandler(identifier)
        except OSError:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(TextFormatter())
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(TextFormatter())
    handler.addFilter(_ContextFields())
    return handler


def setup(level: str = "info", identifier: str | None = None) -> None:
    """Configure the root logger once for a jobgate process."""
    ident = identifier or os.path.basename(sys.argv[0]) or "jobgate"
    root = logging.getLogger()
    root.handlers[:] = [make_handler(ident)]
    root.setLevel(level.upper())
    # grpc's own loggers are chatty at INFO about connectivity; keep warnings.
    logging.getLogger("grpc").setLevel(max(root.level, logging.WARNING))


def gunicorn_logconfig(level: str, identifier: str) -> dict:
    """A ``logconfig_dict`` that makes gunicorn log like the rest of jobgate."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "jobgate": {"()": "jobgate.logs.make_handler", "identifier": identifier}
        },
        "root": {"level": level.upper(), "handlers": ["jobgate"]},
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
