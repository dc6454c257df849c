"""The final statuses of ended jobs, kept in each HTTP process's memory."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from schedulerapp import use_cases

from scheduler.usecases import RecentRows


def status(job_id: str, worker_id: str, state: str) -> dict:
    return {"job_id": job_id, "worker_id": worker_id, "state": state, "exit_code": 0}


@pytest.fixture
def cases(tmp_path):
    cases = use_cases(tmp_path, {})
    # Every request not answered from memory reads the index here; none asks
    # a worker with the row it read before (test_worker_rows).
    cases._rows = RecentRows(0)
    worker = cases.store.register_worker("w1", "127.0.0.1:9", {}, 1, "test")
    for n in range(3):
        cases.store.record_job(status(f"j{n}", worker.id, "succeeded"))
    cases.store.record_job(status("r", worker.id, "running"))
    reads: list[tuple[str, str]] = []
    read = cases.store.find_worker_and_ended_job

    def counted(ref: str, job_id: str):
        reads.append((ref, job_id))
        return read(ref, job_id)

    cases.store.find_worker_and_ended_job = counted  # type: ignore[method-assign]
    cases.reads = reads  # type: ignore[attr-defined]
    yield cases
    cases.store.close()


def test_an_ended_job_polled_again_reads_no_database(cases):
    first = asyncio.run(cases.get_job("w1", "j0"))
    again = asyncio.run(cases.get_job("w1", "j0"))
    assert again == first and first["state"] == "succeeded"
    assert asyncio.run(cases.wait_job("w1", "j0")) == first
    assert cases.reads == [("w1", "j0")]


def test_a_running_job_is_never_kept(cases):
    for _ in range(2):
        worker, ended = cases._ended("w1", "r")
        assert ended is None and worker.name == "w1"
    assert len(cases.reads) == 2


def test_the_oldest_is_dropped_past_the_limit_and_none_kept_with_zero(cases):
    state = dataclasses.replace(cases.cfg.state, cached_ended_jobs=2)
    cases.cfg = dataclasses.replace(cases.cfg, state=state)
    for job_id in ("j0", "j1", "j2", "j2", "j1", "j0"):
        asyncio.run(cases.get_job("w1", job_id))
    # j0 was dropped for j2, and read again; j1 and j2 were still kept.
    assert [job for _, job in cases.reads] == ["j0", "j1", "j2", "j0"]
    state = dataclasses.replace(cases.cfg.state, cached_ended_jobs=0)
    cases.cfg = dataclasses.replace(cases.cfg, state=state)
    cases._ended_jobs.clear()
    asyncio.run(cases.get_job("w1", "j1"))
    asyncio.run(cases.get_job("w1", "j1"))
    assert [job for _, job in cases.reads][-2:] == ["j1", "j1"]
