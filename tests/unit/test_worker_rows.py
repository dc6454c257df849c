"""Status requests reuse the worker's row they read lately (scheduler.usecases)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from schedulerapp import use_cases

from jobgate.errors import NotFound, Unavailable
from jobgate.jobstate import JobState
from jobgate.v1 import common_pb2


class Worker:
    """A fake worker: its jobs' states, and the addresses it was called at."""

    def __init__(self, jobs: dict[str, JobState]):
        self.jobs = jobs
        self.calls: list[str] = []
        self.down: set[str] = set()  # addresses nothing answers at

    def stub(self, row):
        worker = self

        class Stub:
            async def GetJob(self, request, **_):  # noqa: N802 - the gRPC name
                worker.calls.append(row.address)
                if row.address in worker.down:
                    raise Unavailable(f"{row.address} cannot be reached", 1)
                state = worker.jobs.get(request.job_id)
                if state is None:
                    raise NotFound(f"job {request.job_id} not found")
                return common_pb2.Job(job_id=request.job_id, state=state.to_proto())

        return Stub()


@pytest.fixture
def cases(tmp_path):
    cases = use_cases(tmp_path, {})
    row = cases.store.register_worker("w1", "127.0.0.1:9", {}, 1, "test")
    cases.store.record_job({"job_id": "r", "worker_id": row.id, "state": "running"})
    worker = Worker({"r": JobState.RUNNING})
    cases.pool.stub = worker.stub  # type: ignore[method-assign]
    reads: list[str] = []
    read = cases.store.find_worker_and_ended_job

    def counted(ref: str, job_id: str):
        reads.append(job_id)
        return read(ref, job_id)

    cases.store.find_worker_and_ended_job = counted  # type: ignore[method-assign]
    cases.reads, cases.worker = reads, worker  # type: ignore[attr-defined]
    yield cases
    cases.store.close()


def get(cases, job_id: str = "r") -> dict:
    return asyncio.run(cases.get_job("w1", job_id))


def test_a_running_job_polled_again_asks_the_worker_without_a_database_read(cases):
    assert [get(cases)["state"] for _ in range(3)] == ["running"] * 3
    assert cases.reads == ["r"]
    assert cases.worker.calls == ["127.0.0.1:9"] * 3


def test_a_status_the_worker_gives_as_ended_is_kept(cases):
    get(cases)
    cases.worker.jobs["r"] = JobState.SUCCEEDED
    assert get(cases)["state"] == "succeeded"
    calls = len(cases.worker.calls)
    assert get(cases)["state"] == "succeeded"
    assert len(cases.worker.calls) == calls and cases.reads == ["r"]
    # ...and is in the index, for the other processes.
    assert cases.store.ended_job(cases.find("w1").id, "r")["state"] == "succeeded"


def test_a_worker_that_registered_anew_elsewhere_is_asked_there(cases):
    get(cases)
    cases.worker.down.add("127.0.0.1:9")
    cases.store.register_worker("w1", "127.0.0.1:10", {}, 1, "test")
    assert get(cases)["state"] == "running"
    assert cases.worker.calls == ["127.0.0.1:9", "127.0.0.1:9", "127.0.0.1:10"]
    assert cases.reads == ["r", "r"]


def test_a_failure_of_the_same_registration_is_not_asked_twice(cases):
    get(cases)
    cases.worker.down.add("127.0.0.1:9")
    with pytest.raises(Unavailable):
        get(cases)
    assert cases.worker.calls == ["127.0.0.1:9"] * 2
    del cases.worker.jobs["r"]
    cases.worker.down.clear()
    with pytest.raises(NotFound):
        get(cases)
    assert cases.worker.calls == ["127.0.0.1:9"] * 3
    assert cases.reads == ["r", "r", "r"]


def test_a_job_whose_end_another_process_recorded_answers_from_the_index(cases):
    get(cases)
    worker_id = cases.find("w1").id
    ended = {"job_id": "r", "worker_id": worker_id, "state": "failed"}
    cases.store.update_job(ended)  # by another HTTP process or scheduler
    del cases.worker.jobs["r"]  # the worker removed it since
    assert get(cases) == ended


def test_a_worker_row_gone_offline_is_read_again(cases):
    get(cases)
    cases.store.deregister(cases.find("w1").id)
    cases._rows.put("w1", cases.store.find_worker("w1"))
    with pytest.raises(Unavailable, match="offline"):
        get(cases)
    assert cases.worker.calls == ["127.0.0.1:9"]


def test_zero_reads_the_row_for_every_request(cases):
    state = dataclasses.replace(cases.cfg.state, cached_worker_s=0.0)
    cases.cfg = dataclasses.replace(cases.cfg, state=state)
    cases._rows.ttl_s = 0.0
    cases._rows.put("w1", cases.find("w1"))
    get(cases)
    get(cases)
    assert cases.reads == ["r", "r"]
