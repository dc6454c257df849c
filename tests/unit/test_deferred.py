"""Work a request leaves until its response has been sent (scheduler.deferred)."""

from __future__ import annotations

import logging

import pytest

from jobgate import logs
from scheduler.deferred import AfterResponse, after_response


def test_outside_a_request_the_work_runs_at_once():
    done = []
    after_response(done.append, 1)
    assert done == [1]


def serve(app, events=None):
    """Call a WSGI app as a server does: iterate the body, then close it."""
    events = [] if events is None else events
    body = AfterResponse(app)({}, lambda status, headers: None)
    for chunk in body:
        events.append(("sent", chunk))
    close = getattr(body, "close", None)
    if close is not None:
        close()
    return events


def test_deferred_work_runs_after_the_body_is_sent_in_order():
    events = []

    def app(environ, start_response):
        after_response(events.append, ("after", 1))
        after_response(events.append, ("after", 2))
        events.append(("in app",))
        return [b"body"]

    serve(app, events)
    assert events == [("in app",), ("sent", b"body"), ("after", 1), ("after", 2)]


def test_a_request_without_deferred_work_keeps_its_body():
    body = [b"x"]
    assert AfterResponse(lambda e, s: body)({}, lambda *a: None) is body


def test_the_body_is_closed_before_the_work_runs():
    events = []

    class Body(list):
        def close(self):
            events.append("closed")

    def app(environ, start_response):
        after_response(events.append, "after")
        return Body([b"x"])

    serve(app)
    assert events == ["closed", "after"]


def test_log_lines_keep_the_fields_bound_to_the_request(caplog):
    logger = logging.getLogger("test.deferred")

    def app(environ, start_response):
        token = logs.bind(REQUEST_ID="r-1")
        try:
            after_response(lambda: logger.warning("%s", logs.current("REQUEST_ID")))
        finally:
            logs.unbind(token)
        return [b"x"]

    with caplog.at_level(logging.WARNING, "test.deferred"):
        serve(app)
    assert [r.getMessage() for r in caplog.records] == ["r-1"]


def test_a_failing_task_is_logged_and_the_rest_still_run(caplog):
    done = []

    def broken():
        raise RuntimeError("boom")

    def app(environ, start_response):
        after_response(broken)
        after_response(done.append, "later")
        return [b"x"]

    with caplog.at_level(logging.ERROR, "scheduler.deferred"):
        serve(app)
    assert done == ["later"]
    assert "work deferred until after a response failed" in caplog.text


def test_when_the_app_raises_its_deferred_work_still_runs():
    done = []

    def app(environ, start_response):
        after_response(done.append, "recorded")
        raise ValueError("app failed")

    with pytest.raises(ValueError):
        serve(app)
    assert done == ["recorded"]
    # And the next request starts with no work left over.
    assert serve(lambda e, s: [b"y"]) == [("sent", b"y")]


def test_a_stream_does_not_hold_its_work_back_until_it_ends():
    events = []

    def stream():
        events.append("first chunk")
        yield b"a"

    def app(environ, start_response):
        after_response(events.append, "logged")
        return stream()

    serve(app, events)
    assert events == ["logged", "first chunk", ("sent", b"a")]
