"""Identical worker reads that overlap in time share one call (scheduler.gateway)."""

from __future__ import annotations

import threading
import time

import pytest

from scheduler.gateway import SharedCalls


class Worker:
    """A fake worker call that blocks until released and counts its calls."""

    def __init__(self):
        self.calls = 0
        self.release = threading.Event()
        self.entered = threading.Event()
        self.fail = False

    def fetch(self) -> dict:
        self.calls += 1
        self.entered.set()
        assert self.release.wait(5)
        if self.fail:
            raise RuntimeError("worker failed")
        return {"state": "running", "call": self.calls}


def in_thread(fn, *args):
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_requests_arriving_during_a_call_get_its_answer():
    shared, worker = SharedCalls(5.0), Worker()
    first, first_out = in_thread(shared.share, ("w", "j"), worker.fetch)
    assert worker.entered.wait(5)
    waiting = [in_thread(shared.share, ("w", "j"), worker.fetch) for _ in range(5)]
    time.sleep(0.05)
    worker.release.set()
    for t, _ in [(first, first_out), *waiting]:
        t.join(5)
    assert worker.calls == 1
    answers = [first_out["value"]] + [out["value"] for _, out in waiting]
    assert all(a == {"state": "running", "call": 1} for a in answers)
    # Each gets a copy of its own: changing one changes no other.
    answers[0]["state"] = "changed"
    assert answers[1]["state"] == "running"


def test_a_request_after_the_call_ended_makes_a_new_call():
    shared, worker = SharedCalls(5.0), Worker()
    worker.release.set()
    assert shared.share(("w", "j"), worker.fetch)["call"] == 1
    assert shared.share(("w", "j"), worker.fetch)["call"] == 2
    assert shared._calls == {}


def test_different_jobs_do_not_share():
    shared, a, b = SharedCalls(5.0), Worker(), Worker()
    ta, out_a = in_thread(shared.share, ("w", "a"), a.fetch)
    assert a.entered.wait(5)
    b.release.set()
    assert shared.share(("w", "b"), b.fetch) == {"state": "running", "call": 1}
    a.release.set()
    ta.join(5)
    assert (a.calls, b.calls) == (1, 1)


def test_a_failed_call_is_not_shared():
    shared, worker = SharedCalls(5.0), Worker()
    worker.fail = True
    first, first_out = in_thread(shared.share, ("w", "j"), worker.fetch)
    assert worker.entered.wait(5)
    second, second_out = in_thread(shared.share, ("w", "j"), worker.fetch)
    time.sleep(0.05)
    worker.release.set()
    first.join(5)
    second.join(5)
    # The waiting request asked the worker itself, and got its own error.
    assert worker.calls == 2
    assert isinstance(first_out["error"], RuntimeError)
    assert isinstance(second_out["error"], RuntimeError)
    assert shared._calls == {}


def test_a_request_stops_waiting_for_a_hung_call_after_the_timeout():
    shared, hung = SharedCalls(0.1), Worker()
    first, _ = in_thread(shared.share, ("w", "j"), hung.fetch)
    assert hung.entered.wait(5)
    began = time.monotonic()
    answer = shared.share(("w", "j"), lambda: {"state": "own"})
    assert answer == {"state": "own"}
    assert 0.09 <= time.monotonic() - began < 2
    hung.release.set()
    first.join(5)


def test_the_leader_sees_its_own_error():
    shared = SharedCalls(5.0)

    def broken():
        raise KeyError("job")

    with pytest.raises(KeyError):
        shared.share(("w", "j"), broken)
    assert shared._calls == {}
