"""Heartbeat pacing: the interval grows with the fleet, the timeout with it.

The scheduler hands each worker an interval of at least
``[workers].heartbeat_interval_s`` and long enough that all workers together
send at most ``max_heartbeats_per_s``; each worker's unreachable timeout
keeps the configured proportion to the interval it was given. These tests
use a tiny rate so that three workers already stretch the interval.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import pytest

from jobgate.errors import SchedulerUnavailable
from jobgate.tls import TLSConfig
from jobgate.v1 import scheduler_pb2
from scheduler.config import (
    AuthSection,
    ClusterSection,
    HttpSection,
    SchedulerConfig,
    WorkersSection,
)
from scheduler.membership import MembershipServicer, Pacing
from scheduler.store import ONLINE, UNREACHABLE, SqliteStore
from worker.registration import Registrar


def highest(low: float, high: float) -> float:
    """A stand-in for random.uniform that always picks the longest interval."""
    return high


def workers_section(**kw) -> WorkersSection:
    settings = {
        "heartbeat_interval_s": 1.0,
        "heartbeat_timeout_s": 4.0,
        "max_heartbeats_per_s": 1.0,
        "heartbeat_jitter": 0.0,
        "heartbeat_flush_s": 0.05,
    }
    settings.update(kw)
    return WorkersSection(**settings)


# -- Pacing ----------------------------------------------------------------------


def test_small_fleets_get_the_configured_interval():
    pacing = Pacing(workers_section(max_heartbeats_per_s=200.0))
    assert pacing.base(1) == 1.0
    assert pacing.base(200) == 1.0


def test_interval_grows_with_the_fleet_beyond_the_rate():
    pacing = Pacing(workers_section(max_heartbeats_per_s=200.0))
    assert pacing.base(5000) == 25.0
    # 5,000 workers at 25 s send 200 heartbeats a second.
    assert 5000 / pacing.base(5000) == 200.0


def test_timeout_keeps_the_configured_ratio():
    pacing = Pacing(workers_section(heartbeat_interval_s=5.0, heartbeat_timeout_s=15.0))
    assert pacing.timeout(5.0) == 15.0
    assert pacing.timeout(25.0) == 75.0


def test_jitter_only_lengthens_the_interval():
    seen = []

    def uniform(low, high):
        seen.append((low, high))
        return (low + high) / 2

    pacing = Pacing(workers_section(heartbeat_jitter=0.2), uniform)
    assert pacing.interval(10.0, previous=10.0) == pytest.approx(11.0)
    assert seen[-1] == (10.0, pytest.approx(12.0))


def test_a_growing_interval_is_first_spread_between_old_and_new():
    seen = []
    pacing = Pacing(
        workers_section(heartbeat_jitter=0.0), lambda lo, hi: seen.append((lo, hi))
    )
    pacing.interval(25.0, previous=5.0)
    assert seen == [(5.0, 25.0)]


def test_a_shrinking_interval_applies_at_once():
    pacing = Pacing(workers_section(heartbeat_jitter=0.0))
    assert pacing.interval(2.0, previous=25.0) == 2.0


# -- the membership service ------------------------------------------------------


class FakeContext:
    """A gRPC servicer context whose caller is the worker ``name``."""

    def __init__(self, name: str):
        self.name = name

    def auth_context(self):
        return {
            "peer_uri": [f"spiffe://dev/worker/{self.name}".encode()],
            "x509_pem_cert": [f"certificate of {self.name}".encode()],
        }


def scheduler_cfg(tmp_path: Path, **workers) -> SchedulerConfig:
    return SchedulerConfig(
        cluster=ClusterSection(name="dev"),
        tls=TLSConfig(
            ca_file=tmp_path / "ca.pem",
            cert_file=tmp_path / "s.pem",
            key_file=tmp_path / "s.key",
        ),
        auth=AuthSection(tokens_file=tmp_path / "tokens"),
        http=HttpSection(scheme="http"),
        workers=workers_section(**workers),
    )


@pytest.fixture
def membership(tmp_path):
    cfg = scheduler_cfg(tmp_path)
    store = SqliteStore(tmp_path / "state.db")
    store.initialize()
    servicer = MembershipServicer(cfg, store, Pacing(cfg.workers, highest))
    yield servicer
    servicer.heartbeats.close()


def register(servicer: MembershipServicer, name: str):
    return servicer.Register(
        scheduler_pb2.RegisterRequest(
            name=name, address="127.0.0.1:9", capacity=1, version="test"
        ),
        FakeContext(name),
    )


def heartbeat(servicer: MembershipServicer, name: str, worker_id: str):
    return servicer.Heartbeat(
        scheduler_pb2.HeartbeatRequest(worker_id=worker_id), FakeContext(name)
    )


def test_three_workers_stretch_a_rate_of_one_per_second(membership):
    # 1 heartbeat/s at most: the n-th worker to register makes it n seconds.
    ids = {}
    for n, name in enumerate(("w1", "w2", "w3"), start=1):
        resp = register(membership, name)
        assert resp.heartbeat_interval_s == pytest.approx(float(n))
        ids[name] = resp.worker_id
    assert membership.active_workers() == 3
    # The first worker learns the longer interval with its next heartbeat.
    resp = heartbeat(membership, "w1", ids["w1"])
    assert not resp.reregister
    assert resp.heartbeat_interval_s == pytest.approx(3.0)


def test_the_timeout_of_each_worker_follows_its_interval(membership):
    ids = {name: register(membership, name).worker_id for name in ("w1", "w2", "w3")}
    heartbeat(membership, "w1", ids["w1"])  # given 3 s: timeout 12 s
    membership.heartbeats.flush()
    row = membership.store.get_worker(ids["w1"])
    assert row.heartbeat_timeout_s == pytest.approx(12.0)
    configured = membership.cfg.workers.heartbeat_timeout_s
    # Silent for longer than the configured 4 s, but not than its own 12 s.
    assert row.effective_state(row.last_seen_at + 5.0, configured) == ONLINE
    assert row.effective_state(row.last_seen_at + 12.5, configured) == UNREACHABLE
    # Every list the scheduler derives states from says the same.
    listed = {w.id: w for w in membership.store.list_workers()}
    assert listed[ids["w1"]].effective_state(row.last_seen_at + 5, configured) == (
        ONLINE
    )


def test_the_interval_shrinks_when_workers_leave(membership):
    ids = {name: register(membership, name).worker_id for name in ("w1", "w2", "w3")}
    membership.Deregister(
        scheduler_pb2.DeregisterRequest(worker_id=ids["w3"]), FakeContext("w3")
    )
    assert membership.active_workers() == 2
    resp = heartbeat(membership, "w1", ids["w1"])
    assert resp.heartbeat_interval_s == pytest.approx(2.0)


def test_silent_workers_stop_counting(membership):
    ids = {name: register(membership, name).worker_id for name in ("w1", "w2", "w3")}
    # w2 and w3 went silent: their timeouts have passed.
    for name in ("w2", "w3"):
        membership._deadlines[ids[name]] = time.monotonic() - 1.0
        membership.store._run(
            "UPDATE workers SET last_seen_at = :t WHERE id = :id",
            {"t": time.time() - 100.0, "id": ids[name]},
        )
    membership._recount_at = 0.0
    assert membership.active_workers() == 1
    assert heartbeat(membership, "w1", ids["w1"]).heartbeat_interval_s == 1.0
    # An overdue worker that is heard from again counts again.
    heartbeat(membership, "w2", ids["w2"])
    assert membership.active_workers() == 2


@contextlib.contextmanager
def two_schedulers(tmp_path: Path):
    """Two schedulers' membership services on one state database."""
    cfg = scheduler_cfg(tmp_path)
    store = SqliteStore(tmp_path / "state.db")
    store.initialize()
    a = MembershipServicer(cfg, store, Pacing(cfg.workers, highest))
    b = MembershipServicer(cfg, store, Pacing(cfg.workers, highest))
    try:
        yield a, b, store
    finally:
        a.heartbeats.close()
        b.heartbeats.close()


