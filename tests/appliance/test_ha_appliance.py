"""Several schedulers on one PostgreSQL database, deployed by site.yml.

The module boots the lab's HA topology as ``make lab-ha`` does (``python -m
lab up --ha``: scheduler-1, scheduler-2, a database node and two workers, with
``ansible/inventories/lab/ha.ini``), and checks what an operator would see:
both schedulers serve the same API, the workers are online on both and know
both, the schedulers reach the database over TLS only, the virtual address
(keepalived) is on one ready scheduler, a second run changes nothing, and
with one scheduler killed the other goes on starting jobs, serving their
output and taking the workers' heartbeats, and the virtual address moves to
it.
The tests run in file order and build on each other's state.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from lab import cluster as lab_cluster

from .support import (
    HTTP_PORT,
    REPO,
    WORKERS,
    Deployment,
    LabApi,
    lab_command,
    need_ansible,
    need_lab_host,
    package_files,
    recap,
)

SCHEDULERS = lab_cluster.TOPOLOGIES["ha"].schedulers
DATABASE = lab_cluster.TOPOLOGIES["ha"].databases[0]
VIRTUAL_ADDRESS = lab_cluster.TOPOLOGIES["ha"].virtual_address
SCHEDULER_UNIT = "jobgate-scheduler.service"

# Booting five nodes and two playbook runs take a few minutes.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def ha(request: pytest.FixtureRequest):
    """The HA lab after ``python -m lab up --ha``; taken down at the end."""
    need_lab_host()
    need_ansible()
    debs = request.getfixturevalue("debs")
    package_files(debs)
    workdir = Path(tempfile.mkdtemp(prefix="jobgate-ha-appliance-"))
    scripts = workdir / "scripts"
    shutil.copytree(REPO / "examples" / "scripts", scripts)
    cluster = lab_cluster.Cluster(workdir / "lab", topology="ha")
    t0 = time.monotonic()
    up = lab_command(
        cluster.dir,
        "up",
        "--ha",
        "--debs",
        str(debs),
        "--scripts",
        str(scripts),
        "--port",
        "0",
    )
    print(f"python -m lab up --ha: {time.monotonic() - t0:.0f}s")
    try:
        lab = cluster.load()
        assert lab is not None, f"python -m lab up failed:\n{up.stdout}{up.stderr}"
        deployment = Deployment(cluster, lab, up)
        assert up.returncode == 0, (
            f"python -m lab up --ha failed ({up.returncode}):\n"
            f"{up.stdout[-8000:]}{up.stderr[-3000:]}\n{deployment.diagnostics()}"
        )
        yield deployment
    finally:
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)


def both_online(body: dict) -> bool:
    online = [w["name"] for w in body["workers"] if w["state"] == "online"]
    return sorted(online) == sorted(WORKERS)


def start_count(api: LabApi, worker: str, count: int) -> str:
    status, body = api.post(
        f"/v1/workers/{worker}/jobs",
        {"command": "bash", "path": "count.sh", "args": [str(count), "0.1"]},
    )
    assert status == 201, body
    return body["job_id"]


def read_output(api: LabApi, worker: str, job_id: str) -> bytes:
    status, out = api.get(
        f"/v1/workers/{worker}/jobs/{job_id}/output?follow=true", timeout=60
    )
    assert status == 200, (status, out)
    return out


def counted(count: int) -> bytes:
    return "".join(f"{i}\n" for i in range(1, count + 1)).encode()


def db_query(ha: Deployment, sql: str) -> list[list[str]]:
    """Rows of ``sql`` run as postgres on the database node."""
    res = ha.node(DATABASE).run(
        "psql", "-U", "postgres", "-AtF", "\t", "-d", "jobgate", "-c", sql
    )
    return [line.split("\t") for line in res.stdout.splitlines() if line]


def test_the_playbook_deploys_two_schedulers_a_database_and_the_workers(
    ha: Deployment,
):
    counts = recap(ha.runs[0].stdout)
    assert set(counts) == {*SCHEDULERS, DATABASE, *WORKERS}, ha.runs[0].stdout[-3000:]
    for host, c in counts.items():
        assert c["failed"] == 0 and c["unreachable"] == 0, (host, c)
        assert c["changed"] > 0, (host, c)
    for name in SCHEDULERS:
        node = ha.node(name)
        assert node.unit_property(SCHEDULER_UNIT, "ActiveState") == "active"
    database = ha.node(DATABASE)
    assert database.run("systemctl", "is-active", "postgresql@15-main").stdout == (
        "active\n"
    )
    # The database node runs no jobgate service and has no jobgate package.
    res = database.run("dpkg-query", "-W", "jobgate", check=False)
    assert res.returncode != 0, res.stdout


def test_the_database_password_is_a_secret_of_the_scheduler_user(ha: Deployment):
    kept = ha.pki / "database-jobgate.password"
    assert kept.stat().st_mode & 0o777 == 0o600
    password = kept.read_text().strip()
    assert len(password) >= 32
    for name in SCHEDULERS:
        node = ha.node(name)
        listing = node.run("stat", "-c", "%a %U %G", "/etc/jobgate/state-password")
        assert listing.stdout.split() == ["600", "jobgate", "jobgate"]
        config = node.run("cat", "/etc/jobgate/scheduler.toml").stdout
        state = tomllib.loads(config)["state"]
        assert password not in config
        assert state["password_file"] == "/etc/jobgate/state-password"
        address = ha.node(DATABASE).address
        assert state["url"] == (
            f"postgresql://jobgate@{address}:5432/jobgate"
            "?sslmode=verify-full&sslrootcert=/etc/jobgate/pki/ca.pem"
        )


def test_the_workers_know_every_scheduler(ha: Deployment):
    wanted = [f"{ha.node(name).address}:7443" for name in SCHEDULERS]
    for name in WORKERS:
        config = ha.node(name).run("cat", "/etc/jobgate/worker.toml").stdout
        assert tomllib.loads(config)["scheduler"] == {"addresses": wanted}


def test_the_workers_are_online_on_both_schedulers(ha: Deployment):
    for name in SCHEDULERS:
        ha.api(name).wait_for("/v1/workers", both_online)


def test_a_job_started_through_one_scheduler_is_seen_through_the_other(
    ha: Deployment,
):
    first, second = (ha.api(name) for name in SCHEDULERS)
    job_id = start_count(first, WORKERS[0], 3)
    assert read_output(second, WORKERS[0], job_id) == counted(3)
    status, body = second.get(f"/v1/workers/{WORKERS[0]}/jobs/{job_id}")
    assert status == 200 and body["state"] == "succeeded", body
    status, body = second.get(f"/v1/workers/{WORKERS[0]}/jobs")
    assert job_id in [j["job_id"] for j in body["jobs"]], body


def test_the_schedulers_reach_the_database_over_tls_only(ha: Deployment):
    rows = db_query(
        ha,
        "SELECT host(a.client_addr), s.ssl FROM pg_stat_activity a "
        "JOIN pg_stat_ssl s USING (pid) "
        "WHERE a.datname = 'jobgate' AND a.usename = 'jobgate'",
    )
    addresses = {ha.node(name).address for name in SCHEDULERS}
    assert {addr for addr, _ in rows} == addresses, rows
    assert all(ssl == "t" for _, ssl in rows), rows
    # The same role and password without TLS are refused by pg_hba.conf.
    password = (ha.pki / "database-jobgate.password").read_text().strip()
    address = ha.node(DATABASE).address
    probe = (
        "import sys, psycopg\n"
        "try:\n"
        "    psycopg.connect(sys.argv[1], password=sys.stdin.read().strip()).close()\n"
        "except psycopg.OperationalError as exc:\n"
        "    print('refused:', exc)\n"
        "else:\n"
        "    print('connected')\n"
    )
    node = ha.node(SCHEDULERS[0])
    python = "/opt/venvs/jobgate/bin/python"
    plain = f"host={address} dbname=jobgate user=jobgate sslmode=disable"
    res = node.run(python, "-c", probe, plain, input=password)
    assert res.stdout.startswith("refused:") and "no encryption" in res.stdout, (
        res.stdout + res.stderr
    )
    verified = (
        f"host={address} dbname=jobgate user=jobgate sslmode=verify-full "
        "sslrootcert=/etc/jobgate/pki/ca.pem"
    )
    res = node.run(python, "-c", probe, verified, input=password)
    assert res.stdout.strip() == "connected", res.stdout + res.stderr


def holders(ha: Deployment) -> list[str]:
    """The schedulers that have the virtual address on their interface."""
    return [
        name
        for name in SCHEDULERS
        if f" {VIRTUAL_ADDRESS}/"
        in ha.node(name).run("ip", "-o", "-4", "addr", "show", "dev", "eth0").stdout
    ]


def wait_for_holder(ha: Deployment, among: tuple[str, ...], timeout: float = 30):
    """The one scheduler of ``among`` holding the virtual address, once it does."""
    deadline = time.monotonic() + timeout
    held = holders(ha)
    while not (len(held) == 1 and held[0] in among) and time.monotonic() < deadline:
        time.sleep(0.5)
        held = holders(ha)
    assert len(held) == 1 and held[0] in among, (held, among)
    return held[0]


def vip_api(ha: Deployment) -> LabApi:
    return LabApi(ha.lab, VIRTUAL_ADDRESS, HTTP_PORT, ha.pki / "ca.pem")


def test_the_virtual_address_is_on_one_ready_scheduler(ha: Deployment):
    wait_for_holder(ha, SCHEDULERS)
    # Its HTTPS certificate names the address: verified like any other.
    vip_api(ha).wait_for("/v1/workers", both_online)
    config = ha.node(SCHEDULERS[0]).run("cat", "/etc/keepalived/keepalived.conf")
    assert f"{VIRTUAL_ADDRESS}/24 dev eth0" in config.stdout


def test_a_second_run_changes_nothing(ha: Deployment):
    res = ha.playbook()
    print(f"second run of site.yml: {res.duration:.0f}s")
    assert res.returncode == 0, res.stdout[-6000:]
    counts = recap(res.stdout)
    assert set(counts) == {*SCHEDULERS, DATABASE, *WORKERS}
    changed = {h: c["changed"] for h, c in counts.items() if c["changed"]}
    assert not changed, (changed, res.stdout[-6000:])


def test_with_one_scheduler_killed_the_other_serves_and_takes_heartbeats(
    ha: Deployment,
):
    # The one holding the virtual address, so that the address moves too.
    held = wait_for_holder(ha, SCHEDULERS)
    other = next(name for name in SCHEDULERS if name != held)
    killed = ha.node(held)
    api = ha.api(other)
    killed.systemctl("kill", "-s", "KILL", SCHEDULER_UNIT)
    # Kept down (no automatic restart) for as long as the test looks.
    killed.systemctl("stop", SCHEDULER_UNIT)
    stopped_at = time.time()
    try:
        # The workers heartbeated to the first scheduler in their list; they
        # move to the other. Past a heartbeat timeout (15 s) they would be
        # unreachable if their heartbeats went unanswered: each must be seen
        # online, heard from later than that.
        timeout = 15.0
        time.sleep(timeout)

        def heard_past_timeout(body: dict) -> bool:
            return both_online(body) and all(
                _epoch(w["last_seen_at"]) > stopped_at + timeout
                for w in body["workers"]
            )

        # Within a heartbeat interval (5 s, lengthened by its jitter) and the
        # scheduler's flush of heartbeats to the database.
        api.wait_for("/v1/workers", heard_past_timeout, timeout=15)
        job_id = start_count(api, WORKERS[1], 4)
        assert read_output(api, WORKERS[1], job_id) == counted(4)
        status, job = api.get(f"/v1/workers/{WORKERS[1]}/jobs/{job_id}")
        assert status == 200 and job["state"] == "succeeded", job
        # The virtual address went to the scheduler that is still ready.
        assert wait_for_holder(ha, (other,), timeout=10) == other
        assert read_output(vip_api(ha), WORKERS[1], job_id) == counted(4)
    finally:
        killed.systemctl("start", SCHEDULER_UNIT)
    # Back, it serves what the other recorded meanwhile.
    back = ha.api(killed.name)
    status, job = back.get(f"/v1/workers/{WORKERS[1]}/jobs/{job_id}")
    assert status == 200 and job["state"] == "succeeded", job
    back.wait_for("/v1/workers", both_online)


def _epoch(value) -> float:
    """A timestamp of the API (RFC 3339 text or seconds) as seconds."""
    if isinstance(value, int | float):
        return float(value)
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
