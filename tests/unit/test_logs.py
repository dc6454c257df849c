"""The text log line: ``time LEVEL pid logger: message [FIELD=value ...]``."""

from __future__ import annotations

import logging
import os
import re
import sys

from jobgate.logs import JournalHandler, TextFormatter, bind, make_handler, unbind


def record(msg, args=(), exc_info=None, **extra):
    logger = logging.getLogger("worker.runner")
    return logger.makeRecord(
        "worker.runner", logging.INFO, __file__, 1, msg, args, exc_info, extra=extra
    )


LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO (\d+) worker\.runner: (.*)", re.S
)


def test_a_line_has_time_level_pid_logger_message_and_fields():
    text = TextFormatter().format(record("job %s ended", ("j1",), JOB_ID="j1"))
    m = LINE.fullmatch(text)
    assert m, text
    assert m.group(1) == str(os.getpid())
    assert m.group(2) == "job j1 ended [JOB_ID=j1]"


def test_the_time_is_the_records_own_to_the_millisecond():
    fmt = TextFormatter()
    first, second = record("a"), record("b")
    first.created, first.msecs = 1_800_000_000.25, 250.0
    second.created, second.msecs = 1_800_000_001.007, 7.0
    stamp = logging.Formatter().formatTime(first)[:-4]
    assert fmt.format(first).startswith(stamp + ",250 ")
    # The next second: the cached date and time of day move on with it.
    stamp = logging.Formatter().formatTime(second)[:-4]
    assert fmt.format(second).startswith(stamp + ",007 ")


def test_a_message_with_control_characters_stays_one_line():
    # A client's path with %0a in it must not forge a line of its own.
    text = TextFormatter().format(
        record("GET /v1/workers/x\n2026-01-01 INFO forged\x1b[0m\\", JOB_ID="j\n1")
    )
    assert "\n" not in text and "\x1b" not in text
    assert text.endswith(
        ": GET /v1/workers/x\\n2026-01-01 INFO forged\\x1b[0m\\\\ [JOB_ID=j\\n1]"
    )


def test_journal_fields_escape_control_characters():
    sent = []

    class Sock:
        def send(self, data):
            sent.append(data)

    handler = JournalHandler.__new__(JournalHandler)
    logging.Handler.__init__(handler)
    handler.identifier, handler.sock = "test", Sock()
    rec = record("forged\nMESSAGE=x", JOB_ID="a\nPRIORITY=0")
    rec.pathname, rec.funcName = "x.py", "f"
    handler.emit(rec)
    fields = sent[0].split(b"\n")
    assert b"MESSAGE=forged\\nMESSAGE=x" in fields
    assert b"JOB_ID=a\\nPRIORITY=0" in fields
    assert b"PRIORITY=0" not in fields


def test_a_traceback_follows_the_line():
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", exc_info=sys.exc_info())
    lines = TextFormatter().format(rec).splitlines()
    assert lines[0].endswith("worker.runner: failed")
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"


def test_context_fields_are_added_by_the_handler(capsys):
    handler = make_handler("test")
    token = bind(REQUEST_ID="r1")
    try:
        handler.handle(record("hello"))
    finally:
        unbind(token)
    assert capsys.readouterr().err.rstrip().endswith("hello [REQUEST_ID=r1]")
