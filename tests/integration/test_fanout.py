"""Jobs on many workers at once, with real workers, one of them down."""

from __future__ import annotations

import shutil
import signal
import uuid

import pytest
from conftest import Api, make_public_dir
from test_lifecycle import wait_for

from jobgate.dev.cluster import DevCluster

NAMES = ("fan-1", "fan-2", "fan-3", "fan-4", "fan-5", "fan-6")


@pytest.fixture(scope="module")
def fleet(scripts_dir):
    """Six workers: fan-1..4 online (fan-1, fan-2 labelled web), fan-5
    deregistered, fan-6 killed (unreachable)."""
    directory = make_public_dir("jobgate-test-fanout-")
    c = DevCluster(directory, scripts_dir=scripts_dir, http_processes=2)
    try:
        c.prepare()
        c.start_scheduler()
        for name in NAMES:
            role = "web" if name in ("fan-1", "fan-2", "fan-6") else "db"
            c.start_worker(name, labels={"role": role}, wait=False)
        for name in NAMES:
            c.worker_info[name] = c.workers[name].wait_ready()
        c.workers["fan-5"].stop()
        c.workers["fan-6"].signal(signal.SIGKILL)
        api = Api(c)
        assert wait_for(
            lambda: api.get("/v1/workers/fan-6")[2]["state"] == "unreachable", 10
        )
        yield c
    finally:
        c.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_fanout_to_all_starts_on_every_online_worker(fleet):
    api = Api(fleet)
    status, headers, data = api.post(
        "/v1/jobs", {"all": True, "command": "bash", "path": "hello.sh"}
    )
    assert status == 201, data
    assert headers["Location"] == f"/v1/groups/{data['group_id']}"
    started = {j["worker_name"] for j in data["jobs"]}
    assert started == {"fan-1", "fan-2", "fan-3", "fan-4"}
    # The unreachable worker is an error entry; the deregistered one is skipped.
    assert [e["worker_name"] for e in data["errors"]] == ["fan-6"]
    assert "unreachable" in data["errors"][0]["error"]

    status, _, group = api.get(f"/v1/groups/{data['group_id']}?wait=true")
    assert status == 200
    assert group["summary"]["done"] is True
    assert group["summary"]["states"] == {"succeeded": 4}
    assert group["summary"]["errors"] == 1
    for job in group["jobs"]:
        out = api.output(job["worker_id"], job["job_id"])
        name = api.get(f"/v1/workers/{job['worker_id']}")[2]["name"]
        assert out == f"hello from {name}\n".encode()


def test_fanout_by_labels_and_explicit_list(fleet):
    api = Api(fleet)
    status, _, data = api.post(
        "/v1/jobs", {"labels": {"role": "web"}, "command": "bash", "path": "hello.sh"}
    )
    assert status == 201
    assert {j["worker_name"] for j in data["jobs"]} == {"fan-1", "fan-2"}
    assert [e["worker_name"] for e in data["errors"]] == ["fan-6"]

    status, _, data = api.post(
        "/v1/jobs",
        {"workers": ["fan-3", "fan-5", "nope"], "command": "bash", "path": "hello.sh"},
    )
    assert status == 201
    assert [j["worker_name"] for j in data["jobs"]] == ["fan-3"]
    errors = {
        e["worker_id"] if "worker_name" not in e else e["worker_name"]: e["error"]
        for e in data["errors"]
    }
    assert "offline" in errors["fan-5"]
    assert "nope" in errors["nope"]


def test_group_status_running_then_stale_when_worker_dies(fleet):
    api = Api(fleet)
    status, _, data = api.post(
        "/v1/jobs",
        {
            "workers": ["fan-3", "fan-4"],
            "command": "bash",
            "path": "sleep.sh",
            "args": ["300"],
        },
    )
    assert status == 201 and len(data["jobs"]) == 2
    group_url = f"/v1/groups/{data['group_id']}"
    _, _, group = api.get(group_url)
    assert group["summary"]["states"] == {"running": 2}
    assert group["summary"]["done"] is False

    fleet.workers["fan-4"].signal(signal.SIGKILL)
    assert wait_for(lambda: api.get("/v1/workers/fan-4")[2]["state"] == "unreachable")
    _, _, group = api.get(group_url)
    by_worker = {
        api.get(f"/v1/workers/{j['worker_id']}")[2]["name"]: j for j in group["jobs"]
    }
    assert by_worker["fan-4"]["stale"] is True
    assert by_worker["fan-4"]["state"] == "running"  # the last state recorded
    assert by_worker["fan-3"]["stale"] is False
    assert group["summary"]["stale"] == 1

    # The worker's job list answers from the record too, flagged.
    status, headers, listing = api.get("/v1/workers/fan-4/jobs")
    assert status == 200
    assert listing["stale"] is True
    assert data["jobs"][1]["job_id"] in {j["job_id"] for j in listing["jobs"]} or data[
        "jobs"
    ][0]["job_id"] in {j["job_id"] for j in listing["jobs"]}
    assert "stale" in headers["Warning"]
    api.post(f"/v1/workers/fan-3/jobs/{by_worker['fan-3']['job_id']}/stop")

    # Back again, the worker adopts the job its killed predecessor left
    # running: the group is fresh, and done once that job is stopped too.
    fleet.start_worker("fan-4")
    _, _, group = api.get(group_url)
    assert {j["state"] for j in group["jobs"]} == {"stopped", "running"}
    assert group["summary"]["stale"] == 0
    api.post(f"/v1/workers/fan-4/jobs/{by_worker['fan-4']['job_id']}/stop")
    _, _, group = api.get(group_url)
    assert {j["state"] for j in group["jobs"]} == {"stopped"}
    assert group["summary"]["done"] is True


@pytest.mark.parametrize(
    "body,needle",
    [
        ({"command": "bash", "path": "hello.sh"}, "exactly one"),
        (
            {"all": True, "workers": ["fan-1"], "command": "bash", "path": "x"},
            "exactly one",
        ),
        ({"all": False, "command": "bash", "path": "hello.sh"}, "all"),
        ({"workers": [], "command": "bash", "path": "hello.sh"}, "workers"),
        ({"labels": {"role": 1}, "command": "bash", "path": "hello.sh"}, "labels"),
        (
            {"labels": {"role": "none-such"}, "command": "bash", "path": "hello.sh"},
            "no worker",
        ),
    ],
)
def test_fanout_rejects_bad_selectors(fleet, body, needle):
    status, _, data = Api(fleet).post("/v1/jobs", body)
    assert status in (400, 404)
    assert needle in data["description"]


def test_unknown_group_is_404(fleet):
    status, _, _ = Api(fleet).get(f"/v1/groups/{uuid.uuid4()}")
    assert status == 404
