"""The OpenAPI document: valid OpenAPI 3.1, and true to the app it describes."""

from __future__ import annotations

import json
import time
import uuid

import falcon
import falcon.testing
import pytest
import schedulerapp
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from jobgate.jobstate import ExitReason, JobState
from jobgate.v1 import common_pb2
from scheduler.http import openapi
from scheduler.http.auth import OPEN_PATHS
from scheduler.store import WorkerRow
from scheduler.usecases import job_to_dict

TOKEN = "test-token"
JSON = "application/json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> falcon.App:
    """The real app, on fakes: no worker is ever called."""
    d = tmp_path_factory.mktemp("openapi")
    return schedulerapp.app(schedulerapp.use_cases(d, {TOKEN: ("test", "run")}))


@pytest.fixture(scope="module")
def doc() -> dict:
    return openapi.document()


def served_routes(app: falcon.App) -> dict[str, tuple[object, set[str]]]:
    """URI template -> (resource, methods it implements), from the router."""
    routes: dict[str, tuple[object, set[str]]] = {}

    def walk(nodes) -> None:
        for node in nodes:
            # The console's files (scheduler.http.console) are no API.
            if node.resource is not None and getattr(node.resource, "in_api", True):
                # Falcon maps every method; only on_<method> responders count
                # (the rest are its 405 and OPTIONS defaults).
                methods = {
                    m.lower()
                    for m in node.method_map
                    if callable(getattr(node.resource, f"on_{m.lower()}", None))
                }
                routes[node.uri_template] = (node.resource, methods)
            walk(node.children)

    walk(app._router._roots)
    return routes


def spec_operations(doc: dict) -> dict[str, dict[str, dict]]:
    return {
        path: {m: op for m, op in item.items() if m in METHODS}
        for path, item in doc["paths"].items()
    }


def resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        kind, name = node["$ref"].split("/")[-2:]
        node = doc["components"][kind][name]
    return node


def props(doc: dict, name: str) -> set[str]:
    schema = resolve(doc, doc["components"]["schemas"][name])
    return set(schema["properties"])


# -- a valid document ------------------------------------------------------------


def test_document_is_valid_openapi_3_1(doc):
    assert doc["openapi"].startswith("3.1.")
    validate(doc)


def test_validator_refuses_a_broken_document(doc):
    # Guards the test above: the validator does look at the document.
    broken = openapi.document()
    broken["components"]["parameters"]["Job"]["in"] = "body"  # OpenAPI 2 only
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_document_is_plain_json(doc):
    assert json.loads(json.dumps(doc)) == doc


def test_every_reference_resolves(doc):
    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(doc):
        prefix, kind, name = ref.rsplit("/", 2)
        assert prefix == "#/components", ref
        assert name in doc["components"][kind], ref


def test_operation_ids_are_unique(doc):
    ids = [
        op["operationId"]
        for ops in spec_operations(doc).values()
        for op in ops.values()
    ]
    assert len(ids) == len(set(ids))


# -- the same routes as the app --------------------------------------------------


def test_every_served_route_is_in_the_spec_with_the_same_methods(app, doc):
    served = {path: methods for path, (_, methods) in served_routes(app).items()}
    in_spec = {path: set(ops) for path, ops in spec_operations(doc).items()}
    assert served == in_spec


def test_route_walk_sees_the_routes_it_must_compare(app):
    # Guards the comparison above against a walk that finds nothing.
    routes = served_routes(app)
    assert routes["/v1/workers/{worker}/jobs"][1] == {"get", "post"}
    assert routes["/metrics"][1] == {"get"}
    assert "/healthz" in routes and "/stream" in routes


