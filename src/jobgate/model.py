"""The shape of a job and of the HTTP API's request bodies, written once.

``model.toml`` beside this module defines them: each shape is a table of
fields, each field a type, whether it may be null, its bounds and the text
that describes it. Everything else is derived from that file:

- the JSON a client gets for a job (``scheduler.usecases.job_to_dict``) and
  the gRPC message a worker sends (``worker.servicer.job_to_proto``), both
  by walking :data:`JOB`'s fields;
- the JSON Schemas of the OpenAPI document (:class:`SchemaWriter`, used by
  ``scheduler.http.openapi``), with the HTTP side's response shapes in a
  file of the same kind there;
- the checks of a request body (:meth:`Shape.parse`, called by
  ``scheduler.http.body``), whose messages name the field;
- the columns of ``jobgate status`` (:data:`JOB_COLUMNS`).

``tests/unit/test_model.py`` holds the parts that cannot be derived to it:
the ``Job`` and ``StartJobRequest`` messages of the ``.proto`` files and the
worker's ``JobRecord`` must have the same fields as the model, with types
that carry its values, so a field added in one place only fails a test.

Why this and not something else:

- Protobuf as the source, through its JSON mapping: the HTTP contract is
  fixed and is not that mapping (states are ``running`` not
  ``JOB_STATE_RUNNING``, times are RFC 3339 strings not seconds, 64-bit
  integers are numbers not strings, an empty ``idempotency_key`` is null,
  ``worker_id`` is not in the message), the original API's bodies have no
  message at all, and descriptions and bounds would need custom options and
  a protoc plugin to reach the OpenAPI document.
- pydantic or msgspec: either would emit JSON Schema and validate, but
  neither knows protobuf, their error messages are not the ones clients
  already get (``path: required, a string``), bounds that come from the
  worker's config cannot be checked by the scheduler anyway, and the
  schemas they emit would need rewriting to stay the document clients
  have. The CLI imports this module, and it loads the standard library
  only.
- A static ``openapi.yaml`` checked against the code: it would describe the
  shapes without producing the rendering or the checks, which are the
  copies that drift.

So the vocabulary is small and this module interprets it; the data stays
data (TOML, read with the standard library's ``tomllib``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

DATA = Path(__file__).with_name("model.toml")

# Types a field may have besides the names of shapes and enums; "T[]" is an
# array of T.
PRIMITIVES = {
    "string": {"type": "string"},
    "uuid": {"type": "string", "format": "uuid"},
    "timestamp": {"type": "string", "format": "date-time"},
    "integer": {"type": "integer"},
    "boolean": {"type": "boolean"},
    "string-map": {"type": "object", "additionalProperties": {"type": "string"}},
}
TIMESTAMP_NOTE = " (RFC 3339, UTC, milliseconds)"

_BOUNDS = {
    "minimum": "minimum",
    "maximum": "maximum",
    "min_length": "minLength",
    "max_length": "maxLength",
    "min_items": "minItems",
    "min_properties": "minProperties",
    "max_properties": "maxProperties",
    "pattern": "pattern",
}


class ModelError(ValueError):
    """A model file that cannot be read as one; says the file and the key."""


class Invalid(ValueError):
    """A request body that does not fit its shape; ``field`` names the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    type: str = "string"
    description: str = ""
    null: bool = False
    minimum: int | None = None
    maximum: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    min_properties: int | None = None
    max_properties: int | None = None
    pattern: str | None = None
    examples: tuple = ()
    const: Any = None
    # The setting that bounds the field further, where the request goes
    # (e.g. "the worker's [jobs].max_timeout_s"); documented, not checked here.
    limit: str = ""
    # False: not on the gRPC wire; the scheduler adds it (a job's worker_id).
    wire: bool = True
    # A JSON Schema of its own, for what the vocabulary does not say.
    schema: Mapping[str, Any] | None = None

    @property
    def is_array(self) -> bool:
        return self.type.endswith("[]")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    description: str
    fields: tuple[Field, ...]
    required: tuple[str, ...]
    closed: bool = False
    # Exactly one of these fields must be given (the fan-out's selectors).
    exactly_one: tuple[str, ...] = ()
    exactly_one_error: str = ""
    member: str = "field"  # what a field is called in messages ("limit")
    omit_zero: bool = False  # parse leaves out fields that are absent or 0
    all_of: tuple[str, ...] = ()  # shapes this one adds fields to
    example: Mapping[str, Any] | None = None
    examples: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    cli_order: tuple[str, ...] = ()

    def __getitem__(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def parse(
        self, body: Mapping[str, Any], shapes: Mapping[str, Shape] | None = None
    ) -> dict:
        """The checked values of a JSON object of this shape, or :class:`Invalid`.

        Absent fields, and null in a field that may be null, get the type's
        zero value ("", 0, [], {}). ``shapes`` resolves the types of nested
        objects (this module's shapes by default).
        """
        return _Parser(SHAPES if shapes is None else shapes).shape(self, body, "")


# -- reading model files ----------------------------------------------------------

_FIELD_KEYS = {f.name for f in dataclasses.fields(Field)} - {"name"}
_SHAPE_KEYS = {
    "description",
    "fields",
    "required",
    "closed",
    "exactly_one",
    "exactly_one_error",
    "member",
    "omit_zero",
    "all_of",
    "include",
    "example",
    "examples",
    "cli_order",
}


def load(path: Path, known: Mapping[str, Shape] | None = None) -> dict[str, Shape]:
    """The shapes a model file defines, in its order.

    ``known`` are shapes of another file that this one may include.
    """
    with path.open("rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ModelError(f"{path.name}: {exc}") from None
    shapes: dict[str, Shape] = {}
    for name, table in data.items():
        where = f"{path.name}: [{name}]"
        if not isinstance(table, dict):
            raise ModelError(f"{where}: a shape is a table")
        shapes[name] = _shape(name, table, {**(known or {}), **shapes}, where)
    return shapes


def _shape(name: str, t: dict, known: Mapping[str, Shape], where: str) -> Shape:
    unknown = sorted(set(t) - _SHAPE_KEYS)
    if unknown:
        raise ModelError(f"{where}: unknown key {unknown[0]!r}")
    fields = []
    for fname, ft in t.get("fields", {}).items():
        bad = sorted(set(ft) - _FIELD_KEYS)
        if bad:
            raise ModelError(f"{where}.fields.{fname}: unknown key {bad[0]!r}")
        ft = dict(ft)
        ft["examples"] = tuple(ft.get("examples", ()))
        if "const" in ft:
            ft.setdefault("type", "const")
        fields.append(Field(fname, **ft))
    required = list(t.get("required", [f.name for f in fields]))
    if "include" in t:
        base = known.get(t["include"])
        if base is None:
            raise ModelError(f"{where}.include: no shape {t['include']!r} before it")
        fields += base.fields
        required += base.required
    names = [f.name for f in fields]
    for key in ("required", "exactly_one", "cli_order"):
        values = required if key == "required" else t.get(key, [])
        missing = [n for n in values if n not in names]
        if missing:
            raise ModelError(f"{where}.{key}: no field {missing[0]!r}")
    return Shape(
        name,
        t.get("description", ""),
        tuple(fields),
        tuple(required),
        closed=t.get("closed", False),
        exactly_one=tuple(t.get("exactly_one", ())),
        exactly_one_error=t.get("exactly_one_error", ""),
        member=t.get("member", "field"),
        omit_zero=t.get("omit_zero", False),
        all_of=tuple(t.get("all_of", ())),
        example=t.get("example"),
        examples=t.get("examples", {}),
        cli_order=tuple(t.get("cli_order", ())),
    )


# -- JSON Schema ------------------------------------------------------------------


class SchemaWriter:
    """JSON Schemas (as OpenAPI 3.1 has them) of shapes and their fields.

    ``enums`` gives the values of each enum type, from the code that owns
    them; names in ``components`` are referenced (``$ref``), other shapes
    and enums are written in place.
    """

    def __init__(
        self,
        shapes: Mapping[str, Shape],
        enums: Mapping[str, Sequence[str]],
        components: Collection[str],
        prefix: str = "#/components/schemas/",
    ):
        self.shapes = shapes
        self.enums = enums
        self.components = components
        self.prefix = prefix

    def ref(self, name: str) -> dict:
        return {"$ref": self.prefix + name}

    def component(self, name: str) -> dict:
        """The schema that ``components/schemas/<name>`` holds."""
        if name in self.enums:
            return self._enum(name)
        shape = self.shapes[name]
        if shape.all_of:
            own = self.object(shape, "")
            return {
                "description": shape.description,
                "allOf": [*(self.ref(n) for n in shape.all_of), own],
            }
        return self.object(shape, shape.description)

    def object(self, shape: Shape, description: str) -> dict:
        schema: dict[str, Any] = {"type": "object"}
        if description:
            schema["description"] = description
        schema["properties"] = {f.name: self.field(f) for f in shape.fields}
        schema["required"] = list(shape.required)
        if shape.closed:
            schema["additionalProperties"] = False
        if shape.exactly_one:
            schema["oneOf"] = [{"required": [n]} for n in shape.exactly_one]
        if shape.example is not None:
            schema["examples"] = [example(shape, shape.example)]
        return schema

    def field(self, f: Field) -> dict:
        if f.schema is not None:
            schema = json.loads(json.dumps(f.schema))
        elif f.type == "const":
            schema = {"const": f.const}
        else:
            schema = self._type(f.type, f.description)
        description = f.description
        if f.type == "timestamp":
            description += TIMESTAMP_NOTE
        if f.limit:
            description += f"; above {f.limit}: 400"
        if description:
            schema["description"] = description
        for attr, keyword in _BOUNDS.items():
            value = getattr(f, attr)
            if value is not None:
                schema[keyword] = value
        if f.examples:
            schema["examples"] = list(f.examples)
        return _or_null(schema) if f.null else schema

    def _type(self, name: str, description: str) -> dict:
        if name.endswith("[]"):
            return {"type": "array", "items": self._type(name[:-2], "")}
        if name in PRIMITIVES:
            return json.loads(json.dumps(PRIMITIVES[name]))
        if name in self.components:
            return self.ref(name)
        if name in self.enums:
            return self._enum(name)
        if name in self.shapes:
            return self.object(
                self.shapes[name], description or self.shapes[name].description
            )
        raise ModelError(f"unknown type {name!r}")

    def _enum(self, name: str) -> dict:
        return {"type": "string", "enum": list(self.enums[name])}


def _or_null(schema: dict) -> dict:
    """``schema`` that also admits null (OpenAPI 3.1: a type list)."""
    if "$ref" in schema:
        return {"oneOf": [schema, {"type": "null"}]}
    out = dict(schema)
    kind = out["type"]
    out["type"] = [kind, "null"] if isinstance(kind, str) else [*kind, "null"]
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def example(shape: Shape, values: Mapping[str, Any]) -> dict:
    """An example of ``shape``: TOML has no null, so a required field that may
    be null and is left out of the example is null in it."""
    out = dict(values)
    for f in shape.fields:
        if f.null and f.name in shape.required and f.name not in out:
            out[f.name] = None
    return {f.name: out[f.name] for f in shape.fields if f.name in out}


# -- checking request bodies ------------------------------------------------------

_MISSING = object()

_ZERO: dict[str, Any] = {
    "string": "",
    "uuid": "",
    "integer": 0,
    "boolean": False,
    "string-map": {},
}
_PHRASE = {
    "string": "a string",
    "uuid": "a string",
    "integer": "an integer",
    "boolean": "true or false",
    "string[]": "an array of strings",
    "string-map": "an object of strings",
}


def json_type(value: Any) -> str:
    """The JSON type of a parsed value, as a message says it."""
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


class _Parser:
    def __init__(self, shapes: Mapping[str, Shape]):
        self.shapes = shapes

    def shape(self, shape: Shape, body: Mapping[str, Any], prefix: str) -> dict:
        if shape.closed:
            unknown = sorted(set(body) - set(shape.names))
            if unknown:
                known = ", ".join(sorted(shape.names))
                raise Invalid(
                    prefix + unknown[0], f"unknown {shape.member} (known: {known})"
                )
        chosen = [n for n in shape.exactly_one if n in body]
        if shape.exactly_one and len(chosen) != 1:
            raise Invalid("", shape.exactly_one_error)
        out = {}
        for f in shape.fields:
            if f.name in shape.exactly_one and f.name not in chosen:
                continue
            required = f.name in shape.required or f.name in chosen
            value = self.field(f, prefix + f.name, body.get(f.name, _MISSING), required)
            if shape.omit_zero and not value:
                continue
            out[f.name] = value
        return out

    def field(self, f: Field, key: str, value: Any, required: bool) -> Any:
        if f.type == "const":
            if value is not _MISSING and value != f.const:
                raise Invalid(key, f"must be {json.dumps(f.const)} when given")
            return f.const if value is not _MISSING else None
        if value is _MISSING or (value is None and (f.null or required)):
            if required:
                raise Invalid(key, f"required, {self.phrase(f.type)}")
            return self.zero(f.type)
        if f.type == "string[]":
            return self.strings(f, key, value)
        if f.type == "string-map":
            return self.string_map(f, key, value)
        if f.type in ("string", "uuid"):
            return self.string(f, key, value)
        if f.type == "integer":
            return self.integer(f, key, value)
        if f.type == "boolean":
            if not isinstance(value, bool):
                raise Invalid(key, f"must be true or false, not {json_type(value)}")
            return value
        if f.type in self.shapes:
            if not isinstance(value, dict):
                raise Invalid(key, f"must be an object, not {json_type(value)}")
            _check_size(f, key, value)
            return self.shape(self.shapes[f.type], value, key + ".")
        raise ModelError(f"{key}: a request field cannot be of type {f.type!r}")

    def phrase(self, type_: str) -> str:
        return _PHRASE.get(type_, "an object")

    def zero(self, type_: str) -> Any:
        if type_.endswith("[]"):
            return []
        return _ZERO.get(type_, {})

    @staticmethod
    def string(f: Field, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid(key, f"must be a string, not {json_type(value)}")
        _check_unicode(key, value)
        _at_least(key, len(value), f.min_length, "characters", "shorter than")
        if f.max_length is not None and len(value) > f.max_length:
            raise Invalid(key, f"longer than {f.max_length} characters")
        if f.pattern is not None and not re.search(f.pattern, value):
            raise Invalid(key, f"must match {f.pattern}")
        return value

    @staticmethod
    def integer(f: Field, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(key, f"must be an integer, not {json_type(value)}")
        low, high = f.minimum, f.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            if low is not None and high is not None:
                raise Invalid(key, f"must be between {low} and {high}")
            raise Invalid(
                key, f"must be at least {low}" if low is not None else f"at most {high}"
            )
        return value

    @staticmethod
    def strings(f: Field, key: str, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise Invalid(key, f"must be an array of strings, not {json_type(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise Invalid(f"{key}[{i}]", f"must be a string, not {json_type(item)}")
            _check_unicode(f"{key}[{i}]", item)
        _at_least(key, len(value), f.min_items, "items")
        return value

    @staticmethod
    def string_map(f: Field, key: str, value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            raise Invalid(key, f"must be an object of strings, not {json_type(value)}")
        for name, item in value.items():
            _check_unicode(key, name)
            if not isinstance(item, str):
                raise Invalid(
                    f"{key}.{name}", f"must be a string, not {json_type(item)}"
                )
            _check_unicode(f"{key}.{name}", item)
        _check_size(f, key, value)
        return value


def _at_least(
    key: str, count: int, minimum: int | None, unit: str, short: str = ""
) -> None:
    """Refuse fewer than ``minimum`` characters, items or entries."""
    if minimum and count < minimum:
        raise Invalid(
            key,
            "must not be empty"
            if minimum == 1
            else f"{short} {minimum} {unit}"
            if short
            else f"must have at least {minimum} {unit}",
        )


def _check_size(f: Field, key: str, value: dict) -> None:
    _at_least(key, len(value), f.min_properties, "entries")
    if f.max_properties is not None and len(value) > f.max_properties:
        raise Invalid(key, f"must have at most {f.max_properties} entries")


def _check_unicode(key: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(
            key, "must be valid Unicode (it holds a lone surrogate)"
        ) from None


# -- the model --------------------------------------------------------------------

SHAPES = load(DATA)

JOB = SHAPES["Job"]
LIMITS = SHAPES["Limits"]
START = SHAPES["StartRequest"]
FANOUT = SHAPES["FanOutRequest"]
DRAIN = SHAPES["DrainRequest"]
LEGACY_START = SHAPES["LegacyStartRequest"]
LEGACY_JOB = SHAPES["LegacyJobRequest"]

# ``jobgate status``: these first, then any other field in the model's order.
JOB_COLUMNS = JOB.cli_order + tuple(n for n in JOB.names if n not in JOB.cli_order)
