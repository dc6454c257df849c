"""Two schedulers on one PostgreSQL database when the database fails them:
a restart of the database, and a network cut between one scheduler and it.

Nothing a client was told succeeded is lost: every start answered 201 is in
the index, read through either scheduler. No request gets a 500: while a
scheduler cannot reach the database it answers 503 "Scheduler unavailable",
which clients given both URLs take as a reason to try the other. Workers
stay online: one whose heartbeats cannot be written any more is refused, and
moves to the other scheduler.

The database server is each test's own (one is restarted, the other cut
off), listening on 127.0.0.1 and 127.0.0.2: the first scheduler reaches it at
127.0.0.2, the second at 127.0.0.1, so that a firewall rule on one address
cuts one scheduler off. The cut is made in a network namespace of the test's
own: the test runs itself again inside one (``unshare --net``), where the
rule never reaches the host's firewall.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_public_dir, need_postgres, skip_unless_required

from jobgate.client.api import SCHEDULER_UNAVAILABLE, Client
from jobgate.client.errors import ApiError, ConnectionFailed
from jobgate.dev import postgres as devpg
from jobgate.dev.cluster import DevCluster

pytestmark = pytest.mark.timeout(240)

WORKERS = ("ha-1", "ha-2")
IN_NETNS = "JOBGATE_TEST_IN_NETNS"
# Short database timeouts, so that a cut is found in seconds.
STATE_SETTINGS = "network_timeout_s = 3\npool_timeout_s = 1\nconnect_timeout_s = 2\n"
CUT_ADDRESS = "127.0.0.2"
# How long after the database is back every scheduler process has reconnected.
RECONNECT_S = 8.0


class FaultCluster(DevCluster):
    """The first scheduler reaches the database at :data:`CUT_ADDRESS`."""

    def scheduler_config(self, index: int = 0) -> Path:
        path = super().scheduler_config(index)
        text = path.read_text().replace("[state]\n", "[state]\n" + STATE_SETTINGS, 1)
        if index == 0:
            text = text.replace("@127.0.0.1:", f"@{CUT_ADDRESS}:", 1)
        path.write_text(text)
        return path


@pytest.fixture
def database():
    """A PostgreSQL server of the test's own, over TCP on both addresses."""
    need_postgres()
    directory = make_public_dir("jobgate-test-dbfault-")
    server = devpg.PostgresServer(
        directory,
        tcp=True,
        settings={"listen_addresses": f"'127.0.0.1,{CUT_ADDRESS}'"},
    )
    server.initialize()
    with open(server.data / "pg_hba.conf", "a") as hba:
        hba.write(f"host all all {CUT_ADDRESS}/32 scram-sha-256\n")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def cluster(database, scripts_dir):
    name = database.create_database().rsplit("/", 1)[1]
    directory = make_public_dir("jobgate-test-dbfault-cluster-")
    c = FaultCluster(
        directory,
        scripts_dir=scripts_dir,
        schedulers=2,
        store_url=database.url(name, tcp=True),
        store_password_file=database.password_file,
        scheduler_extra="heartbeat_flush_s = 0.2",
    )
    try:
        c.start(WORKERS)
        yield c
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


class Load:
    """Starts on every worker, through both schedulers, until stopped.

    One thread per worker and scheduler, each with a client given both URLs
    (its own first), as cron jobs spread over the schedulers would be.
    """

    def __init__(self, c: DevCluster):
        # (worker, job id, when, which thread)
        self.acknowledged: list[tuple[str, str, float, int]] = []
        # (time, error) of the 503 "Scheduler unavailable" answers and cut
        # connections, which a fault may cause; anything else is unexpected.
        self.refused: list[tuple[float, str]] = []
        self.unexpected: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(n, Client(",".join(c.urls[i:] + c.urls[:i]), c.token), worker),
                daemon=True,
            )
            for n, (worker, i) in enumerate(
                (w, i) for w in WORKERS for i in range(len(c.urls))
            )
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, n: int, client: Client, worker: str) -> None:
        while not self._stop.is_set():
            try:
                status, job = client.start_job(worker, "hello.sh", ["x"])
            except ApiError as exc:
                if exc.status == 503 and exc.title == SCHEDULER_UNAVAILABLE:
                    self.refused.append((time.monotonic(), str(exc)))
                else:
                    self.unexpected.append(str(exc))
            except ConnectionFailed as exc:
                self.refused.append((time.monotonic(), str(exc)))
            else:
                if status in (200, 201):
                    self.acknowledged.append(
                        (worker, job["job_id"], time.monotonic(), n)
                    )
                else:
                    self.unexpected.append(f"{status}: {job}")
            time.sleep(0.02)

    def acked_since(self, t: float) -> int:
        return sum(1 for _, _, at, _ in self.acknowledged if at > t)

    def every_thread_acked_since(self, t: float) -> bool:
        threads = {n for _, _, at, n in self.acknowledged if at > t}
        return len(threads) == len(self._threads)


