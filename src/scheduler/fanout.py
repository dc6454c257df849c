"""Jobs on many workers at once ("distributed jobs") and their groups.

A fan-out picks workers by explicit list, by labels or all of them, starts
the same job on each in parallel, and records the lot as a group. A worker
that cannot take the job (unknown, down, refusing) becomes an error entry of
the group, never a failure of the whole request: the entry carries the
status, title and description (as ``error``) that starting the job on that
worker alone is answered with, from the same map (``scheduler.http.errors``).
Group status asks every reachable worker for its job and answers for the
others from the scheduler's record, flagged ``stale``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable

from jobgate.errors import InvalidArgument, NotFound
from jobgate.jobstate import JobState
from scheduler.http.errors import problem
from scheduler.store import OFFLINE, WorkerRow
from scheduler.usecases import UseCases

log = logging.getLogger(__name__)


class FanOut:
    def __init__(self, cases: UseCases, max_parallel: int, max_workers: int):
        self.cases = cases
        self.max_parallel = max_parallel
        self.max_workers = max_workers

    async def _each(self, fn: Callable[..., Awaitable], items: Iterable) -> list:
        """``fn`` of every item, at most ``max_parallel`` at a time, in order."""
        gate = asyncio.Semaphore(self.max_parallel)

        async def one(item):
            async with gate:
                return await fn(item)

        return list(await asyncio.gather(*(one(item) for item in items)))

    def select(self, selector: dict) -> tuple[list[WorkerRow], list[dict]]:
        """Workers the selector names, and error entries for unknown ones.

        A worker named that is not online is among them: starting the job
        there reports its state as the same call on that worker alone would.
        """
        errors: list[dict] = []
        if "workers" in selector:
            chosen: list[WorkerRow] = []
            seen: set[str] = set()
            for ref in selector["workers"]:
                try:
                    worker = self.cases.find(ref)
                except NotFound as exc:
                    errors.append({"worker_id": ref, **problem(exc).entry()})
                    continue
                if worker.id not in seen:
                    seen.add(worker.id)
                    chosen.append(worker)
        else:
            wanted = selector.get("labels") or {}
            chosen = [
                w
                for w in self.cases.store.list_workers()
                if all(w.labels.get(k) == v for k, v in wanted.items())
                # Deregistered workers left on purpose; only an explicit list
                # reports them.
                and w.state != OFFLINE
            ]
        if len(chosen) > self.max_workers:
            raise InvalidArgument(
                f"the selector matches {len(chosen)} workers; one request may start "
                f"jobs on at most {self.max_workers} ([fanout].max_workers)"
            )
        return chosen, errors

    @staticmethod
    def _error(worker: WorkerRow, exc: Exception) -> dict:
        """The entry of a worker the job could not be started on."""
        doing = f"starting a fan-out job on worker {worker.name!r}"
        entry = problem(exc, doing=doing).entry()
        return {"worker_id": worker.id, "worker_name": worker.name, **entry}

    async def start(self, selector: dict, spec: dict) -> dict:
        targets, errors = await asyncio.to_thread(self.select, selector)
        if not targets and not errors:
            raise NotFound("no worker matches the selector; GET /v1/workers lists them")
        group_id = str(uuid.uuid4())
        await asyncio.to_thread(
            self.cases.store.create_group, group_id, {"selector": selector, **spec}, []
        )

        async def start_one(worker: WorkerRow):
            try:
                status, _ = await self.cases.start_job(
                    worker.id, group_id=group_id, **spec
                )
                return {
                    "worker_id": worker.id,
                    "worker_name": worker.name,
                    "job_id": status["job_id"],
                }, None
            except Exception as exc:  # noqa: BLE001 - becomes the worker's error entry
                return None, self._error(worker, exc)

        jobs = []
        for job, error in await self._each(start_one, targets):
            if job:
                jobs.append(job)
            else:
                errors.append(error)
        await asyncio.to_thread(self.cases.store.set_group_errors, group_id, errors)
        log.info(
            "group %s: started on %d workers, %d errors",
            group_id,
            len(jobs),
            len(errors),
            extra={"GROUP_ID": group_id},
        )
        return {"group_id": group_id, "jobs": jobs, "errors": errors}

    async def status(self, group_id: str, wait: bool = False) -> dict:
        found = await asyncio.to_thread(self.cases.store.get_group, group_id)
        if found is None:
            raise NotFound(f"no group {group_id!r}")
        request, errors, recorded = found

        async def fresh(job: dict) -> dict:
            try:
                if wait and job["state"] == JobState.RUNNING.value:
                    status = await self.cases.wait_job(job["worker_id"], job["job_id"])
                else:
                    status = await self.cases.get_job(job["worker_id"], job["job_id"])
                return {**status, "stale": False}
            except Exception as exc:  # noqa: BLE001 - answer from the record instead
                doing = f"asking for job {job['job_id']} of a group"
                reason = problem(exc, doing=doing).description
                return {**job, "stale": True, "stale_reason": reason}

        jobs = await self._each(fresh, recorded)
        for job in jobs:
            job.pop("recorded_at", None)
        counts: dict[str, int] = {}
        for job in jobs:
            counts[job["state"]] = counts.get(job["state"], 0) + 1
        return {
            "group_id": group_id,
            "command": request.get("command"),
            "path": request.get("path"),
            "args": request.get("args", []),
            "selector": request.get("selector"),
            "jobs": jobs,
            "errors": errors,
            "summary": {
                "jobs": len(jobs),
                "errors": len(errors),
                "states": counts,
                "done": all(j["state"] != JobState.RUNNING.value for j in jobs),
                "stale": sum(1 for j in jobs if j["stale"]),
            },
        }
