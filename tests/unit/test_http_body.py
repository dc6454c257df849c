"""JSON request bodies: reading them and checking fields; errors name the field."""

from __future__ import annotations

import asyncio
import json

import falcon
import falcon.asgi
import falcon.testing
import pytest

from jobgate import model
from jobgate.errors import InvalidArgument
from scheduler.http import body, errors

MAX = 1024


def req(raw: bytes | str):
    data = raw.encode() if isinstance(raw, str) else raw
    headers = {"Content-Type": "application/json"}
    return falcon.testing.create_asgi_req(
        method="POST", path="/x", body=data, headers=headers
    )


def read_json(request, limit: int = MAX, depth: int = 32) -> dict:
    return asyncio.run(body.read_json(request, limit, depth))


def bad_request(fn, *args, **kw) -> str:
    """What a 400 would say: the domain error the app's one map answers."""
    with pytest.raises(InvalidArgument) as exc:
        fn(*args, **kw)
    return exc.value.message


# -- read_json --------------------------------------------------------------------


def test_read_json_returns_the_object():
    assert read_json(req('{"path": "a.sh", "args": ["1"]}'), MAX) == {
        "path": "a.sh",
        "args": ["1"],
    }


def test_read_json_accepts_a_body_of_exactly_the_limit():
    raw = json.dumps({"k": "x" * (MAX - 9)}).encode()
    assert len(raw) == MAX
    assert read_json(req(raw), MAX)["k"] == "x" * (MAX - 9)


@pytest.mark.parametrize("raw", [b"", b"   \n\t"])
def test_read_json_refuses_an_empty_body(raw):
    message = bad_request(read_json, req(raw), MAX)
    assert message == "the body is empty; send a JSON object"


@pytest.mark.parametrize("raw", [b"{", b'{"a": 1,}', b"{'a': 1}", b"\xff\xfe{}"])
def test_read_json_refuses_invalid_json(raw):
    message = bad_request(read_json, req(raw), MAX)
    assert message.startswith("the body is not valid JSON: ")


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("[1, 2]", "an array"),
        ('"text"', "a string"),
        ("42", "a number"),
        ("true", "a boolean"),
        ("null", "null"),
    ],
)
def test_read_json_refuses_anything_but_an_object(raw, kind):
    message = bad_request(read_json, req(raw), MAX)
    assert message == f"the body must be a JSON object, not {kind}"


def test_read_json_refuses_a_body_over_the_limit_with_413():
    raw = json.dumps({"k": "x" * MAX}).encode()
    with pytest.raises(falcon.HTTPContentTooLarge) as exc:
        read_json(req(raw), MAX)
    assert exc.value.status_code == 413
    assert f"the limit is {MAX}" in exc.value.description


# -- field checks (jobgate.model's shapes) --------------------------------------------

# A shape of each kind of field the request bodies use.
ECHO = model.Shape(
    "Echo",
    "",
    (
        model.Field("path", min_length=1, max_length=3),
        model.Field("key", null=True, max_length=8),
        model.Field("args", type="string[]", null=True),
        model.Field("timeout_s", type="integer", null=True, minimum=0, maximum=100),
        model.Field("labels", type="string-map", min_properties=1),
        model.Field("limits", type="Limits", null=True),
    ),
    ("path",),
    closed=True,
)


def parse(doc: dict, shape: model.Shape = ECHO) -> dict:
    return body.parse(shape, doc)


def test_absent_and_null_fields_get_their_zero_values():
    assert parse({"path": "a"}) == {
        "path": "a",
        "key": "",
        "args": [],
        "timeout_s": 0,
        "labels": {},
        "limits": {},
    }
    nulls = {"path": "a", "key": None, "args": None, "timeout_s": None, "limits": None}
    assert parse(nulls) == parse({"path": "a"})


