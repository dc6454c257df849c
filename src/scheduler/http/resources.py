"""Falcon resources: thin translations of HTTP onto :class:`Gateway` calls."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import falcon

from scheduler.gateway import Gateway, OutputStream
from scheduler.http import body

log = logging.getLogger(__name__)

START_FIELDS = {"command", "path", "args", "timeout_s", "idempotency_key"}


def _json(resp: falcon.Response, data, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(data)


def _plain_stream(stream: OutputStream) -> Iterator[bytes]:
    try:
        for _, data in stream:
            yield data
    finally:
        stream.close()


class _Base:
    def __init__(self, gateway: Gateway, max_body_bytes: int):
        self.gw = gateway
        self.max_body = max_body_bytes

    def body(self, req: falcon.Request) -> dict:
        return body.read_json(req, self.max_body)

    def stream_output(self, resp, worker, job_id, offset, follow) -> None:
        stream = self.gw.output(worker, job_id, offset, follow)
        resp.content_type = "text/plain; charset=utf-8"
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Cache-Control", "no-store")
        resp.stream = _plain_stream(stream)


class Health:
    def on_get(self, req, resp):
        _json(resp, {"status": "ok"})


class Ready:
    def __init__(self, gateway: Gateway):
        self.gw = gateway

    def on_get(self, req, resp):
        problems = self.gw.readiness_problems()
        if problems:
            _json(resp, {"status": "not ready", "problems": problems}, 503)
            resp.set_header("Retry-After", "1")
        else:
            _json(resp, {"status": "ready"})


class Workers(_Base):
    def on_get(self, req, resp):
        _json(resp, {"workers": self.gw.list_workers()})


class Worker(_Base):
    def on_get(self, req, resp, worker):
        _json(resp, self.gw.get_worker(worker))


class Jobs(_Base):
    def on_get(self, req, resp, worker):
        _json(resp, {"jobs": self.gw.list_jobs(worker)})

    def on_post(self, req, resp, worker):
        b = self.body(req)
        body.no_unknown(b, START_FIELDS)
        job, existing = self.gw.start_job(
            worker,
            command=body.string(b, "command", required=True, max_len=256),
            path=body.string(b, "path", required=True),
            args=body.string_list(b, "args"),
            timeout_s=body.integer(b, "timeout_s"),
            idempotency_key=body.string(b, "idempotency_key", max_len=256),
        )
        _json(resp, job, 200 if existing else 201)
        resp.location = f"/v1/workers/{job['worker_id']}/jobs/{job['job_id']}"


class Job(_Base):
    def on_get(self, req, resp, worker, job):
        _json(resp, self.gw.get_job(worker, job))


class JobStop(_Base):
    def on_post(self, req, resp, worker, job):
        _json(resp, self.gw.stop_job(worker, job))


class JobOutput(_Base):
    def on_get(self, req, resp, worker, job):
        offset = req.get_param_as_int("offset", min_value=0, default=0)
        follow = req.get_param_as_bool("follow", default=False)
        self.stream_output(resp, worker, job, offset, follow)


# -- the original API, kept for its clients -----------------------------------


class LegacyStart(_Base):
    def on_post(self, req, resp):
        b = self.body(req)
        job, _ = self.gw.start_job(
            body.string(b, "worker_id", required=True),
            command=body.string(b, "command", required=True, max_len=256),
            path=body.string(b, "path", required=True),
            args=body.string_list(b, "args"),
        )
        _json(resp, {"job_id": job["job_id"]}, 201)


class LegacyStop(_Base):
    def on_post(self, req, resp):
        b = self.body(req)
        self.gw.stop_job(
            body.string(b, "worker_id", required=True),
            body.string(b, "job_id", required=True),
        )
        _json(resp, {"success": True})


class LegacyQuery(_Base):
    def on_post(self, req, resp):
        b = self.body(req)
        job = self.gw.get_job(
            body.string(b, "worker_id", required=True),
            body.string(b, "job_id", required=True),
        )
        done = job["state"] != "running"
        failed = done and job["state"] != "succeeded"
        _json(
            resp,
            {
                "done": done,
                "error": failed,
                "error_text": job["reason"] if failed else "",
            },
        )


class LegacyStream(_Base):
    def on_post(self, req, resp):
        b = self.body(req)
        self.stream_output(
            resp,
            body.string(b, "worker_id", required=True),
            body.string(b, "job_id", required=True),
            0,
            True,
        )
