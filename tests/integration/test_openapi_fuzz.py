"""Schemathesis against a live scheduler and live workers.

Every operation of the OpenAPI document is called with generated requests,
valid and invalid ones, and then in workflows that follow the document's
links (start a job, then read, follow and stop it). Each answer must be no
server error and exactly as the document says: a documented status code and
content type, a body that matches its schema, and the required headers. The
cluster's only script is a quick one, so the jobs the fuzzer starts end at
once and followed streams cannot hang.

The operations are generated at import time from ``openapi.document()`` (the
pytest plugin's lazy loading does not work with the pytest in use); the
fixture checks that the live scheduler serves that very document at
``/openapi.json``, so what is fuzzed is what clients are given.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from conftest import make_public_dir
from schemathesis.config import SchemathesisConfig

from jobgate.dev.cluster import DevCluster
from scheduler.http import openapi

TEST_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
WORKERS = ("worker-1", "worker-2")  # the names the document's examples use
SEED = 20250512

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "request-timeout": 30,
        "generation": {"max-examples": 40, "database": "none"},
        # Workflows follow the document's links (and Location headers) only:
        # links inferred from field names send an empty {worker} when a list
        # is empty, i.e. another route (GET /v1/workers/ is the list).
        "phases": {"stateful": {"inference": {"algorithms": ["location-headers"]}}},
        "checks": {
            # A valid request may still be refused for what a schema cannot
            # know (no such worker, job or script): that is not a failure.
            "positive_data_acceptance": {"enabled": False},
            # Invalid input is refused with a 4xx; a body over the size limit
            # is refused with 413 before it is even parsed.
            "negative_data_rejection": {
                "expected-statuses": [
                    400,
                    401,
                    403,
                    404,
                    405,
                    406,
                    409,
                    413,
                    415,
                    422,
                    428,
                    429,
                ]
            },
        },
    }
)
schema = schemathesis.openapi.from_dict(openapi.document(), config=CONFIG)


@pytest.fixture(scope="module")
def fuzz_cluster():
    """A scheduler with two workers whose scripts directory holds hello.sh only."""
    scripts = make_public_dir("jobgate-fuzz-scripts-")
    shutil.copy(TEST_SCRIPTS / "hello.sh", scripts / "hello.sh")
    os.chmod(scripts / "hello.sh", 0o755)
    directory = make_public_dir("jobgate-test-fuzz-")
    cluster = DevCluster(
        directory,
        scripts_dir=scripts,
        http_processes=1,
        # Lands in [workers]: a ?wait=true start or group answers within 5 s.
        scheduler_extra="max_wait_s = 5\n",
    )
    try:
        cluster.start(WORKERS)
        status, _, body = cluster.request("GET", "/openapi.json")
        assert status == 200
        assert json.loads(body) == openapi.document()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)
        shutil.rmtree(scripts, ignore_errors=True)


def auth(cluster: DevCluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.token}"}


@schema.parametrize()
def test_api_answers_as_documented(case, fuzz_cluster):
    headers = auth(fuzz_cluster)
    try:
        case.call_and_validate(base_url=fuzz_cluster.url, headers=headers)
    finally:
        if case.operation.path.endswith("/drain"):
            # A drained worker answers starts with 503, which the checks of
            # the other operations take for a server error: lift it at once.
            for name in WORKERS:
                body = {"enable": False}
                fuzz_cluster.request("POST", f"/v1/workers/{name}/drain", body)
    if case.operation.path.endswith("/output"):
        # The same request, asking for Server-Sent Events.
        sse = {**headers, "Accept": "text/event-stream"}
        case.call_and_validate(base_url=fuzz_cluster.url, headers=sse)


def test_api_workflows_answer_as_documented(fuzz_cluster):
    kwargs = {"base_url": fuzz_cluster.url, "headers": auth(fuzz_cluster)}

    class Workflows(schema.as_state_machine()):
        def get_call_kwargs(self, case):
            return kwargs

    Workflows.run(
        settings=hypothesis.settings(
            max_examples=20,
            stateful_step_count=6,
            deadline=None,
            database=None,
            derandomize=True,
        )
    )


def test_a_real_jobs_routes_answer_as_documented(fuzz_cluster):
    """Start, status, stop and output of a job that ran, in every format.

    Generated job ids are almost never real; this walks one real job through
    every way of starting and reading it, each answer checked by the same
    schemathesis checks.
    """
    base = {"base_url": fuzz_cluster.url}
    headers = auth(fuzz_cluster)
    sse = {**headers, "Accept": "text/event-stream"}
    start = schema.find_operation_by_id("startJob")
    worker = {"worker": "worker-1"}
    body = {"command": "bash", "path": "hello.sh", "args": ["a", "b"]}
    statuses = set()
    job_id = None
    for query in ({}, {"wait": True}, {"follow": True}):
        case = start.Case(path_parameters=worker, query=query, body=body)
        resp = case.call_and_validate(**base, headers=headers)
        statuses.add(resp.status_code)
        job_id = resp.headers["x-job-id"][0]
    assert statuses == {201}
    case = start.Case(path_parameters=worker, body={**body, "idempotency_key": "k1"})
    first = case.call_and_validate(**base, headers=headers)
    again = case.call_and_validate(**base, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)

    params = {**worker, "job": job_id}
    for op_id in ("getJob", "stopJob", "listJobs"):
        schema.find_operation_by_id(op_id).Case(
            path_parameters=params if op_id != "listJobs" else worker
        ).call_and_validate(**base, headers=headers)
    output = schema.find_operation_by_id("getJobOutput")
    for query in ({}, {"follow": True}, {"offset": 3}, {"follow": False}):
        for hdrs in (headers, sse, {**sse, "Last-Event-ID": "5"}):
            case = output.Case(path_parameters=params, query=query)
            resp = case.call_and_validate(**base, headers=hdrs)
            assert resp.status_code == 200
            if hdrs is not headers:
                assert b"event: end" in resp.content
    for op_id in ("legacyQuery", "legacyStream", "legacyStop"):
        schema.find_operation_by_id(op_id).Case(
            body={"worker_id": "worker-1", "job_id": job_id}
        ).call_and_validate(**base, headers=headers)


# Inputs the fuzzer found answered with a server error (or, for clients that
# accept only event streams, with an empty error body). Each must be a client
# error with the documented JSON body.
FOUND_BY_FUZZING = [
    pytest.param(
        "GET",
        "/v1/workers/worker-1/jobs/nope/output",
        None,
        {"Accept": "text/event-stream"},
        404,
        id="error-body-for-event-stream-clients",
    ),
    pytest.param(
        "GET",
        f"/v1/workers/worker-1/jobs/nope/output?offset={2**63}",
        None,
        {},
        400,
        id="offset-beyond-int64",
    ),
    pytest.param(
        "GET",
        "/v1/workers/worker-1/jobs/nope/output",
        None,
        {"Accept": "text/event-stream", "Last-Event-ID": "9" * 20},
        400,
        id="last-event-id-beyond-int64",
    ),
    pytest.param(
        "GET",
        "/v1/workers/worker-1/jobs/nope/output",
        None,
        {"Accept": "text/event-stream", "Last-Event-ID": "\u00b2"},
        400,
        id="last-event-id-not-ascii-digits",
    ),
    pytest.param(
        "POST",
        "/v1/workers/worker-1/jobs",
        {"command": "bash", "path": "0" * 300},
        {},
        400,
        id="path-name-too-long",
    ),
    pytest.param(
        "POST",
        "/start",
        {"worker_id": "worker-1", "command": "bash", "path": "0" * 4096},
        {},
        400,
        id="legacy-path-name-too-long",
    ),
    pytest.param(
        "POST",
        "/v1/workers/worker-1/jobs",
        b'{"command": "bash", "path": "\\ud800"}',
        {},
        400,
        id="lone-surrogate-in-a-field",
    ),
    pytest.param(
        "POST",
        "/query",
        b'{"worker_id": "\\ud800", "job_id": "x"}',
        {},
        400,
        id="lone-surrogate-in-a-legacy-field",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"), FOUND_BY_FUZZING
)
def test_inputs_found_by_fuzzing_are_client_errors(
    fuzz_cluster, method, path, body, headers, status
):
    got, resp_headers, raw = fuzz_cluster.request(method, path, body, headers)
    assert got == status, raw
    assert resp_headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)
    assert error["title"] and error["description"], error
