"""Identical worker reads that overlap in time share one call (scheduler.usecases)."""

from __future__ import annotations

import asyncio

import pytest
from asyncsupport import run_async, settle

from jobgate.errors import DeadlineExceeded, NotFound, Unavailable
from scheduler.worker_calls import SharedCalls

KEY = ("w", "j")


class Worker:
    """A fake worker read that waits until released, and counts its calls."""

    def __init__(self):
        self.calls = 0
        self.cancelled = 0
        self.release = asyncio.Event()
        self.fail: BaseException | None = None

    async def fetch(self) -> dict:
        self.calls += 1
        n = self.calls
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        return {"state": "running", "call": n}


async def arrive(shared: SharedCalls, fetch, key: tuple = KEY) -> asyncio.Task:
    """A request that shares ``key``, let run until it waits."""
    task = asyncio.ensure_future(shared.share(key, fetch))
    await settle()
    return task


@run_async
async def test_requests_arriving_during_a_call_get_its_answer():
    shared, worker = SharedCalls(), Worker()
    first = await arrive(shared, worker.fetch)
    waiting = [await arrive(shared, worker.fetch) for _ in range(5)]
    assert worker.calls == 1
    assert not any(t.done() for t in [first, *waiting])
    worker.release.set()
    answers = await asyncio.gather(first, *waiting)
    assert worker.calls == 1
    assert all(a == {"state": "running", "call": 1} for a in answers)


@run_async
async def test_each_request_gets_a_copy_of_the_answer_of_its_own():
    shared, worker = SharedCalls(), Worker()

    async def first_that_edits() -> dict:
        answer = await shared.share(KEY, worker.fetch)
        # Edited at once, before the waiting requests have run again.
        answer["state"] = "edited by the first"
        return answer

    first = asyncio.ensure_future(first_that_edits())
    await settle()
    waiting = [await arrive(shared, worker.fetch) for _ in range(2)]
    worker.release.set()
    answers = await asyncio.gather(first, *waiting)
    assert answers[0]["state"] == "edited by the first"
    assert [a["state"] for a in answers[1:]] == ["running", "running"]
    answers[1]["state"] = "edited by the second"
    assert answers[2]["state"] == "running"


@run_async
async def test_a_request_after_the_call_ended_makes_a_new_call():
    shared, worker = SharedCalls(), Worker()
    worker.release.set()
    assert (await shared.share(KEY, worker.fetch))["call"] == 1
    await settle()
    assert (await shared.share(KEY, worker.fetch))["call"] == 2
    await settle()
    assert shared._calls == {}


@run_async
async def test_different_jobs_do_not_share():
    shared, a, b = SharedCalls(), Worker(), Worker()
    ta = await arrive(shared, a.fetch, ("w", "a"))
    b.release.set()
    assert await shared.share(("w", "b"), b.fetch) == {"state": "running", "call": 1}
    assert not ta.done()
    a.release.set()
    assert await ta == {"state": "running", "call": 1}
    assert (a.calls, b.calls) == (1, 1)


@pytest.mark.parametrize(
    "error",
    [
        Unavailable("worker 'w' cannot be reached: connection refused"),
        NotFound("no job 'j'"),
    ],
    ids=["worker-unreachable", "no-such-job"],
)
@run_async
async def test_a_failed_call_is_not_shared(error):
    shared, worker = SharedCalls(), Worker()
    worker.fail = error
    first = await arrive(shared, worker.fetch)
    second = await arrive(shared, worker.fetch)
    assert worker.calls == 1
    worker.release.set()
    # The waiting request asked the worker itself, and got its own error.
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert worker.calls == 2
    assert results == [error, error]
    await settle()
    assert shared._calls == {}


@run_async
async def test_a_waiter_whose_shared_call_failed_gets_its_own_answer():
    shared, failing, healthy = SharedCalls(), Worker(), Worker()
    failing.fail = DeadlineExceeded("worker 'w' did not answer in time")
    first = await arrive(shared, failing.fetch)
    second = await arrive(shared, healthy.fetch)
    healthy.release.set()
    failing.release.set()
    with pytest.raises(DeadlineExceeded):
        await first
    assert await second == {"state": "running", "call": 1}
    assert (failing.calls, healthy.calls) == (1, 1)


@run_async
async def test_the_leader_sees_its_own_error():
    shared = SharedCalls()

    async def broken() -> dict:
        raise KeyError("job")

    with pytest.raises(KeyError):
        await shared.share(KEY, broken)
    await settle()
    assert shared._calls == {}


@run_async
async def test_a_cancelled_waiter_does_not_cancel_the_call_the_others_wait_for():
    shared, worker = SharedCalls(), Worker()
    first = await arrive(shared, worker.fetch)
    leaving, staying = [await arrive(shared, worker.fetch) for _ in range(2)]
    leaving.cancel()  # its client went away
    await settle()
    assert leaving.cancelled()
    assert worker.cancelled == 0
    worker.release.set()
    assert await first == {"state": "running", "call": 1}
    assert await staying == {"state": "running", "call": 1}
    assert (worker.calls, worker.cancelled) == (1, 0)


@run_async
async def test_a_cancelled_leader_does_not_cancel_the_call_its_waiters_wait_for():
    shared, worker = SharedCalls(), Worker()
    leader = await arrive(shared, worker.fetch)
    waiter = await arrive(shared, worker.fetch)
    leader.cancel()
    await settle()
    assert leader.cancelled()
    assert worker.cancelled == 0
    # A request arriving now still joins the call under way.
    late = await arrive(shared, worker.fetch)
    worker.release.set()
    assert await waiter == {"state": "running", "call": 1}
    assert await late == {"state": "running", "call": 1}
    assert (worker.calls, worker.cancelled) == (1, 0)
    await settle()
    assert shared._calls == {}