def test_each_of_several_schedulers_paces_for_the_whole_fleet(tmp_path):
    with two_schedulers(tmp_path) as (a, b, _):
        for name in ("w1", "w2", "w3"):
            register(a, name)
        # None of them heartbeats to b; b counts them all the same.
        b._recount_at = 0.0
        assert b.active_workers() == 3


def test_a_worker_deregistered_through_another_scheduler_registers_again(tmp_path):
    with two_schedulers(tmp_path) as (a, b, store):
        worker_id = register(a, "w1").worker_id
        b.Deregister(
            scheduler_pb2.DeregisterRequest(worker_id=worker_id), FakeContext("w1")
        )
        # a still has it online in memory: it takes the beat, and its flush
        # finds the row offline, so a forgets it as online.
        assert not heartbeat(a, "w1", worker_id).reregister
        a.heartbeats.flush()
        assert heartbeat(a, "w1", worker_id).reregister
        assert a.active_workers() == 0
        assert store.get_worker(worker_id).state == "offline"


class FailingStore:
    """A store whose heartbeat writes fail while ``down`` is set."""

    def __init__(self, store):
        self.store = store
        self.down = False

    def heartbeats(self, beats):
        if self.down:
            raise SchedulerUnavailable("the state database does not answer")
        return self.store.heartbeats(beats)

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_heartbeats_that_cannot_be_written_are_kept_and_then_refused(tmp_path):
    cfg = scheduler_cfg(tmp_path, heartbeat_flush_s=3600.0)
    store = SqliteStore(tmp_path / "state.db")
    store.initialize()
    failing = FailingStore(store)
    servicer = MembershipServicer(cfg, failing, Pacing(cfg.workers, highest))
    try:
        worker_id = register(servicer, "w1").worker_id
        registered = store.get_worker(worker_id).last_seen_at
        time.sleep(0.01)
        heartbeat(servicer, "w1", worker_id)
        failing.down = True
        with pytest.raises(SchedulerUnavailable):
            servicer.heartbeats.flush()
        # A failing flush for less than three intervals: beats still taken.
        heartbeat(servicer, "w1", worker_id)
        # For longer, refused: the worker had better fail over.
        servicer.heartbeats.failing_since -= 3 * 3600.0 + 1
        with pytest.raises(SchedulerUnavailable, match="has not written heartbeats"):
            heartbeat(servicer, "w1", worker_id)
        # Back: the beats kept are written, and beats are taken again.
        failing.down = False
        servicer.heartbeats.flush()
        assert servicer.heartbeats.failing_for() == 0.0
        assert store.get_worker(worker_id).last_seen_at > registered
        assert not heartbeat(servicer, "w1", worker_id).reregister
    finally:
        failing.down = False
        servicer.heartbeats.close()


