"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

Assembled from data: ``document.toml`` (routes, parameters, headers, the
error answers, every text), ``schemas.toml`` (the shapes of the answers)
and ``jobgate/model.toml`` (the job and the request bodies, whose checks in
``scheduler.http.body`` come from the same definitions). The rules here are
the ones the app follows everywhere: every answer carries X-Request-ID, a
secured operation may answer 401, 403 and 500, a path parameter is
required, a query parameter with an empty value is the same as none.

Two tests keep it true: ``tests/unit/test_openapi.py`` checks that it is
valid OpenAPI 3.1 and that its routes, methods and scopes are exactly the
app's; ``tests/integration/test_openapi_fuzz.py`` runs schemathesis against
a live cluster and checks every answer against it.

Scopes: each secured operation names the scope it needs (``read`` or ``run``)
as the role list of its security requirements, as OpenAPI 3.1 allows for
non-OAuth schemes.
"""

from __future__ import annotations

import copy
import functools
import json
import tomllib
from pathlib import Path
from typing import Any

from jobgate import __version__, model
from jobgate.jobstate import ExitReason, JobState
from scheduler.store import OFFLINE, ONLINE, UNREACHABLE

HERE = Path(__file__).parent
JSON = "application/json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

Schema = dict[str, Any]


@functools.cache
def _data() -> dict:
    with (HERE / "document.toml").open("rb") as f:
        return tomllib.load(f)


@functools.cache
def shapes() -> dict[str, model.Shape]:
    """The shapes the document describes: the model's and the answers'."""
    return {**model.SHAPES, **model.load(HERE / "schemas.toml", model.SHAPES)}


def enums() -> dict[str, list[str]]:
    """The values of enum types, from the code that owns them."""
    return {
        "JobState": [s.value for s in JobState],
        "ExitReason": [r.value for r in ExitReason],
        "WorkerState": [ONLINE, UNREACHABLE, OFFLINE],
        "LimitName": list(model.LIMITS.names),
    }


def document() -> dict:
    """The whole OpenAPI document, a fresh dict on each call.

    Passed through JSON so that no two places in it share a mutable object:
    a reader may change one place without changing others.
    """
    return json.loads(json.dumps(_document()))


def _document() -> dict:
    data = _data()
    return {
        "openapi": data["openapi"],
        "info": {
            "title": data["info"]["title"],
            "version": __version__,
            **{k: v for k, v in data["info"].items() if k != "title"},
        },
        "tags": data["tags"],
        "paths": {path: _path_item(item) for path, item in data["paths"].items()},
        "components": {
            "schemas": _schemas(),
            "parameters": {
                name: _parameter(p)
                for name, p in data["components"]["parameters"].items()
            },
            "headers": {
                _header_key(name): h
                for name, h in data["components"]["headers"].items()
            },
            "responses": {
                name: _response(
                    {k: v for k, v in r.items() if k != "status"}
                    | {"content": {JSON: "Error"}}
                )
                for name, r in data["components"]["responses"].items()
            },
            "securitySchemes": data["components"]["securitySchemes"],
        },
    }


def _schemas() -> dict[str, Schema]:
    data = _data()
    names = data["schemas"]
    writer = model.SchemaWriter(shapes(), enums(), names)
    out = {}
    for name in names:
        schema = writer.component(name)
        if name in data["enums"]:
            schema["description"] = data["enums"][name]
        out[name] = schema
    return out


# -- operations -------------------------------------------------------------------


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _header_key(name: str) -> str:
    """A header's name under components/headers: X-Request-ID -> XRequestID."""
    return name.replace("-", "")


def _parameter(p: dict) -> Schema:
    param = copy.deepcopy(p)
    if param["in"] == "path":
        param["required"] = True
    elif param["in"] == "query":
        # The server reads "?wait=" like no wait parameter at all.
        param["allowEmptyValue"] = True
        param["description"] += "; an empty value is the same as none"
    return param


def _response(r: dict) -> Schema:
    data = _data()
    resp: Schema = {
        "description": r["description"],
        "headers": {
            name: _ref("headers", _header_key(name))
            for name in ("X-Request-ID", *r.get("headers", ()))
        },
    }
    if "content" in r:
        resp["content"] = {
            media: copy.deepcopy(data["media"][name])
            if name in data["media"]
            else {"schema": _ref("schemas", name)}
            for media, name in r["content"].items()
        }
    if "links" in r:
        resp["links"] = data["links"][r["links"]]
    return resp


def _error_responses() -> dict[int, str]:
    return {r["status"]: name for name, r in _data()["components"]["responses"].items()}


def _path_item(item: dict) -> Schema:
    out: Schema = {}
    if "parameters" in item:
        out["parameters"] = [_ref("parameters", n) for n in item["parameters"]]
    for method in METHODS:
        if method in item:
            out[method] = _operation(item[method])
    return out


def _operation(op: dict) -> Schema:
    data = _data()
    out: Schema = {
        "operationId": op["operationId"],
        "summary": op["summary"],
        "tags": [op["tag"]],
    }
    if "description" in op:
        out["description"] = op["description"]
    out["parameters"] = [
        _ref("parameters", "RequestId"),
        *(_parameter(data["parameters"][n]) for n in op.get("parameters", ())),
    ]
    if "body" in op:
        out["requestBody"] = _body(op["body"])
    codes = set(op.get("errors", ()))
    scope = op.get("scope")
    if scope is not None:
        out["security"] = [{"bearerAuth": [scope]}, {"clientCertificate": [scope]}]
        codes |= {401, 403, 500}
    else:
        out["security"] = []
    responses = {str(code): _response(r) for code, r in op["responses"].items()}
    errors = _error_responses()
    for code in sorted(codes):
        responses.setdefault(str(code), _ref("responses", errors[code]))
    out["responses"] = dict(sorted(responses.items()))
    return out


def _body(body: dict) -> Schema:
    shape = shapes()[body["shape"]]
    media: Schema = {"schema": _ref("schemas", shape.name)}
    if shape.examples:
        media["examples"] = {
            name: {"value": dict(value)} for name, value in shape.examples.items()
        }
    return {
        "description": body["description"],
        "required": body.get("required", True),
        "content": {JSON: media},
    }
