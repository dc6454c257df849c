"""Reading and checking JSON request bodies; every error names the field."""

from __future__ import annotations

import json
from typing import Any

import falcon

_MISSING = object()


async def read_json(req, max_bytes: int, max_depth: int = 32) -> dict:
    """The request body as a JSON object, or a 400/413 that says what to fix."""
    length = req.content_length
    if length is not None and length > max_bytes:
        raise falcon.HTTPContentTooLarge(
            title="Body too large",
            description=f"the body is {length} bytes; the limit is {max_bytes}",
        )
    raw = await req.stream.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise falcon.HTTPContentTooLarge(
            title="Body too large",
            description=f"the body is over the limit; the limit is {max_bytes} bytes",
        )
    if not raw.strip():
        raise falcon.HTTPBadRequest(
            title="Bad request", description="the body is empty; send a JSON object"
        )
    # Counting brackets is cheap; only a body with more than the limit (in
    # strings or not) is scanned for its real depth.
    if raw.count(b"[") + raw.count(b"{") > max_depth and (
        (depth := nesting(raw)) > max_depth
    ):
        raise falcon.HTTPBadRequest(
            title="Bad request",
            description=f"the body nests arrays and objects {depth} deep; the "
            f"limit is {max_depth} ([http].max_json_depth)",
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise falcon.HTTPBadRequest(
            title="Bad request", description=f"the body is not valid JSON: {exc}"
        ) from None
    if not isinstance(data, dict):
        raise falcon.HTTPBadRequest(
            title="Bad request",
            description=f"the body must be a JSON object, not {_json_type(data)}",
        )
    return data


def nesting(raw: bytes) -> int:
    """How deep arrays and objects nest in ``raw`` (JSON text, valid or not).

    Checked before parsing: the parser recurses once per level, and a
    64 KiB body can nest deep enough to exhaust the interpreter's stack.
    """
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return deepest


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _bad(field: str, message: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(title="Bad request", description=f"{field}: {message}")


def _check_unicode(field: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(field, "must be valid Unicode (it holds a lone surrogate)") from None


def string(
    body: dict,
    field: str,
    *,
    required: bool = False,
    default: str = "",
    max_len: int = 4096,
) -> str:
    value = body.get(field, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise _bad(field, "required, a string")
        return default
    if not isinstance(value, str):
        raise _bad(field, f"must be a string, not {_json_type(value)}")
    _check_unicode(field, value)
    if required and not value:
        raise _bad(field, "must not be empty")
    if len(value) > max_len:
        raise _bad(field, f"longer than {max_len} characters")
    return value


def string_list(body: dict, field: str) -> list[str]:
    value = body.get(field, _MISSING)
    if value is _MISSING or value is None:
        return []
    if not isinstance(value, list):
        raise _bad(field, f"must be an array of strings, not {_json_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _bad(f"{field}[{i}]", f"must be a string, not {_json_type(item)}")
        _check_unicode(f"{field}[{i}]", item)
    return value


def integer(
    body: dict,
    field: str,
    *,
    default: int = 0,
    minimum: int = 0,
    maximum: int = 2**32 - 1,
) -> int:
    value = body.get(field, _MISSING)
    if value is _MISSING or value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(field, f"must be an integer, not {_json_type(value)}")
    if not minimum <= value <= maximum:
        raise _bad(field, f"must be between {minimum} and {maximum}")
    return value


def no_unknown(body: dict, allowed: set[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _bad(unknown[0], f"unknown field (known: {', '.join(sorted(allowed))})")


LIMITS = ("memory_mb", "cpu_percent", "tasks")


def limits(body: dict, field: str = "limits") -> dict[str, int]:
    """A job's ``limits`` object: the ones set (0 or null: the worker's default)."""
    value = body.get(field, _MISSING)
    if value is _MISSING or value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(field, f"must be an object, not {_json_type(value)}")
    for name in value:
        if name not in LIMITS:
            raise _bad(f"{field}.{name}", f"unknown limit (known: {', '.join(LIMITS)})")
    top = {"memory_mb": 2**63 - 1}
    named = {f"{field}.{name}": v for name, v in value.items()}
    found = {
        name: integer(named, f"{field}.{name}", maximum=top.get(name, 2**32 - 1))
        for name in LIMITS
    }
    return {name: n for name, n in found.items() if n}
