"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``.

The document is built by small helpers so that every schema, parameter and
standard error response is defined once under ``components`` and referenced
from the operations. Two tests keep it true: ``tests/unit/test_openapi.py``
checks that it is valid OpenAPI 3.1 and that its routes, methods and scopes
are exactly the app's; ``tests/integration/test_openapi_fuzz.py`` runs
schemathesis against a live cluster and checks every answer against it.

Scopes: each secured operation names the scope it needs (``read`` or ``run``)
as the role list of its security requirements, as OpenAPI 3.1 allows for
non-OAuth schemes.
"""

from __future__ import annotations

import json
from typing import Any

from jobgate import __version__

JSON = "application/json"
TEXT = "text/plain"
SSE = "text/event-stream"

READ, RUN = "read", "run"

UINT32_MAX = 2**32 - 1
INT64_MAX = 2**63 - 1

Schema = dict[str, Any]


# -- helpers -------------------------------------------------------------------


def _ref(kind: str, name: str) -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def _s(name: str) -> Schema:
    """A reference to a schema under components/schemas."""
    return _ref("schemas", name)


def _obj(
    properties: dict[str, Schema],
    required: list[str] | None = None,
    description: str = "",
    closed: bool = False,
) -> Schema:
    """An object schema; ``required`` defaults to every property."""
    schema: Schema = {"type": "object"}
    if description:
        schema["description"] = description
    schema["properties"] = properties
    schema["required"] = list(properties) if required is None else required
    if closed:
        schema["additionalProperties"] = False
    return schema


def _str(description: str = "", **kw) -> Schema:
    return {
        "type": "string",
        **({"description": description} if description else {}),
        **kw,
    }


def _int(description: str = "", **kw) -> Schema:
    return {
        "type": "integer",
        **({"description": description} if description else {}),
        **kw,
    }


def _bool(description: str = "") -> Schema:
    return {"type": "boolean", **({"description": description} if description else {})}


def _or_null(schema: Schema) -> Schema:
    """``schema`` that also admits ``null`` (OpenAPI 3.1: a type list)."""
    out = dict(schema)
    if "$ref" in out:
        return {"oneOf": [out, {"type": "null"}]}
    kind = out["type"]
    out["type"] = [kind, "null"] if isinstance(kind, str) else [*kind, "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def _timestamp(description: str) -> Schema:
    return _str(description + " (RFC 3339, UTC, milliseconds)", format="date-time")


def _header(schema: Schema, description: str, required: bool = False) -> Schema:
    header: Schema = {"description": description, "schema": schema}
    if required:
        header["required"] = True
    return header


def _headers(*names: str) -> dict[str, Schema]:
    """Response headers by component name; X-Request-ID is always among them."""
    return {
        name: _ref("headers", name.replace("-", ""))
        for name in ("X-Request-ID", *names)
    }


def _response(
    description: str,
    content: dict[str, Schema] | None = None,
    headers: tuple[str, ...] = (),
    links: dict[str, Schema] | None = None,
) -> Schema:
    """A response; ``content`` maps media types to schemas (or media objects)."""
    resp: Schema = {"description": description, "headers": _headers(*headers)}
    if content:
        resp["content"] = {
            media: value
            if "schema" in value or "itemSchema" in value
            else {"schema": value}
            for media, value in content.items()
        }
    if links:
        resp["links"] = links
    return resp


def _error(description: str, headers: tuple[str, ...] = ()) -> Schema:
    return _response(description, {JSON: _s("Error")}, headers)


def _param(
    name: str, where: str, schema: Schema, description: str, required: bool = False
) -> Schema:
    param: Schema = {
        "name": name,
        "in": where,
        "description": description,
        "schema": schema,
    }
    if required or where == "path":
        param["required"] = True
    elif where == "query":
        # The server reads "?wait=" like no wait parameter at all.
        param["allowEmptyValue"] = True
        param["description"] += "; an empty value is the same as none"
    return param


def _body(schema: Schema, description: str, examples: dict | None = None) -> Schema:
    media: Schema = {"schema": schema}
    if examples:
        media["examples"] = {k: {"value": v} for k, v in examples.items()}
    return {"description": description, "required": True, "content": {JSON: media}}


# Error statuses by group, as the app gives them (scheduler.http.errors).
AUTH_ERRORS = (401, 403)
WORKER_ERRORS = (404, 429, 503, 504)  # resolving and calling a worker
BODY_ERRORS = (400, 413)

_ERROR_COMPONENT = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    413: "ContentTooLarge",
    429: "TooManyRequests",
    500: "InternalError",
    501: "NotImplemented",
    503: "WorkerUnavailable",
    504: "WorkerTimeout",
}


def _operation(
    op_id: str,
    summary: str,
    tag: str,
    responses: dict[int, Schema],
    *,
    scope: str | None,
    description: str = "",
    errors: tuple[int, ...] = (),
    parameters: tuple[Schema, ...] = (),
    body: Schema | None = None,
) -> Schema:
    """One operation; secured ones need ``scope`` and may answer 401/403/500."""
    op: Schema = {"operationId": op_id, "summary": summary, "tags": [tag]}
    if description:
        op["description"] = description
    op["parameters"] = [_ref("parameters", "RequestId"), *parameters]
    if body is not None:
        op["requestBody"] = body
    codes = set(errors)
    if scope is not None:
        op["security"] = [{"bearerAuth": [scope]}, {"clientCertificate": [scope]}]
        codes |= {*AUTH_ERRORS, 500}
    else:
        op["security"] = []
    out: dict[str, Schema] = {str(k): v for k, v in responses.items()}
    for code in sorted(codes):
        out.setdefault(str(code), _ref("responses", _ERROR_COMPONENT[code]))
    op["responses"] = dict(sorted(out.items()))
    return op


# -- components ----------------------------------------------------------------

JOB_STATES = ["running", "succeeded", "failed", "stopped", "timed_out", "lost"]
EXIT_REASONS = [
    "succeeded",
    "failed",
    "killed",
    "stopped",
    "timed_out",
    "lost",
    "start_failed",
    "output_failed",
    "oom",
]
WORKER_STATES = ["online", "unreachable", "offline"]

EXAMPLE_WORKER_ID = "5fba8fa9-2c4c-46ae-9805-8c9d5f6289b8"
EXAMPLE_JOB_ID = "5da9dbe8-a112-46c2-927c-00d1ee852761"


LIMITS = ("memory_mb", "cpu_percent", "tasks")


def _limits(description: str, required: list[str]) -> Schema:
    schema = _obj(
        {
            "memory_mb": _or_null(
                _int("memory and swap, in MiB", minimum=0, maximum=2**63 - 1)
            ),
            "cpu_percent": _or_null(
                _int("CPU time in percent of one CPU", minimum=0, maximum=UINT32_MAX)
            ),
            "tasks": _or_null(
                _int("processes and threads at once", minimum=0, maximum=UINT32_MAX)
            ),
        },
        required=required,
        description=description,
        closed=True,
    )
    return schema


def _schemas() -> dict[str, Schema]:
    labels = {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": "free-form labels from the worker's [worker].labels",
    }
    args = {
        "type": "array",
        "items": {"type": "string"},
        "description": "arguments for the script",
    }
    job_props: dict[str, Schema] = {
        "job_id": _str("a UUID the worker assigned", format="uuid"),
        "worker_id": _str("the id of the worker that runs it", format="uuid"),
        "command": _str("the interpreter, by its name on the worker"),
        "path": _str("the script, relative to the worker's scripts directory"),
        "args": args,
        "state": _s("JobState"),
        "exit_code": _or_null(_int("the exit code if the job exited on its own")),
        "signal": _or_null(_int("the number of the signal that ended the job")),
        "pid": _int(
            "the process id of the job's main process (also its process group)",
            minimum=0,
        ),
        "started_at": _timestamp("when the job started"),
        "ended_at": _or_null(_timestamp("when the job ended; null while running")),
        "reason": _str("why the job ended, in words; empty while running"),
        "output_bytes": _int("how much output the job has written", minimum=0),
        "timeout_s": _int(
            "the timeout in seconds after the worker's default was applied; 0: none",
            minimum=0,
        ),
        "idempotency_key": _or_null(_str("as requested; null when none was given")),
        "exit_reason": _or_null(
            {
                "type": "string",
                "enum": EXIT_REASONS,
                "description": "why a finished job ended; null while running",
            }
        ),
        "stopped_by": _or_null(
            _str("who asked for the stop (e.g. 'token ops'); null unless stopped")
        ),
        "stopped_at": _or_null(
            _timestamp("when the stop was asked for; null unless stopped")
        ),
        "output_dropped_bytes": _int(
            "output bytes dropped by the worker's output cap", minimum=0
        ),
        "limits": _limits(
            "the limits the job runs with (its own, else the worker's defaults); "
            "those set only",
            required=[],
        ),
    }
    job = _obj(
        job_props,
        description="A job's status, as its worker reports it.",
    )
    job["examples"] = [
        {
            "job_id": EXAMPLE_JOB_ID,
            "worker_id": EXAMPLE_WORKER_ID,
            "command": "bash",
            "path": "hello.sh",
            "args": ["3"],
            "state": "succeeded",
            "exit_code": 0,
            "signal": None,
            "pid": 4884,
            "started_at": "2025-05-12T09:44:04.635Z",
            "ended_at": "2025-05-12T09:44:05.042Z",
            "reason": "exited with code 0",
            "output_bytes": 26,
            "timeout_s": 60,
            "idempotency_key": "nightly-2025-05-12",
            "exit_reason": "succeeded",
            "stopped_by": None,
            "stopped_at": None,
            "output_dropped_bytes": 0,
            "limits": {"memory_mb": 256},
        }
    ]
    start_props: dict[str, Schema] = {
        "command": _str(
            "the interpreter, by its name in the worker's [jobs].interpreters "
            "(bash and sh by default)",
            minLength=1,
            maxLength=256,
            examples=["bash", "sh"],
        ),
        "path": _str(
            "the script, relative to the worker's [jobs].scripts_dir; absolute "
            "paths and paths that resolve outside it are refused (403)",
            minLength=1,
            maxLength=4096,
            examples=["hello.sh"],
        ),
        "args": _or_null({**args, "description": "arguments; null or absent: []"}),
        "timeout_s": _or_null(
            _int(
                "stop the job after this many seconds; 0, null or absent: the "
                "worker's [jobs].default_timeout_s; above [jobs].max_timeout_s: 400",
                minimum=0,
                maximum=UINT32_MAX,
            )
        ),
        "idempotency_key": _or_null(
            _str(
                "when the worker already has a job with this key, nothing is "
                "started and that job is answered (200)",
                maxLength=256,
            )
        ),
        "limits": _or_null(
            _limits(
                "what the job may use, through its cgroup; a limit absent, 0 or "
                "null: the worker's [jobs].default_*. Above the worker's "
                "[jobs].max_*, or one its host cannot enforce (see the worker's "
                "enforceable_limits): 400",
                required=[],
            )
        ),
    }
    fanout_props: dict[str, Schema] = {
        "workers": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "description": "the workers, by id or name",
        },
        "labels": {
            **labels,
            "minProperties": 1,
            "description": "every worker (not offline) whose labels include these",
        },
        "all": {"const": True, "description": "every worker that is not offline"},
        **start_props,
    }
    fanout_error = _obj(
        {
            "worker_id": _str("the worker's id, or the reference given for it"),
            "worker_name": _str("the worker's name (absent for an unknown worker)"),
            "error": _str("why the job was not started there"),
            "status": _int(
                "the HTTP status starting it there alone is answered with",
                minimum=400,
                maximum=599,
            ),
            "title": _str("the title of that answer"),
        },
        required=["worker_id", "error"],
        description="A worker the job could not be started on.",
    )
    group_job = {
        "description": "A job of a group: its status, fresh from the worker (or "
        "final, from the scheduler's record) or, when the worker cannot be asked, "
        "the last one the scheduler saw (stale).",
        "allOf": [
            _s("Job"),
            _obj(
                {
                    "stale": _bool("true: the status is the scheduler's record"),
                    "stale_reason": _str("why the worker could not be asked"),
                },
                required=["stale"],
            ),
        ],
    }
    return {
        "Error": _obj(
            {
                "title": _str("the kind of error"),
                "description": _str("what went wrong and what to fix"),
            },
            required=["title"],
            description="Every error answer. The API's own errors always carry a "
            "description; the framework's (unknown route, method not allowed) may "
            "carry only a title.",
        ),
        "WorkerState": {
            "type": "string",
            "enum": WORKER_STATES,
            "description": "online; unreachable when an online worker has not "
            "sent a heartbeat for its timeout ([workers].heartbeat_timeout_s, "
            "longer in a large fleet, where heartbeats are spaced further "
            "apart); offline after it deregistered",
        },
        "Worker": _obj(
            {
                "id": _str("kept for good across restarts", format="uuid"),
                "name": _str("the name in the worker's certificate and config"),
                "address": _str("host:port the scheduler dials"),
                "state": _s("WorkerState"),
                "labels": labels,
                "registered_at": _timestamp("the last registration"),
                "last_seen_at": _timestamp("the last heartbeat"),
                "running_jobs": _int(
                    "as of the last heartbeat; 0 unless online", minimum=0
                ),
                "capacity": _int("the worker's [jobs].max_concurrent", minimum=0),
                "version": _str("the jobgate version the worker runs"),
                "enforceable_limits": {
                    "type": "array",
                    "items": {"type": "string", "enum": list(LIMITS)},
                    "description": "the per-job limits the worker can enforce on "
                    "its host; a start asking for another is refused (400)",
                },
                "degraded": _or_null(
                    _str(
                        "why an online worker starts no jobs now (e.g. its disk "
                        "is full), as its last heartbeat said; starts on it are "
                        "answered 503 until it recovers by itself"
                    )
                ),
            },
            description="A worker as the scheduler knows it.",
        ),
        "WorkerList": _obj(
            {"workers": {"type": "array", "items": _s("Worker")}},
            description="All known workers, sorted by name.",
        ),
        "JobState": {"type": "string", "enum": JOB_STATES},
        "Job": job,
        "RecordedJob": {
            "description": "A job in a list: its status, or in a stale list the "
            "last status the scheduler saw, with the time it saw it.",
            "allOf": [
                _s("Job"),
                {
                    "type": "object",
                    "properties": {
                        "recorded_at": {
                            "type": "string",
                            "format": "date-time",
                            "description": "stale lists only: when the scheduler "
                            "last saw this status (RFC 3339, UTC)",
                        }
                    },
                },
            ],
        },
        "JobList": _obj(
            {
                "jobs": {"type": "array", "items": _s("RecordedJob")},
                "stale": _bool(
                    "true when the worker could not be asked (not online): the "
                    "list is then the scheduler's record of the jobs it started "
                    "there"
                ),
            },
            description="A worker's jobs, newest first.",
        ),
        "StartRequest": _obj(
            start_props,
            required=["command", "path"],
            closed=True,
            description="A job to start. Any other field is refused (400).",
        ),
        "FanOutRequest": {
            **_obj(
                fanout_props,
                required=["command", "path"],
                closed=True,
                description="A job to start on many workers, named by exactly one "
                "of workers, labels or all. Any other field is refused (400).",
            ),
            "oneOf": [
                {"required": ["workers"]},
                {"required": ["labels"]},
                {"required": ["all"]},
            ],
        },
        "FanOutJob": _obj(
            {
                "worker_id": _str(format="uuid"),
                "worker_name": _str(),
                "job_id": _str(format="uuid"),
            },
            description="A job started by a fan-out.",
        ),
        "FanOutError": fanout_error,
        "FanOutResult": _obj(
            {
                "group_id": _str("the group's id", format="uuid"),
                "jobs": {"type": "array", "items": _s("FanOutJob")},
                "errors": {"type": "array", "items": _s("FanOutError")},
            },
            description="One job per worker; a worker that could not take it is "
            "an error entry, never a failure of the whole request.",
        ),
        "GroupJob": group_job,
        "GroupStatus": _obj(
            {
                "group_id": _str(format="uuid"),
                "command": _str(),
                "path": _str(),
                "args": args,
                "selector": {
                    "type": "object",
                    "description": "the selector of the fan-out request: "
                    "workers, labels or all",
                    "properties": {
                        "workers": {"type": "array", "items": {"type": "string"}},
                        "labels": labels,
                        "all": {"const": True},
                    },
                    "minProperties": 1,
                    "maxProperties": 1,
                },
                "jobs": {"type": "array", "items": _s("GroupJob")},
                "errors": {"type": "array", "items": _s("FanOutError")},
                "summary": _obj(
                    {
                        "jobs": _int("jobs in the group", minimum=0),
                        "errors": _int("workers the job was not started on", minimum=0),
                        "states": {
                            "type": "object",
                            "description": "how many jobs are in each state",
                            "propertyNames": _s("JobState"),
                            "additionalProperties": {"type": "integer", "minimum": 1},
                        },
                        "done": _bool("true when no job is running"),
                        "stale": _int("jobs whose status is stale", minimum=0),
                    }
                ),
            },
            description="A fan-out group: each job's status and a summary.",
        ),
        "Health": _obj({"status": {"const": "ok"}}),
        "Ready": _obj({"status": {"const": "ready"}}),
        "NotReady": _obj(
            {
                "status": {"const": "not ready"},
                "problems": {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "description": "what keeps the scheduler from serving",
                },
            }
        ),
        "OutputEvent": {
            "description": "One Server-Sent Event of a job's output stream. "
            "output: a piece of the output (its id is the byte offset just past "
            "it, for Last-Event-ID); gap: bytes the output cap dropped (data: "
            'JSON {"skipped", "offset"}); end: the last event, data is the '
            "job's final status as JSON (a Job), or null if the worker gave none. "
            "Comment lines (': keep-alive') are sent while a job is quiet.",
            "type": "object",
            "properties": {
                "event": {"enum": ["output", "gap", "end"]},
                "data": {"type": "string"},
                "id": {"type": "string", "pattern": "^[0-9]+$"},
            },
            "required": ["event", "data"],
        },
        "LegacyStartRequest": _obj(
            {
                "worker_id": _str(
                    "the worker's id or name", minLength=1, maxLength=4096
                ),
                "command": _str(
                    "the interpreter", minLength=1, maxLength=256, examples=["bash"]
                ),
                "path": _str(
                    "the script", minLength=1, maxLength=4096, examples=["hello.sh"]
                ),
                "args": _or_null(args),
            },
            required=["worker_id", "command", "path"],
            description="The original API's start. Fields not named here are ignored.",
        ),
        "LegacyJobRequest": _obj(
            {
                "worker_id": _str(
                    "the worker's id or name", minLength=1, maxLength=4096
                ),
                "job_id": _str("the job's id", minLength=1, maxLength=4096),
            },
            description="A job, in the original API. Fields not named here are "
            "ignored.",
        ),
        "LegacyStartResult": _obj({"job_id": _str(format="uuid")}),
        "LegacyStopResult": _obj({"success": {"const": True}}),
        "LegacyQueryResult": _obj(
            {
                "done": _bool("true once the job is in any state but running"),
                "error": _bool("true when it ended in any state but succeeded"),
                "error_text": _str("the job's reason when error is true, else ''"),
            }
        ),
    }


def _parameters() -> dict[str, Schema]:
    return {
        "RequestId": _param(
            "X-Request-ID",
            "header",
            {"type": "string"},
            "an id for this request, echoed in the answer and logged by the "
            "scheduler and the worker; used when it matches "
            "^[A-Za-z0-9._-]{1,64}$, else replaced by a fresh one",
        ),
        "Worker": _param(
            "worker",
            "path",
            _str(minLength=1, examples=["worker-1"]),
            "the worker's id (a UUID) or its name",
        ),
        "Job": _param("job", "path", _str(minLength=1), "the job's id (a UUID)"),
        "Group": _param("group", "path", _str(minLength=1), "the group's id (a UUID)"),
    }


def _components_headers() -> dict[str, Schema]:
    return {
        "XRequestID": _header(
            _str(pattern="^[A-Za-z0-9._-]{1,64}$"),
            "the request's id: the client's X-Request-ID if usable, else a new one",
            required=True,
        ),
        "RetryAfter": _header(
            _int(minimum=0), "seconds to wait before trying again", required=True
        ),
        "WWWAuthenticate": _header(
            _str(), 'the challenge, e.g. Bearer realm="jobgate"', required=True
        ),
        "Location": _header(_str(), "the URL of what was made", required=True),
        "XJobID": _header(_str(format="uuid"), "the job's id", required=True),
        "Warning": _header(
            _str(), '110 - "possibly stale: worker not reachable" on stale lists'
        ),
        "CacheControl": _header(_str(), "no-store: output is never cached"),
        "XContentTypeOptions": _header(_str(), "nosniff"),
    }


def _components_responses() -> dict[str, Schema]:
    return {
        "BadRequest": _error(
            "The body is empty, not JSON, not an object, lacks a required field, "
            "has a field of the wrong type or an unknown one; a query parameter "
            "or header is invalid; or the worker refused the request (no such "
            "script, too many or too large args, timeout_s above its maximum). "
            "The description names the field."
        ),
        "Unauthorized": _error(
            "No 'Authorization: Bearer' header, or a token that is not (or no "
            "longer) in the tokens file.",
            ("WWW-Authenticate",),
        ),
        "Forbidden": _error(
            "The caller's scope does not allow this (a read token cannot start or "
            "stop), a client certificate not listed in [http.tls].client_scopes, "
            "or the worker refused: path outside its scripts directory, command "
            "not on its interpreter allow-list."
        ),
        "NotFound": _error(
            "No worker with that id or name, no job with that id on it, or no "
            "such group."
        ),
        "ContentTooLarge": _error(
            "The body is larger than [http].max_body_bytes (64 KiB by default)."
        ),
        "TooManyRequests": _error(
            "The worker already runs [jobs].max_concurrent jobs, or all its gRPC "
            "threads are busy.",
            ("Retry-After",),
        ),
        "InternalError": _error(
            "An unexpected failure inside the scheduler (never the answer to a "
            "client's mistake); the description points to the scheduler's log."
        ),
        "NotImplemented": _error(
            "The worker runs a jobgate version that does not know this call."
        ),
        "WorkerUnavailable": _error(
            "The worker is offline or unreachable, cannot be reached right now, "
            "or does not answer even its health check; or this server process "
            "already holds its limit of output streams ([http].max_followers, "
            "[http].max_followers_per_caller) or connections "
            "([http].max_connections).",
            ("Retry-After",),
        ),
        "WorkerTimeout": _error(
            "The worker did not answer within [workers].rpc_timeout_s "
            "([workers].stop_timeout_s for a stop) although it is alive: it is busy."
        ),
    }


def _security_schemes() -> dict[str, Schema]:
    return {
        "bearerAuth": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from the scheduler's tokens file (only its "
            "SHA-256 hash is stored there). Its scope is read (workers, status, "
            "output) or run (also start, stop and fan out). A token removed from "
            "the file stops working at once, also for streams already open.",
        },
        "clientCertificate": {
            "type": "mutualTLS",
            "description": "Instead of a token, when the API serves HTTPS with "
            "[http.tls].client_ca_file set: a client certificate of the cluster "
            "CA naming spiffe://<cluster>/client/<name>, whose scope is "
            "[http.tls].client_scopes.<name>. A certificate whose name is not "
            "listed there is refused (403).",
        },
    }


# -- paths -----------------------------------------------------------------------


def _job_links() -> dict[str, Schema]:
    """Links from a started job to the routes that read and stop it.

    From headers and the request, so that they also hold for a start that
    streams the output (text/plain) instead of answering with JSON.
    """
    params = {"worker": "$request.path.worker", "job": "$response.header.X-Job-ID"}
    return {
        "GetJob": {"operationId": "getJob", "parameters": params},
        "GetJobOutput": {"operationId": "getJobOutput", "parameters": params},
        "StopJob": {"operationId": "stopJob", "parameters": params},
    }


def _paths() -> dict[str, Schema]:
    worker = _ref("parameters", "Worker")
    job = _ref("parameters", "Job")
    job_json = _s("Job")
    run_stream = _str(
        "the job's output as it is written, until the job ends; if it did not "
        "succeed, a last line '[jobgate: job <id> <state>: <reason>]' follows "
        "and the connection is reset (so curl exits non-zero)"
    )
    start_headers = ("Location", "X-Job-ID")
    plain_stream = _str(
        "the job's output bytes, unchanged (not necessarily UTF-8); a gap left "
        "by the output cap is marked by a '[jobgate: N bytes of output were "
        "dropped here ...]' line"
    )
    stream_headers = ("Cache-Control", "X-Content-Type-Options")
    follow_start = _param(
        "follow",
        "query",
        _bool(),
        "stream the job's output as text/plain until it ends, instead of "
        "answering with its status (not together with wait)",
    )
    wait_start = _param(
        "wait",
        "query",
        _bool(),
        "answer once the job has ended (or after [workers].max_wait_s, then 202)",
    )
    legacy_errors = (*BODY_ERRORS, *WORKER_ERRORS)
    return {
        "/openapi.json": {
            "get": _operation(
                "getOpenAPI",
                "This OpenAPI description",
                "meta",
                {
                    200: _response(
                        "The OpenAPI 3.1 document.", {JSON: {"type": "object"}}
                    )
                },
                scope=READ,
            )
        },
        "/metrics": {
            "get": _operation(
                "getMetrics",
                "Prometheus metrics",
                "meta",
                {
                    200: _response(
                        "Metrics in the Prometheus text exposition format, all "
                        "HTTP processes added up.",
                        {TEXT: _str()},
                    )
                },
                scope=READ,
            )
        },
        "/healthz": {
            "get": _operation(
                "getHealth",
                "Liveness: the HTTP side serves",
                "meta",
                {200: _response("Alive.", {JSON: _s("Health")})},
                scope=None,
            )
        },
        "/readyz": {
            "get": _operation(
                "getReadiness",
                "Readiness: the state database takes writes, the gRPC server "
                "answers its health check and the tokens file is readable and valid",
                "meta",
                {
                    200: _response("Ready.", {JSON: _s("Ready")}),
                    503: _response(
                        "Not ready; problems says why.",
                        {JSON: _s("NotReady")},
                        ("Retry-After",),
                    ),
                },
                scope=None,
            )
        },
        "/v1/workers": {
            "get": _operation(
                "listWorkers",
                "All known workers",
                "workers",
                {200: _response("The workers.", {JSON: _s("WorkerList")})},
                scope=READ,
            )
        },
        "/v1/workers/{worker}": {
            "parameters": [worker],
            "get": _operation(
                "getWorker",
                "One worker",
                "workers",
                {200: _response("The worker.", {JSON: _s("Worker")})},
                scope=READ,
                errors=(404,),
            ),
        },
        "/v1/workers/{worker}/jobs": {
            "parameters": [worker],
            "get": _operation(
                "listJobs",
                "The worker's jobs, newest first",
                "jobs",
                {
                    200: _response(
                        "The jobs. When the worker is not online, the scheduler's "
                        "record of the jobs it started there, flagged stale.",
                        {JSON: _s("JobList")},
                        ("Warning",),
                    )
                },
                scope=READ,
                errors=WORKER_ERRORS,
            ),
            "post": _operation(
                "startJob",
                "Start a job",
                "jobs",
                {
                    200: _response(
                        "The worker already had a job with this idempotency_key: "
                        "its status (or, with follow=true, its output).",
                        {JSON: job_json, TEXT: run_stream},
                        start_headers,
                        _job_links(),
                    ),
                    201: _response(
                        "Started: the job's status (with wait=true, its final "
                        "status; with follow=true, its output).",
                        {JSON: job_json, TEXT: run_stream},
                        start_headers,
                        _job_links(),
                    ),
                    202: _response(
                        "wait=true, and the job was still running after "
                        "[workers].max_wait_s: its status.",
                        {JSON: job_json},
                        start_headers,
                    ),
                },
                scope=RUN,
                description="The worker runs '<interpreter> <script> <args...>' "
                "in a new process group with a scrubbed environment.",
                errors=(*BODY_ERRORS, 403, *WORKER_ERRORS, 501),
                parameters=(wait_start, follow_start),
                body=_body(
                    _s("StartRequest"),
                    "The job.",
                    {
                        "hello": {"command": "bash", "path": "hello.sh"},
                        "full": {
                            "command": "bash",
                            "path": "hello.sh",
                            "args": ["3", "0.2"],
                            "timeout_s": 60,
                            "idempotency_key": "nightly-2025-05-12",
                        },
                    },
                ),
            ),
        },
        "/v1/workers/{worker}/jobs/{job}": {
            "parameters": [worker, job],
            "get": _operation(
                "getJob",
                "A job's status",
                "jobs",
                {200: _response("The job's status.", {JSON: job_json})},
                scope=READ,
                description="A running job's status comes from its worker. Once "
                "the scheduler has seen a job it started end, it answers with "
                "that final status itself, also while the worker is offline.",
                errors=WORKER_ERRORS,
            ),
        },
        "/v1/workers/{worker}/jobs/{job}/stop": {
            "parameters": [worker, job],
            "post": _operation(
                "stopJob",
                "Stop a job",
                "jobs",
                {
                    200: _response(
                        "The job's final status (unchanged if it had already ended).",
                        {JSON: job_json},
                    )
                },
                scope=RUN,
                description="SIGTERM to the job's process group, SIGKILL after "
                "[jobs].stop_grace_s; answers once the job has ended. No body.",
                errors=WORKER_ERRORS,
            ),
        },
        "/v1/workers/{worker}/jobs/{job}/output": {
            "parameters": [worker, job],
            "get": _operation(
                "getJobOutput",
                "A job's output",
                "jobs",
                {
                    200: _response(
                        "The output (stdout and stderr merged, in order): "
                        "text/plain, or Server-Sent Events when the request's "
                        "Accept names text/event-stream.",
                        {
                            TEXT: plain_stream,
                            SSE: {
                                "schema": _s("OutputEvent"),
                                "example": "id: 6\nevent: output\ndata: 1\ndata: 2\n"
                                "data: 3\n\n",
                            },
                        },
                        stream_headers,
                    )
                },
                scope=READ,
                description="Errors found before the first byte are answered with "
                "their status; once a 200 has started, a failure can only end the "
                "stream early (compare with output_bytes and resume with offset).",
                errors=(400, *WORKER_ERRORS),
                parameters=(
                    _param(
                        "offset",
                        "query",
                        _int(minimum=0, maximum=INT64_MAX),
                        "byte offset to start from (default 0)",
                    ),
                    _param(
                        "follow",
                        "query",
                        _bool(),
                        "keep streaming until the job has ended and all its "
                        "output was sent; default false for text/plain, true for "
                        "Server-Sent Events",
                    ),
                    _param(
                        "Last-Event-ID",
                        "header",
                        _str(),
                        "Server-Sent Events only: resume after the event with "
                        "this id (a byte offset; anything else is 400); overrides "
                        "offset. Ignored for text/plain.",
                    ),
                ),
            ),
        },
        "/v1/jobs": {
            "post": _operation(
                "fanOut",
                "Start the same job on many workers (a group)",
                "fan-out",
                {
                    201: _response(
                        "The group, its jobs and the workers it could not start on.",
                        {JSON: _s("FanOutResult")},
                        ("Location",),
                        {
                            "GetGroup": {
                                "operationId": "getGroup",
                                "parameters": {"group": "$response.body#/group_id"},
                            }
                        },
                    )
                },
                scope=RUN,
                description="404 when the selector matches no worker at all; 400 "
                "when it matches more than [fanout].max_workers.",
                errors=(*BODY_ERRORS, 404),
                body=_body(
                    _s("FanOutRequest"),
                    "The workers and the job.",
                    {
                        "all": {"all": True, "command": "bash", "path": "hello.sh"},
                        "named": {
                            "workers": ["worker-1", "worker-2"],
                            "command": "bash",
                            "path": "hello.sh",
                            "args": ["1"],
                        },
                    },
                ),
            )
        },
        "/v1/groups/{group}": {
            "parameters": [_ref("parameters", "Group")],
            "get": _operation(
                "getGroup",
                "A fan-out group's status",
                "fan-out",
                {200: _response("The group.", {JSON: _s("GroupStatus")})},
                scope=READ,
                description="Asks every reachable worker for its job; the others "
                "are answered from the scheduler's record, flagged stale.",
                errors=(400, 404),
                parameters=(
                    _param(
                        "wait",
                        "query",
                        _bool(),
                        "wait (up to [workers].max_wait_s per job) for running "
                        "jobs to end",
                    ),
                ),
            ),
        },
        "/start": {
            "post": _operation(
                "legacyStart",
                "Start a job (original API)",
                "original API",
                {
                    201: _response(
                        "Started.",
                        {JSON: _s("LegacyStartResult")},
                    )
                },
                scope=RUN,
                errors=(*legacy_errors, 403),
                body=_body(
                    _s("LegacyStartRequest"),
                    "The job.",
                    {
                        "hello": {
                            "worker_id": "worker-1",
                            "command": "bash",
                            "path": "hello.sh",
                        }
                    },
                ),
            )
        },
        "/stop": {
            "post": _operation(
                "legacyStop",
                "Stop a job (original API)",
                "original API",
                {
                    200: _response(
                        "The job has ended (also when it had already).",
                        {JSON: _s("LegacyStopResult")},
                    )
                },
                scope=RUN,
                errors=legacy_errors,
                body=_body(_s("LegacyJobRequest"), "The job."),
            )
        },
        "/query": {
            "post": _operation(
                "legacyQuery",
                "Whether a job is done (original API)",
                "original API",
                {200: _response("The job's state.", {JSON: _s("LegacyQueryResult")})},
                scope=READ,
                errors=legacy_errors,
                body=_body(_s("LegacyJobRequest"), "The job."),
            )
        },
        "/stream": {
            "post": _operation(
                "legacyStream",
                "A job's output from the start, following it (original API)",
                "original API",
                {
                    200: _response(
                        "The output until the job ends.",
                        {TEXT: plain_stream},
                        stream_headers,
                    )
                },
                scope=READ,
                errors=legacy_errors,
                body=_body(_s("LegacyJobRequest"), "The job."),
            )
        },
    }


def document() -> dict:
    """The whole OpenAPI document, a fresh dict on each call.

    Passed through JSON so that no two places in it share a mutable object
    (the helpers reuse schema fragments): a reader may change one place
    without changing others.
    """
    return json.loads(json.dumps(_document()))


def _document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "jobgate",
            "version": __version__,
            "summary": "Run scripts on a fleet of Linux hosts over HTTP.",
            "description": "A scheduler that starts, stops, reports and streams "
            "jobs (scripts from each worker's scripts directory) on named "
            "workers. Bodies are JSON except job output. Every error is JSON "
            '{"title", "description"}; an unknown route is 404 and a method a '
            "route does not serve is 405 (with Allow). {worker} in a path is a "
            "worker's id (a UUID) or its name.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "workers", "description": "Workers and their state"},
            {"name": "jobs", "description": "Jobs on one worker"},
            {"name": "fan-out", "description": "One job on many workers"},
            {
                "name": "original API",
                "description": "The original routes, kept for their clients; "
                "fields they do not name are ignored",
            },
            {"name": "meta", "description": "Health, metrics and this document"},
        ],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "parameters": _parameters(),
            "headers": _components_headers(),
            "responses": _components_responses(),
            "securitySchemes": _security_schemes(),
        },
    }
