"""The drain: kept on the worker's disk, and what the scheduler does with it."""

from __future__ import annotations

import errno
import json
import os

import pytest
import schedulerapp
from asyncsupport import run_async

from jobgate.errors import Unavailable
from jobgate.v1 import worker_pb2
from worker.drain import FILE_NAME, Drain

# -- the worker's record of it ----------------------------------------------------


def test_a_drain_is_written_to_disk_and_read_back_by_a_restarted_worker(tmp_path):
    drain = Drain(tmp_path)
    assert (drain.state, drain.reason) == (None, "")
    state = drain.set(True, "token ops", 1747043412.031)
    assert state is not None and state.requested_by == "token ops"
    assert drain.reason == "draining: asked by token ops at 2025-05-12T09:50:12.031Z"
    on_disk = json.loads((tmp_path / FILE_NAME).read_text())
    assert on_disk == {"requested_by": "token ops", "since": 1747043412.031}
    assert os.stat(tmp_path / FILE_NAME).st_mode & 0o777 == 0o600
    # Nothing half-written is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILE_NAME]

    again = Drain(tmp_path)  # the worker restarted
    assert again.state == state
    assert again.reason == drain.reason


def test_lifting_a_drain_removes_it_for_good(tmp_path):
    drain = Drain(tmp_path)
    drain.set(True, "token ops", 100.0)
    assert drain.set(False, "token ops", 200.0) is None
    assert drain.reason == ""
    assert not (tmp_path / FILE_NAME).exists()
    assert Drain(tmp_path).state is None
    # Lifting it again changes nothing.
    assert drain.set(False, "token ops", 300.0) is None


def test_a_second_drain_keeps_who_asked_first_and_when(tmp_path):
    drain = Drain(tmp_path)
    first = drain.set(True, "token ops", 100.0)
    assert drain.set(True, "token other", 200.0) == first
    assert Drain(tmp_path).state == first


def test_listeners_hear_of_a_change_only(tmp_path):
    drain = Drain(tmp_path)
    heard = []
    drain.on_change(heard.append)
    drain.set(True, "token ops", 100.0)
    drain.set(True, "token ops", 150.0)
    drain.set(False, "token ops", 200.0)
    assert [s.requested_by if s else None for s in heard] == ["token ops", None]


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        '{"since": 1}',
        '["x"]',
        "",
        # Numbers that are no time: they must not crash the worker's start.
        '{"requested_by": "token ops", "since": 1e20}',
        '{"requested_by": "token ops", "since": 1e400}',
        '{"requested_by": "token ops", "since": NaN}',
        '{"requested_by": "token ops", "since": -5}',
    ],
)
def test_an_unreadable_drain_file_keeps_the_worker_drained(tmp_path, text):
    (tmp_path / FILE_NAME).write_text(text)
    drain = Drain(tmp_path)
    assert drain.state is not None
    assert drain.reason.startswith("draining: asked by an unknown client")
    assert "unreadable" in drain.reason
    # Lifting it is the way back.
    drain.set(False, "token ops", 1.0)
    assert Drain(tmp_path).state is None


def test_a_drain_that_cannot_be_written_changes_nothing(tmp_path, monkeypatch):
    drain = Drain(tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        drain.set(True, "token ops", 100.0)
    assert drain.state is None
    assert not (tmp_path / FILE_NAME).exists()


# -- the scheduler's use case -----------------------------------------------------


class FakeWorkerStub:
    """A worker's stub answering SetDrain as a worker with ``running`` jobs."""

    def __init__(self, running: int = 0):
        self.running = running
        self.calls: list[tuple[worker_pb2.SetDrainRequest, float]] = []

    async def SetDrain(self, request, timeout, metadata=()):  # noqa: N802
        self.calls.append((request, timeout))
        if not request.enable:
            return worker_pb2.DrainState(running_jobs=self.running)
        reason = f"draining: asked by {request.requested_by} at T"
        return worker_pb2.DrainState(
            draining=True,
            requested_by=request.requested_by,
            since=1.0,
            degraded=reason,
            running_jobs=self.running,
        )


class FakePool:
    def __init__(self, stub):
        self._stub = stub

    def stub(self, worker):
        return self._stub


@pytest.fixture
def cases(tmp_path):
    use_cases = schedulerapp.use_cases(
        tmp_path,
        {"t": ("test", "run")},
        workers="max_wait_s = 120\nrpc_timeout_s = 5\nretry_after_s = 7",
    )
    store = use_cases.store
    store.register_worker("worker-1", "127.0.0.1:1", {}, 4, "test")
    stub = FakeWorkerStub(running=2)
    use_cases.pool = FakePool(stub)
    return use_cases, stub


def test_a_drain_is_recorded_at_once_and_starts_are_refused_naming_it(cases):
    use_cases, stub = cases
    result = {}

    @run_async
    async def go():
        result["drain"] = await use_cases.drain_worker(
            "worker-1", True, "token ops", wait=False
        )
        with pytest.raises(Unavailable) as refused:
            await use_cases.start_job("worker-1", "bash", "count.sh", [])
        result["refused"] = refused.value

    go()
    worker, idle = result["drain"]
    assert idle is False  # two jobs still run
    assert worker["draining"] is True
    assert worker["degraded"] == "draining: asked by token ops at T"
    assert worker["running_jobs"] == 2
    request, timeout = stub.calls[0]
    assert (request.enable, request.requested_by, request.wait_s) == (
        True,
        "token ops",
        0.0,
    )
    assert timeout == 5
    # Refused before the worker is asked, with the Retry-After of any 503.
    refused = result["refused"]
    assert "worker 'worker-1' is drained" in str(refused)
    assert "draining: asked by token ops at T" in str(refused)
    assert refused.retry_after_s == 7
    assert use_cases.get_worker("worker-1")["draining"] is True


def test_a_drain_with_wait_asks_the_worker_to_wait_up_to_max_wait_s(cases):
    use_cases, stub = cases
    stub.running = 0
    result = {}

    @run_async
    async def go():
        result["drain"] = await use_cases.drain_worker(
            "worker-1", True, "token ops", wait=True
        )

    go()
    worker, idle = result["drain"]
    assert idle is True and worker["running_jobs"] == 0
    request, timeout = stub.calls[0]
    assert request.wait_s == 120
    assert timeout == 125  # the wait and an ordinary call's deadline


def test_lifting_a_drain_makes_the_worker_take_jobs_again(cases):
    use_cases, stub = cases
    result = {}

    @run_async
    async def go():
        await use_cases.drain_worker("worker-1", True, "token ops")
        result["undrain"] = await use_cases.drain_worker(
            "worker-1", False, "token ops", wait=True
        )

    go()
    worker, _ = result["undrain"]
    assert (worker["draining"], worker["degraded"]) == (False, None)
    # Lifting a drain never waits.
    assert stub.calls[1][0].wait_s == 0.0


def test_a_failed_sync_of_the_directory_keeps_the_change_it_follows(
    tmp_path, monkeypatch
):
    drain = Drain(tmp_path)
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "I/O error")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert drain.set(True, "token ops", 100.0) is not None
    assert drain.state is not None and (tmp_path / FILE_NAME).exists()
    assert drain.set(False, "token ops", 200.0) is None
    assert drain.state is None and not (tmp_path / FILE_NAME).exists()
