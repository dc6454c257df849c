"""Falcon resources: thin translations of HTTP onto :class:`UseCases` calls."""

from __future__ import annotations

import asyncio
import json
import logging

import falcon

from jobgate import model
from jobgate.errors import InvalidArgument
from scheduler import metrics
from scheduler.http import body, streams
from scheduler.http.auth import READ, RUN, Auth, TokenFile
from scheduler.usecases import UseCases

log = logging.getLogger(__name__)

MAX_OFFSET = 2**63 - 1  # byte offsets are int64 on the wire


def _json(resp: falcon.Response, data, status: int = 200) -> None:
    resp.status = falcon.code_to_http_status(status)
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(data)


class _Base:
    scopes: dict[str, str] = {}

    def __init__(
        self,
        cases: UseCases,
        max_body_bytes: int,
        auth: Auth,
        slots: streams.StreamSlots,
        max_json_depth: int = 32,
    ):
        self.cases = cases
        self.max_body = max_body_bytes
        self.max_depth = max_json_depth
        self.auth = auth
        self.slots = slots

    async def body(self, req, optional: bool = False) -> dict:
        return await body.read_json(req, self.max_body, self.max_depth, optional)

    async def stream_output(
        self, req, resp, worker, job_id, offset, follow, sse=False, run=False, slot=None
    ) -> None:
        """Answer with the job's output; ``slot``: a follower slot taken already."""
        principal = req.context.principal
        if follow and slot is None:
            slot = self.slots.take(str(principal))
        try:
            stream = await self.cases.output(worker, job_id, offset, follow)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        stream.chunks = streams.guarded(
            stream, lambda: self.auth.still_valid(principal)
        )
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Cache-Control", "no-store")
        if sse:
            resp.content_type = "text/event-stream; charset=utf-8"
            chunks = streams.sse(stream)
        else:
            resp.content_type = "text/plain; charset=utf-8"
            chunks = streams.run_and_follow(stream) if run else streams.plain(stream)
        resp.stream = streams.Body(chunks, stream, slot)


def _actor(req: falcon.Request) -> str:
    """Who is asking, for the record: the name of the API token used."""
    return str(req.context.principal)


class OpenAPI:
    """The OpenAPI description of this API (``scheduler.http.openapi``)."""

    scopes = {"GET": READ}

    def __init__(self, document: dict):
        self.text = json.dumps(document)

    async def on_get(self, req, resp):
        resp.content_type = falcon.MEDIA_JSON
        resp.text = self.text


class Metrics:
    """Prometheus text format: all HTTP processes added up, plus state."""

    scopes = {"GET": READ}

    def __init__(self, cases: UseCases):
        self.cases = cases

    async def on_get(self, req, resp):
        resp.content_type = metrics.CONTENT_TYPE
        resp.data = await asyncio.to_thread(
            metrics.render, self.cases.store, self.cases.cfg.workers.heartbeat_timeout_s
        )


class WhoAmI(_Base):
    """Who the caller is to the API: the console asks to know its scope."""

    scopes = {"GET": READ}

    async def on_get(self, req, resp):
        p = req.context.principal
        _json(resp, {"name": p.name, "scope": p.scope, "via": p.via})


class Health:
    async def on_get(self, req, resp):
        _json(resp, {"status": "ok"})


class Ready:
    def __init__(self, cases: UseCases, tokens: TokenFile):
        self.cases = cases
        self.tokens = tokens

    async def on_get(self, req, resp):
        problems = await self.cases.readiness_problems()
        self.tokens.current()
        if self.tokens.problem:
            problems.append(self.tokens.problem + "; no token is valid")
        if problems:
            _json(resp, {"status": "not ready", "problems": problems}, 503)
            resp.set_header("Retry-After", "1")
        else:
            _json(resp, {"status": "ready"})


class Workers(_Base):
    scopes = {"GET": READ}

    async def on_get(self, req, resp):
        _json(resp, {"workers": await self.cases.list_workers()})


class Worker(_Base):
    scopes = {"GET": READ}

    async def on_get(self, req, resp, worker):
        _json(resp, self.cases.get_worker(worker))


class WorkerDrain(_Base):
    """Take a worker out of service for maintenance, or back into it."""

    scopes = {"POST": RUN}

    async def on_post(self, req, resp, worker):
        wait = req.get_param_as_bool("wait", default=False)
        raw = await self.body(req, optional=True)
        body.parse(model.DRAIN, raw)  # checked; absent would read as false
        enable = raw.get("enable") is not False  # absent or null: drain
        if wait and not enable:
            raise InvalidArgument(
                "wait: only with a drain; lifting a drain takes effect at once "
                "(leave out wait, or send enable true)"
            )
        data, idle = await self.cases.drain_worker(worker, enable, _actor(req), wait)
        # 202: the worker still runs jobs after [workers].max_wait_s.
        _json(resp, data, 202 if wait and not idle else 200)