def wait_for(predicate, timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` held; fails after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def assert_nothing_acknowledged_lost(c: DevCluster, load: Load, url: str) -> None:
    reader = Client(url, c.token)
    for worker, job_id, _, _ in load.acknowledged:
        assert reader.job(worker, job_id)["job_id"] == job_id


def assert_workers_online(c: DevCluster, url: str) -> None:
    reader = Client(url, c.token)
    assert {w["name"]: w["state"] for w in reader.workers()} == dict.fromkeys(
        WORKERS, "online"
    )


def test_a_restart_of_the_database_fails_no_request_once_it_is_back(database, cluster):
    load = Load(cluster)
    load.start()
    try:
        wait_for(lambda: load.acked_since(0) >= 20, 10, "starts before the restart")
        database.restart(down_s=1.0)
        back = time.monotonic()
        # Every scheduler process's pooled connections broke with the
        # restart; they are replaced as the pool reconnects.
        recovered_s = wait_for(
            lambda: load.acked_since(back) >= 20, 15, "starts after the restart"
        )
        # Each process's pool reconnects on its own, with a backoff (1, 2, 4 s
        # after its first failed try): every one is back within RECONNECT_S.
        settled = back + RECONNECT_S
        time.sleep(max(0.0, settled - time.monotonic()) + 2.0)
    finally:
        load.stop()
    assert not load.unexpected, load.unexpected[:5]
    # Once the database is back, no request fails for a connection the
    # restart broke (each is replaced, the statement done again); they may
    # only wait for their process's pool to reconnect, for a few seconds.
    broken = [
        e for t, e in load.refused if t > back and "no connection within" not in e
    ]
    assert not broken, broken[:5]
    late = [e for t, e in load.refused if t > settled]
    assert not late, late[:5]
    assert load.acked_since(settled) >= 20
    print(f"requests succeed again {recovered_s:.2f}s after the database is back")
    for url in cluster.urls:
        assert_nothing_acknowledged_lost(cluster, load, url)
        assert_workers_online(cluster, url)


def _netns_problem() -> str | None:
    if os.geteuid() != 0:
        return "a network namespace of the test's own needs root"
    for program in ("unshare", "ip", "iptables"):
        if shutil.which(program) is None:
            return f"{program} is not installed (make postgres-deps)"
    return None


def test_a_scheduler_cut_off_from_the_database_hands_over_to_the_other(
    request: pytest.FixtureRequest,
):
    if os.environ.get(IN_NETNS) != "1":
        problem = _netns_problem()
        if problem is not None:
            skip_unless_required(problem, "JOBGATE_REQUIRE_NETNS")
        # Again, inside a network namespace of its own (loopback only).
        run = subprocess.run(
            [
                "unshare",
                "--net",
                "--",
                "sh",
                "-c",
                'ip link set lo up && exec "$0" "$@"',
                sys.executable,
                *("-m", "pytest", request.node.nodeid, "-p", "no:randomly"),
                *("-p", "no:cacheprovider", "-q", "-s"),
            ],
            cwd=request.config.rootpath,
            env={**os.environ, IN_NETNS: "1"},
            capture_output=True,
            text=True,
            timeout=220,
            check=False,
        )
        print(run.stdout[-3000:])
        assert run.returncode == 0, f"{run.stdout[-8000:]}\n{run.stderr[-3000:]}"
        return
    cluster = request.getfixturevalue("cluster")
    port = request.getfixturevalue("database").port
    rules = [
        # Both ways, silently dropped: no reset, no error, as a cut cable.
        ["INPUT", "-p", "tcp", "-d", CUT_ADDRESS, "--dport", str(port), "-j", "DROP"],
        ["INPUT", "-p", "tcp", "-s", CUT_ADDRESS, "--sport", str(port), "-j", "DROP"],
    ]
    load = Load(cluster)
    load.start()
    try:
        wait_for(lambda: load.acked_since(0) >= 20, 10, "starts before the cut")
        for rule in rules:
            subprocess.run(["iptables", "-A", *rule], check=True, timeout=10)
        cut = time.monotonic()
        # Requests through the first scheduler wait for the database at most
        # network_timeout_s (3 s), get 503, and go to the second.
        handed_over_s = wait_for(
            lambda: load.every_thread_acked_since(cut), 8, "starts after the cut"
        )
        wait_for(lambda: load.acked_since(cut) >= 40, 10, "starts after the cut")
        first = Client(cluster.urls[0], cluster.token)
        with pytest.raises(ApiError) as refused:
            first.workers()
        assert (refused.value.status, refused.value.title) == (
            503,
            SCHEDULER_UNAVAILABLE,
        )
        # The workers' heartbeats went to the second scheduler: they are online
        # there past the heartbeat timeout (4 s in DevCluster).
        time.sleep(5.0)
        assert_workers_online(cluster, cluster.urls[1])
        for rule in rules:
            subprocess.run(["iptables", "-D", *rule], check=True, timeout=10)
        healed = time.monotonic()
        # The first scheduler serves again once its pool reconnects.
        healed_s = wait_for(
            lambda: _answers(first), 20, "the first scheduler after the cut healed"
        )
    finally:
        load.stop()
    assert not load.unexpected, load.unexpected[:5]
    assert load.acked_since(healed) > 0
    print(
        f"every client's starts went on within {handed_over_s:.1f}s of the "
        f"cut; the first scheduler served again "
        f"{healed_s:.1f}s after it healed"
    )
    assert_nothing_acknowledged_lost(cluster, load, cluster.urls[1])
    assert_nothing_acknowledged_lost(cluster, load, cluster.urls[0])
    assert_workers_online(cluster, cluster.urls[0])


def _answers(client: Client) -> bool:
    try:
        client.workers()
    except (ApiError, ConnectionFailed):
        return False
    return True
