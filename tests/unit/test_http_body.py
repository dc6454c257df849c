"""JSON request bodies: reading them and checking fields; errors name the field."""

from __future__ import annotations

import asyncio
import json

import falcon
import falcon.asgi
import falcon.testing
import pytest

from scheduler.http import body

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
    with pytest.raises(falcon.HTTPBadRequest) as exc:
        fn(*args, **kw)
    return exc.value.description


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


# -- field checks -----------------------------------------------------------------


def test_string_returns_value_or_default():
    assert body.string({"path": "a.sh"}, "path", required=True) == "a.sh"
    assert body.string({}, "key", default="d") == "d"
    assert body.string({"key": None}, "key", default="d") == "d"


@pytest.mark.parametrize(
    ("doc", "kw", "message"),
    [
        ({}, {"required": True}, "path: required, a string"),
        ({"path": None}, {"required": True}, "path: required, a string"),
        ({"path": ""}, {"required": True}, "path: must not be empty"),
        ({"path": 5}, {}, "path: must be a string, not a number"),
        ({"path": ["a"]}, {}, "path: must be a string, not an array"),
        ({"path": {"a": 1}}, {}, "path: must be a string, not an object"),
        ({"path": False}, {}, "path: must be a string, not a boolean"),
        ({"path": "abcd"}, {"max_len": 3}, "path: longer than 3 characters"),
    ],
)
def test_string_errors_name_the_field(doc, kw, message):
    assert bad_request(body.string, doc, "path", **kw) == message


def test_string_list_returns_list_or_empty():
    assert body.string_list({"args": ["a", ""]}, "args") == ["a", ""]
    assert body.string_list({}, "args") == []
    assert body.string_list({"args": None}, "args") == []


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
    assert bad_request(body.string_list, {"args": value}, "args") == message


def test_integer_returns_value_or_default():
    assert body.integer({"timeout_s": 30}, "timeout_s") == 30
    assert body.integer({}, "timeout_s", default=7) == 7
    assert body.integer({"timeout_s": 0}, "timeout_s", default=7) == 0


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
    doc = {"timeout_s": value}
    assert bad_request(body.integer, doc, "timeout_s", maximum=100) == message


def test_no_unknown_names_the_unknown_field():
    body.no_unknown({"path": "a"}, {"path", "args"})
    doc = {"path": "a", "tiemout": 1}
    message = bad_request(body.no_unknown, doc, {"path", "args"})
    assert message == "tiemout: unknown field (known: args, path)"


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


class Echo:
    async def on_post(self, req, resp):
        doc = await body.read_json(req, MAX)
        body.no_unknown(doc, {"path", "args"})
        resp.media = {
            "path": body.string(doc, "path", required=True),
            "args": body.string_list(doc, "args"),
        }


@pytest.fixture
def client() -> falcon.testing.TestClient:
    app = falcon.asgi.App()
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