class Jobs(_Base):
    scopes = {"GET": READ, "POST": RUN}

    async def on_get(self, req, resp, worker):
        jobs, stale = await self.cases.list_jobs(worker)
        if stale:
            # The worker cannot be asked: the scheduler's record, flagged.
            resp.set_header("Warning", '110 - "possibly stale: worker not reachable"')
        _json(resp, {"jobs": jobs, "stale": stale})

    async def on_post(self, req, resp, worker):
        wait = req.get_param_as_bool("wait", default=False)
        follow = req.get_param_as_bool("follow", default=False)
        if wait and follow:
            raise InvalidArgument(
                "wait and follow: choose one (wait returns the final "
                "status as JSON, follow streams the output)"
            )
        b = body.parse(model.START, await self.body(req))
        # A follower's slot is taken before the start: a 503 for want of one
        # must mean that no job was started.
        slot = self.slots.take(str(req.context.principal)) if follow else None
        try:
            job, existing = await self.cases.start_job(worker, **b)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        resp.location = f"/v1/workers/{job['worker_id']}/jobs/{job['job_id']}"
        resp.set_header("X-Job-ID", job["job_id"])
        if follow:
            resp.status = falcon.HTTP_200 if existing else falcon.HTTP_201
            await self.stream_output(
                req, resp, job["worker_id"], job["job_id"], 0, True, run=True, slot=slot
            )
            return
        if wait and job["state"] == "running":
            job = await self.cases.wait_job(job["worker_id"], job["job_id"])
        status = 200 if existing else 201
        if wait and job["state"] == "running":
            status = 202  # still running after [workers].max_wait_s
        _json(resp, job, status)


class Job(_Base):
    scopes = {"GET": READ}

    async def on_get(self, req, resp, worker, job):
        _json(resp, await self.cases.get_job(worker, job))


class JobStop(_Base):
    scopes = {"POST": RUN}

    async def on_post(self, req, resp, worker, job):
        _json(resp, await self.cases.stop_job(worker, job, _actor(req)))


class JobOutput(_Base):
    scopes = {"GET": READ}

    async def on_get(self, req, resp, worker, job):
        sse = "text/event-stream" in (req.get_header("Accept") or "")
        offset = req.get_param_as_int(
            "offset", min_value=0, max_value=MAX_OFFSET, default=0
        )
        last_id = req.get_header("Last-Event-ID")
        if sse and last_id:
            if (
                not (last_id.isascii() and last_id.isdigit())
                or int(last_id) > MAX_OFFSET
            ):
                raise InvalidArgument(
                    "Last-Event-ID must be a byte offset from an earlier event's id"
                )
            offset = int(last_id)
        # An event stream follows unless told not to; plain text does not.
        follow = req.get_param_as_bool("follow", default=sse)
        await self.stream_output(req, resp, worker, job, offset, follow, sse=sse)


# -- fan-out -------------------------------------------------------------------


class FanOutJobs(_Base):
    scopes = {"POST": RUN}

    def __init__(self, fanout, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fanout = fanout

    async def on_post(self, req, resp):
        spec = body.parse(model.FANOUT, await self.body(req))
        # The one selector given (workers, labels or all); the rest is the job.
        selector = {k: spec.pop(k) for k in model.FANOUT.exactly_one if k in spec}
        result = await self.fanout.start(selector, spec)
        resp.location = f"/v1/groups/{result['group_id']}"
        _json(resp, result, 201)


class Group(_Base):
    scopes = {"GET": READ}

    def __init__(self, fanout, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fanout = fanout

    async def on_get(self, req, resp, group):
        wait = req.get_param_as_bool("wait", default=False)
        _json(resp, await self.fanout.status(group, wait))


# -- the original API, kept for its clients -----------------------------------


class LegacyStart(_Base):
    scopes = {"POST": RUN}

    async def on_post(self, req, resp):
        b = body.parse(model.LEGACY_START, await self.body(req))
        # The original design's clients name scripts by their path from the
        # worker's working directory; the worker's own check of the result
        # (inside its scripts directory) is the same either way.
        prefix = self.cases.cfg.http.original_path_prefix
        if prefix and b["path"].startswith(prefix):
            b["path"] = b["path"][len(prefix) :]
        job, _ = await self.cases.start_job(b.pop("worker_id"), **b)
        _json(resp, {"job_id": job["job_id"]}, 201)


class LegacyStop(_Base):
    scopes = {"POST": RUN}

    async def on_post(self, req, resp):
        b = body.parse(model.LEGACY_JOB, await self.body(req))
        await self.cases.stop_job(b["worker_id"], b["job_id"], _actor(req))
        _json(resp, {"success": True})


class LegacyQuery(_Base):
    scopes = {"POST": READ}

    async def on_post(self, req, resp):
        b = body.parse(model.LEGACY_JOB, await self.body(req))
        job = await self.cases.get_job(b["worker_id"], b["job_id"])
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
    scopes = {"POST": READ}

    async def on_post(self, req, resp):
        b = body.parse(model.LEGACY_JOB, await self.body(req))
        await self.stream_output(req, resp, b["worker_id"], b["job_id"], 0, True)