def test_a_slow_flush_is_no_reason_to_refuse_a_quarter_of_the_timeout_long(tmp_path):
    # Flushes every 0.05 s, workers unreachable after 4 s: heartbeats are
    # refused once flushes fail (or one hangs) for 1 s, not for 0.15 s.
    cfg = scheduler_cfg(tmp_path, heartbeat_flush_s=0.05)
    store = SqliteStore(tmp_path / "state.db")
    store.initialize()
    servicer = MembershipServicer(cfg, store, Pacing(cfg.workers, highest))
    try:
        worker_id = register(servicer, "w1").worker_id
        servicer.heartbeats._flushing_since = time.monotonic() - 0.5
        heartbeat(servicer, "w1", worker_id)  # slow, but not for long
        servicer.heartbeats._flushing_since = time.monotonic() - 1.1
        with pytest.raises(SchedulerUnavailable, match="for 1.1s"):
            heartbeat(servicer, "w1", worker_id)
    finally:
        servicer.heartbeats._flushing_since = None
        servicer.heartbeats.close()


def test_a_restarted_scheduler_keeps_the_timeouts_it_gave(tmp_path):
    cfg = scheduler_cfg(tmp_path)
    store = SqliteStore(tmp_path / "state.db")
    store.initialize()
    first = MembershipServicer(cfg, store, Pacing(cfg.workers, highest))
    ids = {name: register(first, name).worker_id for name in ("w1", "w2", "w3")}
    first.heartbeats.close()
    again = MembershipServicer(cfg, store, Pacing(cfg.workers, highest))
    try:
        assert again.active_workers() == 3
        assert heartbeat(again, "w3", ids["w3"]).heartbeat_interval_s == 3.0
    finally:
        again.heartbeats.close()


