"""The OpenAPI document's request examples, tried on the cluster `make run` starts.

A client that copies an example from the document onto the development
cluster (its workers worker-1 and worker-2, running examples/scripts/) gets
its job started (201), and the job succeeds.
"""

from __future__ import annotations

import json

import pytest
from conftest import cluster_of_its_own

from jobgate.dev.cluster import EXAMPLE_SCRIPTS, DevCluster
from scheduler.http import openapi

DOC = openapi.document()
WORKER = DOC["components"]["parameters"]["Worker"]["schema"]["examples"][0]


def examples(operation_id: str) -> list[tuple[str, str, dict]]:
    """(path, example name, body) of each request example of an operation."""
    found = []
    for path, item in DOC["paths"].items():
        for op in item.values():
            if isinstance(op, dict) and op.get("operationId") == operation_id:
                media = op["requestBody"]["content"]["application/json"]
                for name, example in media["examples"].items():
                    found.append((path, name, example["value"]))
    assert found, operation_id
    return found


@pytest.fixture(scope="module")
def dev():
    """The development cluster as `make run` has it: its scripts, its workers."""
    with cluster_of_its_own(
        "examples", None, ("worker-1", "worker-2"), http_processes=1
    ) as cluster:
        assert cluster.scripts_dir == EXAMPLE_SCRIPTS
        yield cluster


def post(cluster: DevCluster, path: str, body: dict) -> tuple[int, dict]:
    status, _, raw = cluster.request("POST", path, body)
    return status, json.loads(raw)


@pytest.mark.parametrize(
    ("path", "name", "body"), examples("startJob"), ids=lambda v: str(v)[:20]
)
def test_start_examples_start_a_job_that_succeeds(dev, path, name, body):
    url = path.replace("{worker}", WORKER) + "?wait=true"
    status, job = post(dev, url, body)
    assert status == 201, job
    assert (job["state"], job["path"]) == ("succeeded", body["path"])


@pytest.mark.parametrize(
    ("path", "name", "body"), examples("fanOut"), ids=lambda v: str(v)[:20]
)
def test_fan_out_examples_start_a_group_that_succeeds(dev, path, name, body):
    status, result = post(dev, path, body)
    assert status == 201, result
    assert result["errors"] == [] and result["jobs"]
    status, _, raw = dev.request("GET", f"/v1/groups/{result['group_id']}?wait=true")
    summary = json.loads(raw)["summary"]
    assert (status, summary["states"]) == (200, {"succeeded": len(result["jobs"])})


@pytest.mark.parametrize(
    ("path", "name", "body"), examples("legacyStart"), ids=lambda v: str(v)[:20]
)
def test_original_start_examples_start_a_job_that_succeeds(dev, path, name, body):
    status, result = post(dev, path, body)
    assert status == 201, result
    job = {"worker_id": body["worker_id"], "job_id": result["job_id"]}
    status, _, _ = dev.request("POST", "/stream", job)  # follows until the end
    assert status == 200
    assert post(dev, "/query", job) == (
        200,
        {"done": True, "error": False, "error_text": ""},
    )