def test_served_document_is_this_document(app, doc):
    client = falcon.testing.TestClient(app)
    resp = client.simulate_get(
        "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json == doc


# -- security and scopes ---------------------------------------------------------


def test_each_operation_needs_the_scope_its_resource_declares(app, doc):
    ops = spec_operations(doc)
    for path, (resource, methods) in served_routes(app).items():
        for method in methods:
            op = ops[path][method]
            if path in OPEN_PATHS:
                assert op["security"] == [], path
                continue
            # A method a resource does not declare needs "run" (Auth).
            needed = getattr(resource, "scopes", {}).get(method.upper(), "run")
            assert op["security"] == [
                {"bearerAuth": [needed]},
                {"clientCertificate": [needed]},
            ], (method, path)


def test_secured_operations_document_401_403_and_open_ones_do_not(doc):
    for path, ops in spec_operations(doc).items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if op["security"]:
                assert {"401", "403", "500"} <= codes, (method, path)
            else:
                assert path in OPEN_PATHS
                assert not {"401", "403"} & codes, (method, path)


def test_unauthorized_documents_the_challenge_header(app, doc):
    client = falcon.testing.TestClient(app)
    resp = client.simulate_get("/v1/workers")
    assert resp.status_code == 401
    headers = resolve(doc, doc["components"]["responses"]["Unauthorized"])["headers"]
    assert "WWW-Authenticate" in headers
    assert resp.headers["WWW-Authenticate"].startswith("Bearer ")


# -- bodies and shapes match the code --------------------------------------------


def test_v1_bodies_refuse_unknown_fields_and_legacy_bodies_do_not(doc):
    schemas = doc["components"]["schemas"]
    assert schemas["StartRequest"]["additionalProperties"] is False
    assert schemas["FanOutRequest"]["additionalProperties"] is False
    for name in ("LegacyStartRequest", "LegacyJobRequest"):
        assert "additionalProperties" not in schemas[name], name


def request_examples(doc: dict):
    """(path, body schema name, example name, example) of every request example."""
    for path, ops in spec_operations(doc).items():
        for op in ops.values():
            media = op.get("requestBody", {}).get("content", {}).get(JSON)
            if media is None:
                continue
            name = media["schema"]["$ref"].rsplit("/", 1)[1]
            for example, value in media.get("examples", {}).items():
                yield path, name, example, value["value"]


def test_the_start_routes_have_request_examples(doc):
    # Guards the tests over request_examples against finding none.
    found = {(path, name) for path, name, _, _ in request_examples(doc)}
    assert {
        ("/v1/workers/{worker}/jobs", "StartRequest"),
        ("/v1/jobs", "FanOutRequest"),
        ("/start", "LegacyStartRequest"),
    } <= found


def test_request_examples_fit_their_schemas(doc):
    for path, name, example, value in request_examples(doc):
        # With the components beside it, its $refs resolve.
        schema = {**doc["components"]["schemas"][name], "components": doc["components"]}
        errors = list(Draft202012Validator(schema).iter_errors(value))
        assert not errors, (path, example, errors)


def test_request_examples_pass_the_apps_checks_and_an_unknown_field_does_not(app, doc):
    # The document and the app's checks come from one model: what the one
    # shows, the other takes. No worker exists here, so a body that passes
    # the checks is answered 404 (or 201 for a group of unknown workers).
    client = falcon.testing.TestClient(app)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for path, name, example, value in request_examples(doc):
        url = path.replace("{worker}", "worker-9")
        resp = client.simulate_post(url, json=value, headers=auth)
        assert resp.status_code in (201, 404), (path, example, resp.json)
        closed = doc["components"]["schemas"][name].get("additionalProperties")
        resp = client.simulate_post(url, json={**value, "tiemout": 1}, headers=auth)
        if closed is False:
            assert resp.status_code == 400, (path, example)
            assert resp.json["description"].startswith("tiemout: unknown field")
        else:
            assert resp.status_code in (201, 404), (path, example, resp.json)


def test_job_schema_has_exactly_the_fields_the_gateway_renders(doc):
    job = job_to_dict(
        common_pb2.Job(job_id="j", state=JobState.RUNNING.to_proto()), "w"
    )
    schema = doc["components"]["schemas"]["Job"]
    assert set(schema["properties"]) == set(job)
    assert set(schema["required"]) == set(job)


def test_job_states_and_exit_reasons_are_the_code_enums(doc):
    schemas = doc["components"]["schemas"]
    assert schemas["JobState"]["enum"] == [s.value for s in JobState]
    exit_reason = schemas["Job"]["properties"]["exit_reason"]
    assert exit_reason["enum"] == [*(e.value for e in ExitReason), None]
    assert "null" in exit_reason["type"]


def test_worker_schema_has_exactly_the_fields_the_gateway_renders(app, doc):
    row = WorkerRow(
        "id", "w", "127.0.0.1:1", {}, 1, "0", "online", time.time(), time.time(), 0
    )
    cases = app._router.find("/v1/workers")[0].cases
    worker = cases.worker_to_dict(row)
    schema = doc["components"]["schemas"]["Worker"]
    assert set(schema["properties"]) == set(worker)
    assert schema["properties"]["state"] == {"$ref": "#/components/schemas/WorkerState"}


def test_query_parameters_that_stream_or_wait_are_booleans(doc):
    for path, ops in spec_operations(doc).items():
        for op in ops.values():
            for param in op.get("parameters", []):
                param = resolve(doc, param)
                if param["name"] in ("follow", "wait"):
                    assert param["schema"]["type"] == "boolean", path


def test_every_error_answer_is_documented_as_the_error_schema(doc):
    for path, ops in spec_operations(doc).items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                if int(code) < 400 or path == "/readyz":
                    continue
                response = resolve(doc, response)
                assert response["content"] == {
                    "application/json": {
                        "schema": {"$ref": "#/components/schemas/Error"}
                    }
                }, (method, path, code)


@pytest.mark.parametrize("accept", ["text/event-stream", "text/plain", "*/*"])
def test_errors_are_json_whatever_the_client_accepts(app, doc, accept):
    # The document promises the Error body for every error; an SSE client
    # (Accept: text/event-stream) gets its errors as JSON like any other.
    client = falcon.testing.TestClient(app)
    resp = client.simulate_get(
        "/v1/workers/nope/jobs/nope/output",
        headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept},
    )
    assert resp.status_code == 404
    assert resp.headers["Content-Type"].startswith("application/json")
    assert set(resp.json) == set(props(doc, "Error"))


def test_rendered_jobs_and_the_job_example_fit_the_job_schema(doc):
    schema = {**doc["components"]["schemas"]["Job"], "components": doc["components"]}
    check = Draft202012Validator(
        schema, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    job_id, worker_id = "5da9dbe8-a112-46c2-927c-00d1ee852761", str(uuid.uuid4())
    running = common_pb2.Job(
        job_id=job_id, state=JobState.RUNNING.to_proto(), started_at=1.5
    )
    stopped = common_pb2.Job(
        job_id=job_id,
        command="bash",
        path="count.sh",
        args=["3"],
        state=JobState.STOPPED.to_proto(),
        signal=15,
        pid=7,
        started_at=1.5,
        ended_at=2.5,
        reason="stopped",
        output_bytes=2,
        timeout_s=60,
        idempotency_key="k",
        exit_reason=ExitReason.STOPPED.to_proto(),
        stopped_by="token ops",
        stopped_at=2.0,
        limits=common_pb2.Limits(memory_mb=64),
    )
    jobs = [job_to_dict(m, worker_id) for m in (running, stopped)]
    assert schema["examples"]
    for job in (*jobs, *schema["examples"]):
        errors = list(check.iter_errors(job))
        assert not errors, (job, errors)
