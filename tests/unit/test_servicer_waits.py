"""The worker's long waits (WaitJob, a drain with a wait) are taken a slice at
a time and end once their caller has gone, so a client that gives up does not
hold a thread of the worker's gRPC server for up to [jobs].max_wait_s."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from worker import servicer
from worker.servicer import WorkerServicer


class Context:
    def __init__(self):
        self.active = True

    def is_active(self) -> bool:
        return self.active


@pytest.fixture
def waiter(monkeypatch) -> WorkerServicer:
    monkeypatch.setattr(servicer, "WAIT_SLICE_S", 0.05)
    runner = SimpleNamespace(cfg=SimpleNamespace(max_wait_s=0.5))
    return WorkerServicer(runner)  # type: ignore[arg-type]


def test_a_wait_ends_within_a_slice_once_its_caller_is_gone(waiter):
    context, slices = Context(), []

    def wait(seconds: float) -> bool:
        slices.append(seconds)
        time.sleep(seconds)
        if len(slices) == 3:
            context.active = False  # the client cancelled, or its deadline passed
        return False

    waiter._wait_while_asked(context, 60, wait)
    assert len(slices) == 3
    assert all(s <= 0.05 for s in slices)


def test_a_wait_ends_when_what_it_waits_for_happens(waiter):
    slices = []

    def wait(seconds: float) -> bool:
        slices.append(seconds)
        return len(slices) == 2

    waiter._wait_while_asked(Context(), 60, wait)
    assert len(slices) == 2


def test_a_wait_lasts_at_most_max_wait_s(waiter):
    began = time.monotonic()

    def wait(seconds: float) -> bool:
        time.sleep(seconds)
        return False

    waiter._wait_while_asked(Context(), 60, wait)
    assert 0.45 <= time.monotonic() - began < 2.0
