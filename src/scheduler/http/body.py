"""Reading and checking JSON request bodies; every error names the field."""

from __future__ import annotations

import json

import falcon

from jobgate import model
from jobgate.errors import InvalidArgument


async def read_json(
    req, max_bytes: int, max_depth: int = 32, optional: bool = False
) -> dict:
    """The request body as a JSON object, or a 400/413 that says what to fix.

    ``optional``: no body (or only whitespace) is ``{}`` rather than a 400.
    """
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
        if optional:
            return {}
        raise InvalidArgument("the body is empty; send a JSON object")
    # Counting brackets is cheap; only a body with more than the limit (in
    # strings or not) is scanned for its real depth.
    if raw.count(b"[") + raw.count(b"{") > max_depth and (
        (depth := nesting(raw)) > max_depth
    ):
        raise InvalidArgument(
            f"the body nests arrays and objects {depth} deep; the "
            f"limit is {max_depth} ([http].max_json_depth)",
        )
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"the body must be a JSON object, not {model.json_type(data)}",
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


def parse(shape: model.Shape, body: dict) -> dict:
    """``body``'s fields as ``shape`` defines them (``jobgate.model``).

    Every check the shape's definition implies (types, required fields,
    bounds, unknown fields where it is closed) is made; a failed one is a
    400 whose description names the field and says what to fix.
    """
    try:
        return shape.parse(body)
    except model.Invalid as exc:
        raise InvalidArgument(str(exc)) from None
