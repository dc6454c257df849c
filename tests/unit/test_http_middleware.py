"""Request ids and the access log of the HTTP API."""

from __future__ import annotations

import logging

import falcon
import falcon.asgi
import falcon.testing

from jobgate import logs
from scheduler.http.middleware import AccessLog, RequestId


class Thing:
    async def on_get(self, req, resp):
        logging.getLogger("test.thing").info("inside")
        resp.media = {"ok": True}

    async def on_post(self, req, resp):
        raise falcon.HTTPNotFound(description="no such thing")


def client(*middleware) -> falcon.testing.TestClient:
    app = falcon.asgi.App(middleware=list(middleware))
    app.add_route("/thing", Thing())
    return falcon.testing.TestClient(app)


class Fields(logging.Handler):
    """Records with the context's fields, as the real handlers see them."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(logs._ContextFields())

    def emit(self, record):
        self.records.append(record)


def capture(name: str) -> Fields:
    handler = Fields()
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def test_one_access_line_per_request_with_the_request_id():
    access = capture("scheduler.http.access")
    inner = capture("test.thing")
    try:
        c = client(RequestId(), AccessLog())
        r = c.simulate_get(
            "/thing", query_string="a=1", headers={"X-Request-ID": "abc"}
        )
        c.simulate_post("/thing")
    finally:
        logging.getLogger("scheduler.http.access").removeHandler(access)
        logging.getLogger("test.thing").removeHandler(inner)
    assert r.headers["X-Request-ID"] == "abc"
    first, second = (rec.getMessage() for rec in access.records)
    assert first.startswith('127.0.0.1 "GET /thing?a=1" 200 ')
    assert first.endswith("ms")
    assert second.startswith('127.0.0.1 "POST /thing" 404 ')
    assert access.records[0].REQUEST_ID == "abc"
    assert inner.records[0].REQUEST_ID == "abc"
    assert len(access.records[1].REQUEST_ID) == 32  # made up: a uuid4 in hex


def test_no_access_line_when_the_logger_is_quiet():
    access = capture("scheduler.http.access")
    logging.getLogger("scheduler.http.access").setLevel(logging.WARNING)
    try:
        client(RequestId(), AccessLog()).simulate_get("/thing")
    finally:
        logging.getLogger("scheduler.http.access").removeHandler(access)
        logging.getLogger("scheduler.http.access").setLevel(logging.NOTSET)
    assert access.records == []


def test_a_bad_request_id_is_replaced():
    r = client(RequestId()).simulate_get("/thing", headers={"X-Request-ID": "a b\n"})
    assert r.headers["X-Request-ID"] != "a b\n"
    assert len(r.headers["X-Request-ID"]) == 32