def test_given_fields_are_returned_as_given():
    doc = {
        "path": "abc",
        "key": "k",
        "args": ["a", ""],
        "timeout_s": 30,
        "labels": {"role": "web"},
        "limits": {"tasks": 4},
    }
    assert parse(doc) == doc
    assert parse({"path": "a", "timeout_s": 0})["timeout_s"] == 0


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, "path: required, a string"),
        ({"path": None}, "path: required, a string"),
        ({"path": ""}, "path: must not be empty"),
        ({"path": 5}, "path: must be a string, not a number"),
        ({"path": ["a"]}, "path: must be a string, not an array"),
        ({"path": {"a": 1}}, "path: must be a string, not an object"),
        ({"path": False}, "path: must be a string, not a boolean"),
        ({"path": "abcd"}, "path: longer than 3 characters"),
        ({"path": "\ud800"}, "path: must be valid Unicode (it holds a lone surrogate)"),
        ({"path": "a", "key": "123456789"}, "key: longer than 8 characters"),
    ],
)
def test_string_errors_name_the_field(doc, message):
    assert bad_request(parse, doc) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a b", "args: must be an array of strings, not a string"),
        ({"a": "b"}, "args: must be an array of strings, not an object"),
        (["a", 1], "args[1]: must be a string, not a number"),
        (["a", "b", None], "args[2]: must be a string, not null"),
    ],
)
def test_string_list_errors_name_the_item(value, message):
    assert bad_request(parse, {"path": "a", "args": value}) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("30", "timeout_s: must be an integer, not a string"),
        (1.5, "timeout_s: must be an integer, not a number"),
        (True, "timeout_s: must be an integer, not a boolean"),
        (-1, "timeout_s: must be between 0 and 100"),
        (101, "timeout_s: must be between 0 and 100"),
    ],
)
def test_integer_errors_name_the_field(value, message):
    assert bad_request(parse, {"path": "a", "timeout_s": value}) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([], "labels: must be an object of strings, not an array"),
        ({}, "labels: must not be empty"),
        ({"role": 1}, "labels.role: must be a string, not a number"),
    ],
)
def test_string_map_errors_name_the_entry(value, message):
    assert bad_request(parse, {"path": "a", "labels": value}) == message


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1], "limits: must be an object, not an array"),
        (
            {"swap_mb": 1},
            "limits.swap_mb: unknown limit (known: cpu_percent, memory_mb, tasks)",
        ),
        ({"tasks": "8"}, "limits.tasks: must be an integer, not a string"),
        ({"tasks": 2**32}, f"limits.tasks: must be between 0 and {2**32 - 1}"),
    ],
)
def test_nested_object_errors_name_the_member(value, message):
    assert bad_request(parse, {"path": "a", "limits": value}) == message


def test_nested_limits_keep_those_set_only():
    limits = {"memory_mb": 0, "cpu_percent": None, "tasks": 8}
    assert parse({"path": "a", "limits": limits})["limits"] == {"tasks": 8}


def test_a_closed_shape_names_the_unknown_field():
    message = bad_request(parse, {"path": "a", "tiemout": 1})
    assert message == (
        "tiemout: unknown field (known: args, key, labels, limits, path, timeout_s)"
    )


def test_an_open_shape_ignores_unknown_fields():
    doc = {"worker_id": "w", "job_id": "j", "extra": 1}
    assert parse(doc, model.LEGACY_JOB) == {"worker_id": "w", "job_id": "j"}


# -- the fan-out's selectors ----------------------------------------------------------

FANOUT_JOB = {"command": "bash", "path": "count.sh"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"workers": ["w1", "w2"]}, {"workers": ["w1", "w2"]}),
        ({"labels": {"role": "web"}}, {"labels": {"role": "web"}}),
        ({"all": True}, {"all": True}),
    ],
)
def test_fanout_takes_exactly_one_selector(selector, expected):
    parsed = parse({**selector, **FANOUT_JOB}, model.FANOUT)
    assert {k: parsed[k] for k in model.FANOUT.exactly_one if k in parsed} == expected
    assert parsed["command"] == "bash" and parsed["args"] == []


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({}, "exactly one of"),
        ({"all": True, "workers": ["w"]}, "exactly one of"),
        ({"all": False}, "all: must be true when given"),
        ({"all": None}, "all: must be true when given"),
        ({"workers": []}, "workers: must not be empty"),
        ({"workers": None}, "workers: required, an array of strings"),
        ({"labels": {}}, "labels: must not be empty"),
        ({"labels": {"role": 1}}, "labels.role: must be a string, not a number"),
    ],
)
def test_fanout_selector_errors_say_what_to_fix(selector, message):
    assert message in bad_request(parse, {**selector, **FANOUT_JOB}, model.FANOUT)