# -- the state database ----------------------------------------------------------

VERSION_1_WORKERS = """
CREATE TABLE workers (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    address       TEXT NOT NULL,
    labels        TEXT NOT NULL DEFAULT '{}',
    capacity      INTEGER NOT NULL DEFAULT 0,
    version       TEXT NOT NULL DEFAULT '',
    state         TEXT NOT NULL CHECK (state IN ('online', 'offline')),
    registered_at REAL NOT NULL,
    last_seen_at  REAL NOT NULL,
    running_jobs  INTEGER NOT NULL DEFAULT 0
);
INSERT INTO workers VALUES ('id-1', 'w1', '127.0.0.1:9', '{}', 4, '0.1.0',
                            'online', 100.0, 200.0, 0);
PRAGMA user_version = 1;
"""


@pytest.mark.parametrize("version", [0, 1])
def test_a_database_from_before_keeps_its_workers(tmp_path, version):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(VERSION_1_WORKERS.replace("= 1;", f"= {version};"))
    conn.close()
    store = SqliteStore(path)
    store.initialize()
    (row,) = store.list_workers()
    assert (row.name, row.capacity, row.heartbeat_timeout_s) == ("w1", 4, 0.0)
    # Without a timeout of its own, the configured one applies.
    assert row.effective_state(214.0, 15.0) == ONLINE
    assert row.effective_state(216.0, 15.0) == UNREACHABLE
    store.heartbeats({"id-1": (300.0, 2, 45.0)})
    row = store.get_worker("id-1")
    assert (row.last_seen_at, row.running_jobs, row.heartbeat_timeout_s) == (
        300.0,
        2,
        45.0,
    )
    store.initialize()  # a second start changes nothing
    assert store.get_worker("id-1") == row


# -- the worker ------------------------------------------------------------------


class FakeStub:
    """Answers heartbeats with the intervals given, then stops the worker."""

    def __init__(self, intervals, stop: threading.Event):
        self.intervals = list(intervals)
        self.stop = stop
        self.times: list[float] = []
        self.requests: list = []

    def Heartbeat(self, request, timeout):  # noqa: N802 - the gRPC method name
        self.times.append(time.monotonic())
        self.requests.append(request)
        if not self.intervals:
            self.stop.set()
            return scheduler_pb2.HeartbeatResponse()
        return scheduler_pb2.HeartbeatResponse(
            heartbeat_interval_s=self.intervals.pop(0)
        )


class FakeSchedulerSection:
    rpc_timeout_s = 1.0


class FakeWorkerConfig:
    scheduler = FakeSchedulerSection()


def bare_registrar(stop: threading.Event, intervals, interval: float) -> Registrar:
    registrar = Registrar.__new__(Registrar)
    registrar.cfg = FakeWorkerConfig()
    registrar.worker_id = "id-1"
    registrar.running_jobs = lambda: 0
    registrar.degraded = lambda: ""
    registrar.draining = lambda: False
    registrar.heartbeat_interval = interval
    registrar._stop = stop
    registrar._nudged = threading.Event()
    registrar.addresses = ("scheduler-1:7443",)
    registrar._current = 0
    registrar._stubs = [FakeStub(intervals, stop)]
    return registrar


