"""The job model against the places it cannot be derived into.

``jobgate.model`` defines the job and the request bodies once; the gRPC
messages (``proto/``) and the worker's ``JobRecord`` are written by hand.
These tests fail when a field is added to, removed from or retyped in one
of them and not in the model (or the other way round).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from jobgate import model
from jobgate.client import output
from jobgate.dev.cluster import EXAMPLE_SCRIPTS
from jobgate.jobstate import ExitReason, JobState
from jobgate.v1 import common_pb2, worker_pb2
from scheduler.http import openapi
from scheduler.usecases import job_to_dict
from worker import limits, validation
from worker.job import JobRecord
from worker.servicer import job_to_proto

WIRE = [f for f in model.JOB.fields if f.wire]

# What a proto field of each type can carry, by the model's type.
PROTO_TYPES = {
    "string": {FD.TYPE_STRING},
    "uuid": {FD.TYPE_STRING},
    "integer": {FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64},
    "timestamp": {FD.TYPE_DOUBLE},
    "boolean": {FD.TYPE_BOOL},
}
PROTO_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
}
# What a JobRecord attribute holds, by the model's type.
RECORD_TYPES = {
    "string": str,
    "uuid": str,
    "integer": int,
    "timestamp": float,
    "string[]": list[str],
    "JobState": JobState,
    "ExitReason": ExitReason,
    "Limits": dict[str, int],
}


def repeated(pf) -> bool:
    # protobuf 7 has is_repeated only; 5 has label only.
    if hasattr(pf, "is_repeated"):
        return pf.is_repeated
    return pf.label == FD.LABEL_REPEATED


def proto_mismatches(shape: model.Shape, descriptor, request: bool) -> list[str]:
    """How a message differs from a shape: fields, types, null-ness, and for a
    request's shape, bounds the message's types cannot hold."""
    fields = [f for f in shape.fields if f.wire]
    problems = []
    names, in_proto = {f.name for f in fields}, set(descriptor.fields_by_name)
    if names != in_proto:
        problems.append(
            f"{shape.name}: only in the model: {sorted(names - in_proto)}, "
            f"only in {descriptor.name}: {sorted(in_proto - names)}"
        )
    for f in fields:
        pf = descriptor.fields_by_name.get(f.name)
        if pf is None:
            continue
        where = f"{shape.name}.{f.name}"
        kind = f.type[:-2] if f.is_array else f.type
        if f.is_array != repeated(pf):
            problems.append(f"{where}: an array in one, not in the other")
        if kind in model.SHAPES:
            if pf.message_type is None or pf.message_type.name != kind:
                problems.append(f"{where}: not the message {kind}")
            else:
                problems += proto_mismatches(
                    model.SHAPES[kind], pf.message_type, request
                )
            continue
        if pf.enum_type is not None:
            if pf.enum_type.name != kind:
                problems.append(f"{where}: enum {pf.enum_type.name}, not {kind}")
        elif pf.type not in PROTO_TYPES.get(kind, ()):
            problems.append(f"{where}: proto type {pf.type} cannot carry {kind}")
        # Null in an answer: unset in the message (optional), or a zero value
        # that means none (an empty string, an enum's UNSPECIFIED). In a
        # request, and where 0 means none, null is the zero value.
        zero_is_none = pf.type == FD.TYPE_STRING or pf.enum_type is not None
        expressible = pf.has_presence or zero_is_none or request or shape.omit_zero
        if f.null and not expressible:
            problems.append(f"{where}: may be null, but the message cannot say so")
        if not f.null and pf.has_presence:
            problems.append(f"{where}: optional in the message, never null here")
        if request and pf.type in PROTO_RANGES:
            low, high = PROTO_RANGES[pf.type]
            if f.minimum is None or f.maximum is None:
                problems.append(
                    f"{where}: unbounded, the message holds [{low}, {high}]"
                )
            elif f.minimum < low or f.maximum > high:
                problems.append(f"{where}: bounds wider than [{low}, {high}]")
    return problems


def test_proto_job_has_the_models_fields_and_types():
    assert proto_mismatches(model.JOB, common_pb2.Job.DESCRIPTOR, False) == []


def test_start_request_message_has_the_start_bodys_fields_and_types():
    # The HTTP body is checked within the message's ranges: a value that
    # passes cannot fail to fit the message.
    problems = proto_mismatches(
        model.START, worker_pb2.StartJobRequest.DESCRIPTOR, True
    )
    assert problems == []


def test_proto_comparison_sees_a_field_missing_from_the_model():
    # Guards the tests above: a field only in the message is a mismatch.
    fewer = dataclasses.replace(model.JOB, fields=model.JOB.fields[:-1])
    [problem] = proto_mismatches(fewer, common_pb2.Job.DESCRIPTOR, False)
    assert "only in Job: ['limits']" in problem


def record_mismatches(record_type: type) -> list[str]:
    hints = typing.get_type_hints(record_type)
    names = {f.name for f in WIRE}
    problems = []
    if set(hints) != names:
        problems.append(
            f"only in the model: {sorted(names - set(hints))}, "
            f"only in {record_type.__name__}: {sorted(set(hints) - names)}"
        )
    for f in WIRE:
        hint = hints.get(f.name)
        if hint is None:
            continue
        args = typing.get_args(hint)
        nullable = isinstance(hint, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if nullable else hint
        if base != RECORD_TYPES[f.type]:
            problems.append(f"{f.name}: {hint} does not hold a {f.type}")
        # A string that may be null is kept empty instead.
        if nullable != (f.null and base is not str):
            problems.append(f"{f.name}: {hint}, but null in the model is {f.null}")
    return problems


def test_job_record_has_the_models_fields_and_types():
    assert record_mismatches(JobRecord) == []


def test_record_comparison_sees_a_retyped_field():
    @dataclasses.dataclass
    class Retyped(JobRecord):
        exit_code: int = 0  # never None: cannot say "not exited on its own"

    assert record_mismatches(Retyped) == [
        "exit_code: <class 'int'>, but null in the model is True"
    ]


def test_worker_limits_are_the_models():
    assert limits.NAMES == model.LIMITS.names


def test_worker_refuses_idempotency_keys_above_the_published_maximum():
    published = openapi.document()["components"]["schemas"]["StartRequest"]
    key = published["properties"]["idempotency_key"]
    assert validation.MAX_IDEMPOTENCY_KEY == key["maxLength"] == 256


# -- the record, the message and the JSON agree ----------------------------------------


def full_record() -> JobRecord:
    """A job with every field set to a value other than its default."""
    return JobRecord(
        job_id="5da9dbe8-a112-46c2-927c-00d1ee852761",
        command="bash",
        path="count.sh",
        args=["3", "0.2"],
        state=JobState.STOPPED,
        pid=4884,
        exit_code=None,
        signal=15,
        started_at=1747043044.635,
        ended_at=1747043045.042,
        reason="stopped by token ops",
        exit_reason=ExitReason.STOPPED,
        stopped_by="token ops",
        stopped_at=1747043045.0,
        output_bytes=4,
        output_dropped_bytes=2,
        timeout_s=60,
        idempotency_key="nightly",
        limits={"memory_mb": 256, "tasks": 8},
    )


def test_a_record_reaches_the_json_whole():
    record = full_record()
    status = job_to_dict(job_to_proto(record), "w-1")
    assert list(status) == list(model.JOB.names)
    assert status == {
        "job_id": record.job_id,
        "worker_id": "w-1",
        "command": "bash",
        "path": "count.sh",
        "args": ["3", "0.2"],
        "state": "stopped",
        "exit_code": None,
        "signal": 15,
        "pid": 4884,
        "started_at": "2025-05-12T09:44:04.635Z",
        "ended_at": "2025-05-12T09:44:05.042Z",
        "reason": "stopped by token ops",
        "output_bytes": 4,
        "timeout_s": 60,
        "idempotency_key": "nightly",
        "exit_reason": "stopped",
        "stopped_by": "token ops",
        "stopped_at": "2025-05-12T09:44:05.000Z",
        "output_dropped_bytes": 2,
        "limits": {"memory_mb": 256, "tasks": 8},
    }


def test_what_a_running_job_lacks_is_null_in_the_json():
    record = JobRecord("j", "bash", "count.sh", [], JobState.RUNNING, pid=9)
    status = job_to_dict(job_to_proto(record), "w-1")
    nulls = {name for name, value in status.items() if value is None}
    assert nulls == {f.name for f in model.JOB.fields if f.null}
    assert status["limits"] == {} and status["reason"] == ""


def test_cli_shows_every_field_of_a_job():
    assert set(output.JOB_KEYS) == set(model.JOB.names)
    assert output.JOB_KEYS[:3] == ("job_id", "worker_id", "state")


# -- examples ------------------------------------------------------------------------


def example_paths(node, inside: bool = False):
    """Every ``path`` value in the document's examples."""
    if isinstance(node, dict):
        for key, value in node.items():
            if inside and key == "path" and isinstance(value, str):
                yield value
            yield from example_paths(value, inside or key in ("examples", "example"))
    elif isinstance(node, list):
        for value in node:
            yield from example_paths(value, inside)