def test_read_json_refuses_deep_nesting_with_400_naming_the_limit():
    # 20,000 levels fit in 40 KiB and would exhaust the parser's stack.
    raw = '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}"
    message = bad_request(read_json, req(raw), 65536, 32)
    assert message == (
        "the body nests arrays and objects 20001 deep; the limit is 32 "
        "([http].max_json_depth)"
    )


def test_read_json_takes_nesting_up_to_the_limit():
    raw = '{"a": ' + "[" * 31 + "]" * 31 + "}"
    assert read_json(req(raw), MAX, 32) == {"a": json.loads("[" * 31 + "]" * 31)}


def test_brackets_inside_strings_do_not_count_as_nesting():
    raw = json.dumps({"args": ["[" * 500, '{"\\"' * 100]})
    assert read_json(req(raw), 65536, 4)["args"][0] == "[" * 500


def test_nesting_counts_levels_outside_strings():
    assert body.nesting(b'{"a": [[1], {"b": "[[[["}]}') == 3
    assert body.nesting(b'"\\"') == 0
    assert body.nesting(b"") == 0


# -- as a client sees it ------------------------------------------------------------


ECHO_SMALL = model.Shape(
    "EchoSmall",
    "",
    (model.Field("path", min_length=1), model.Field("args", type="string[]")),
    ("path",),
    closed=True,
)


class Echo:
    async def on_post(self, req, resp):
        resp.media = body.parse(ECHO_SMALL, await body.read_json(req, MAX))


@pytest.fixture
def client() -> falcon.testing.TestClient:
    app = falcon.asgi.App()
    errors.install(app, retry_after_s=5)
    app.add_route("/echo", Echo())
    return falcon.testing.TestClient(app)


def test_client_gets_the_checked_body_back(client):
    result = client.simulate_post("/echo", json={"path": "a.sh", "args": ["x"]})
    assert result.status_code == 200
    assert result.json == {"path": "a.sh", "args": ["x"]}


@pytest.mark.parametrize(
    ("raw", "status", "description"),
    [
        (b"", 400, "the body is empty; send a JSON object"),
        (b"[]", 400, "the body must be a JSON object, not an array"),
        (b'{"args": []}', 400, "path: required, a string"),
        (b'{"path": "a", "args": [1]}', 400, "args[0]: must be a string, not a number"),
        (b'{"path": "a", "x": 1}', 400, "x: unknown field (known: args, path)"),
    ],
)
def test_client_sees_status_and_what_to_fix(client, raw, status, description):
    result = client.simulate_post(
        "/echo", body=raw, headers={"Content-Type": "application/json"}
    )
    assert result.status_code == status
    assert result.json["description"] == description


def test_client_sees_413_for_a_large_body(client):
    result = client.simulate_post("/echo", body=b"{" + b" " * MAX + b"}")
    assert result.status_code == 413
    assert "the limit is 1024" in result.json["description"]


def test_pattern_and_entry_counts_are_checked_where_a_shape_sets_them():
    shape = model.Shape(
        "Bounded",
        "",
        (
            model.Field("id", pattern="^[0-9]+$"),
            model.Field("tags", type="string-map", max_properties=1),
        ),
        (),
    )
    assert parse({"id": "12", "tags": {"a": "b"}}, shape) == {
        "id": "12",
        "tags": {"a": "b"},
    }
    assert bad_request(parse, {"id": "1a"}, shape) == "id: must match ^[0-9]+$"
    message = bad_request(parse, {"tags": {"a": "b", "c": "d"}}, shape)
    assert message == "tags: must have at most 1 entries"