class Unanswered(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "connection refused"


class DeadStub:
    """A scheduler that does not answer (its process is gone)."""

    def __init__(self):
        self.timeouts: list[float] = []

    def Heartbeat(self, request, timeout):  # noqa: N802 - the gRPC method name
        self.timeouts.append(timeout)
        raise Unanswered()


def test_a_heartbeat_goes_to_the_next_scheduler_when_one_does_not_answer():
    stop = threading.Event()
    registrar = bare_registrar(stop, [0.05, 0.05], 2.0)
    alive = registrar._stubs[0]
    dead = DeadStub()
    registrar.addresses = ("scheduler-1:7443", "scheduler-2:7443")
    registrar._stubs = [dead, alive]
    started = time.monotonic()
    registrar._heartbeat_loop()
    # The first heartbeat failed over at once, within its interval, and the
    # worker stays with the scheduler that answers.
    assert len(dead.timeouts) == 1
    assert dead.timeouts[0] <= 2.0 / 2  # half the interval, for the next one
    assert len(alive.times) == 3
    assert alive.times[0] - started < 2.0 + 0.5
    assert registrar.address_in_use == "scheduler-2:7443"


def test_a_refusal_is_not_a_reason_to_fail_over():
    registrar = bare_registrar(threading.Event(), [], 1.0)
    registrar.addresses = ("scheduler-1:7443", "scheduler-2:7443")

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.PERMISSION_DENIED

    assert not registrar._fail_over(Refused())
    assert registrar.address_in_use == "scheduler-1:7443"


def test_the_worker_adopts_the_interval_each_heartbeat_answer_gives():
    stop = threading.Event()
    registrar = bare_registrar(stop, [0.4, 0.05, 0.0], 0.05)
    started = time.monotonic()
    registrar._heartbeat_loop()
    times = [t - started for t in registrar._stub.times]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) == 4
    assert times[0] < 0.3
    assert 0.38 <= gaps[0] < 0.8  # the longer interval
    assert gaps[1] < 0.3  # and back
    # An answer without an interval (an older scheduler) keeps the last one.
    assert gaps[2] < 0.3
    assert registrar.heartbeat_interval == 0.05


def test_a_worker_that_degrades_tells_the_scheduler_at_once_and_why():
    stop = threading.Event()
    registrar = bare_registrar(stop, [60.0, 60.0], 60.0)
    reason = ""
    registrar.degraded = lambda: reason
    loop = threading.Thread(target=registrar._heartbeat_loop, daemon=True)
    loop.start()
    try:
        reason = "cannot write job output in /state: No space left on device"
        registrar.nudge()
        deadline = time.monotonic() + 5
        while not registrar._stub.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        # The interval is a minute; the heartbeat went out at once.
        assert [r.degraded for r in registrar._stub.requests] == [reason]
        reason = ""
        registrar.nudge()
        while len(registrar._stub.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # And when it recovers.
        assert [r.degraded for r in registrar._stub.requests] == [
            "cannot write job output in /state: No space left on device",
            "",
        ]
    finally:
        stop.set()
        registrar._nudged.set()
        loop.join(5)


def test_a_worker_drained_tells_the_scheduler_at_once_in_its_heartbeat():
    stop = threading.Event()
    registrar = bare_registrar(stop, [60.0], 60.0)
    drained = False
    registrar.draining = lambda: drained
    registrar.degraded = lambda: "draining: asked by token ops at T" if drained else ""
    loop = threading.Thread(target=registrar._heartbeat_loop, daemon=True)
    loop.start()
    try:
        drained = True
        registrar.nudge()
        deadline = time.monotonic() + 5
        while not registrar._stub.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        # The interval is a minute; the heartbeat went out at once.
        assert [(r.draining, r.degraded) for r in registrar._stub.requests] == [
            (True, "draining: asked by token ops at T")
        ]
    finally:
        stop.set()
        registrar._nudged.set()
        loop.join(5)
