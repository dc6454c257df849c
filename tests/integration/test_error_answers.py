"""Every route's error answers, on the live cluster: JSON, a 4xx, as documented.

The routes are the operations of the OpenAPI document the scheduler serves;
``tests/unit/test_openapi.py`` holds the app to serving exactly the routes
the document names, so a new route is walked here as soon as it exists. Each
operation gets the bad input that applies to it: no token, a token that is
not valid, a read token where run is needed, an unknown worker, job or group
in the path or in the body, a query parameter or header of the wrong kind,
and a body that is not JSON, not an object, short of a required field, of a
wrong type in any field, or over the size limit. Every answer must be the
status that bad input calls for, one the document declares for the
operation, with the JSON body ``{"title", "description"}`` every error has.

A fan-out reports each worker it could not start on with the status, title
and description the same start on that worker alone is answered with.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field

import pytest

from jobgate.tokens import hash_token
from scheduler import config

METHODS = ("get", "put", "post", "delete", "patch")
UNKNOWN_WORKER = "no-such-worker"


@dataclass
class Probe:
    why: str
    status: int  # what this bad input must be answered with
    path: dict[str, str] = field(default_factory=dict)  # path parameters changed
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None  # None: a body the operation takes, if any
    token: str | None = None  # None: the cluster's run token


@dataclass
class Known:
    """Values that exist on the live cluster, for the inputs a probe keeps."""

    worker: str
    job: str
    group: str
    read_token: str
    max_body_bytes: int


def resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node:
        kind, name = node["$ref"].split("/")[-2:]
        node = doc["components"][kind][name]
    return node


def operations(doc: dict):
    """(path, method, operation, its parameters) of every documented route."""
    for path, item in doc["paths"].items():
        shared = item.get("parameters", [])
        for method in METHODS:
            if method in item:
                op = item[method]
                params = [resolve(doc, p) for p in shared + op.get("parameters", [])]
                yield path, method, op, params


def json_types(doc: dict, schema: dict) -> set[str]:
    """The JSON types a schema allows; empty when it does not say."""
    schema = resolve(doc, schema)
    kinds = schema.get("type", [])
    types = {kinds} if isinstance(kinds, str) else set(kinds)
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key, []):
            types |= json_types(doc, sub)
    if "const" in schema:
        types.add("boolean" if isinstance(schema["const"], bool) else "string")
    if "integer" in types:
        types.add("number")
    return types


def wrong_value(doc: dict, schema: dict):
    """A value of a JSON type the schema does not allow, or None."""
    types = json_types(doc, schema)
    if not types:
        return None
    for value, kind in (("x", "string"), (12345, "number"), ([], "array")):
        if kind not in types:
            return value
    return {} if "object" not in types else None


def base_body(doc: dict, op: dict, known: Known) -> dict:
    """A body the operation takes: its first example, else its required fields."""
    media = op["requestBody"]["content"]["application/json"]
    for example in media.get("examples", {}).values():
        return dict(example["value"])
    schema = resolve(doc, media["schema"])
    values = {
        "worker_id": known.worker,
        "job_id": known.job,
        "command": "bash",
        "path": "hello.sh",
    }
    return {name: values[name] for name in schema.get("required", [])}


def probes(doc: dict, path: str, op: dict, params: list, known: Known) -> list[Probe]:
    out: list[Probe] = []
    scopes = {s for req in op.get("security", []) for v in req.values() for s in v}
    if scopes:
        out.append(Probe("no token", 401, token=""))
        out.append(Probe("a token not in the tokens file", 401, token="not-a-token"))
        if "run" in scopes:
            out.append(Probe("a read token", 403, token=known.read_token))
    unknown = {"worker": UNKNOWN_WORKER, "job": str(uuid.uuid4())}
    for p in params:
        name, where = p["name"], p["in"]
        if where == "path":
            value = unknown.get(name, str(uuid.uuid4()))
            out.append(Probe(f"unknown {name}", 404, path={name: value}))
        elif where == "query":
            if "boolean" in json_types(doc, p["schema"]):
                out.append(Probe(f"{name}=maybe", 400, query=f"{name}=maybe"))
            if "integer" in json_types(doc, p["schema"]):
                out.append(Probe(f"{name}=abc", 400, query=f"{name}=abc"))
                if "minimum" in p["schema"]:
                    below = p["schema"]["minimum"] - 1
                    out.append(Probe(f"{name}={below}", 400, query=f"{name}={below}"))
        elif where == "header" and name == "Last-Event-ID":
            headers = {name: "not-an-offset", "Accept": "text/event-stream"}
            out.append(Probe(f"{name} not an offset", 400, headers=headers))
    if "requestBody" in op:
        out += body_probes(doc, op, known)
    return out


def body_probes(doc: dict, op: dict, known: Known) -> list[Probe]:
    base = base_body(doc, op, known)
    schema = resolve(doc, op["requestBody"]["content"]["application/json"]["schema"])

    def with_(**fields) -> bytes:
        return json.dumps({**base, **fields}).encode()

    too_large = json.dumps({"pad": "x" * known.max_body_bytes}).encode()
    out = [
        Probe("malformed JSON", 400, body=b'{"command": '),
        Probe("a JSON array", 400, body=b"[]"),
        Probe("a body over [http].max_body_bytes", 413, body=too_large),
    ]
    if op["requestBody"]["required"]:  # an optional one may be left out
        out.append(Probe("an empty body", 400, body=b""))
    for name in schema.get("required", []):
        rest = {k: v for k, v in base.items() if k != name}
        out.append(Probe(f"no {name}", 400, body=json.dumps(rest).encode()))
    for name, prop in schema.get("properties", {}).items():
        wrong = wrong_value(doc, prop)
        if wrong is not None:
            out.append(Probe(f"{name}: {wrong!r}", 400, body=with_(**{name: wrong})))
    if "worker_id" in schema.get("properties", {}):
        body = with_(worker_id=UNKNOWN_WORKER)
        out.append(Probe("an unknown worker_id", 404, body=body))
    if "job_id" in schema.get("properties", {}):
        body = with_(job_id=str(uuid.uuid4()))
        out.append(Probe("an unknown job_id", 404, body=body))
    return out


@pytest.fixture(scope="module")
def known(api, cluster) -> Known:
    job = api.start("worker-1", "hello.sh")
    status, _, group = api.post(
        "/v1/jobs", {"workers": ["worker-1"], "command": "bash", "path": "hello.sh"}
    )
    assert status == 201, group
    tokens = cluster.dir / "tokens"
    original = tokens.read_text()
    read_token = secrets.token_urlsafe(24)
    tokens.write_text(original + f"{hash_token(read_token)} errors-reader read\n")
    cfg = config.load(cluster.dir / "scheduler.toml")
    yield Known(
        "worker-1",
        job["job_id"],
        group["group_id"],
        read_token,
        cfg.http.max_body_bytes,
    )
    tokens.write_text(original)


def test_every_route_answers_bad_input_with_a_documented_json_4xx(api, known):
    status, _, doc = api.get("/openapi.json")
    assert status == 200
    good = {"worker": known.worker, "job": known.job, "group": known.group}
    walked: dict[str, list[str]] = {}
    failures = []
    for path, method, op, params in operations(doc):
        default_body = None
        if "requestBody" in op:
            default_body = json.dumps(base_body(doc, op, known)).encode()
        for probe in probes(doc, path, op, params, known):
            url = path.format(**{**good, **probe.path})
            if probe.query:
                url += f"?{probe.query}"
            got, headers, data = api.call(
                method.upper(),
                url,
                probe.body if probe.body is not None else default_body,
                headers={"Content-Type": "application/json", **probe.headers},
                token=probe.token,
            )
            walked.setdefault(op["operationId"], []).append(probe.why)
            where = f"{method.upper()} {url} ({probe.why})"
            declared = set(op["responses"])
            if (
                got != probe.status
                or str(got) not in declared
                or not headers.get("Content-Type", "").startswith("application/json")
                or not isinstance(data, dict)
                or set(data) != {"title", "description"}
                or not all(isinstance(v, str) and v for v in data.values())
            ):
                failures.append(
                    f"{where}: {got} {data!r}, wanted {probe.status} "
                    f"(declared: {sorted(declared)})"
                )
    assert not failures, "\n".join(failures)
    # Every operation that takes any input, or a token, was given bad input.
    for path, method, op, params in operations(doc):
        inputs = [p for p in params if p["name"] != "X-Request-ID"]
        takes_input = op.get("security") or inputs or "requestBody" in op
        assert bool(walked.get(op["operationId"])) == bool(takes_input), (path, method)
    assert len(walked) >= 15


def test_fanout_reports_each_worker_as_the_start_on_it_alone_is_answered(api):
    body = {"command": "bash", "path": "no-such-script.sh"}
    refs = ["worker-1", "worker-2", UNKNOWN_WORKER]
    status, _, result = api.post("/v1/jobs", {"workers": refs, **body})
    assert status == 201, result
    assert result["jobs"] == []
    entries = {e.get("worker_name", e["worker_id"]): e for e in result["errors"]}
    assert set(entries) == set(refs)
    for ref in refs:
        alone, _, answer = api.post(f"/v1/workers/{ref}/jobs", body)
        assert 400 <= alone < 500, answer
        entry = entries[ref]
        assert (entry["status"], entry["title"], entry["error"]) == (
            alone,
            answer["title"],
            answer["description"],
        ), ref
    assert entries[UNKNOWN_WORKER]["status"] == 404
    _, _, group = api.get(f"/v1/groups/{result['group_id']}")
    assert group["errors"] == result["errors"]