def test_examples_name_scripts_the_dev_cluster_ships():
    # `make run` starts a cluster whose workers run examples/scripts/: a
    # client trying an example there gets its job started.
    shipped = {p.name for p in EXAMPLE_SCRIPTS.iterdir() if p.is_file()}
    doc = openapi.document()
    paths = list(example_paths(doc))
    # The schemas' examples of a path field (a list of names) count too.
    for schema in doc["components"]["schemas"].values():
        paths += schema.get("properties", {}).get("path", {}).get("examples", [])
    assert len(paths) >= 5, paths
    assert {p for p in paths if p not in shipped} == set()


# -- reading model files -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[A]\ncolour = 1\n", "m.toml: [A]: unknown key 'colour'"),
        ("[A.fields.x]\nnul = true\n", "m.toml: [A].fields.x: unknown key 'nul'"),
        ("[A]\nrequired = ['y']\n", "m.toml: [A].required: no field 'y'"),
        ("[A]\ninclude = 'B'\n", "m.toml: [A].include: no shape 'B' before it"),
        ("[A]\ncli_order = ['y']\n", "m.toml: [A].cli_order: no field 'y'"),
        ("A = 1\n", "m.toml: [A]: a shape is a table"),
        ("[A\n", "m.toml: "),
    ],
)
def test_a_broken_model_file_is_refused_naming_file_and_key(tmp_path, text, error):
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(model.ModelError) as exc:
        model.load(path)
    assert str(exc.value).startswith(error)
