"""TOML configuration read with :mod:`tomllib` into frozen dataclasses.

A config schema is a tree of frozen dataclasses. :func:`load` walks the TOML
document along that tree and refuses anything it does not expect: unknown keys,
wrong types, values out of range, files that do not exist. Every error names
the file and the key (``worker.toml: [tls].ca_file: no such file '/etc/x'``),
so a config mistake is found by ``check-config`` before a service starts.

Relative paths in a config are resolved against the directory of the config
file, so a config and the files it names can move together.

Constraints are declared on fields with :func:`setting`::

    @dataclass(frozen=True)
    class Jobs:
        max_concurrent: int = setting(64, min=1, help="jobs running at once")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING = dataclasses.MISSING


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and key."""


class Invalid(ValueError):
    """Raised by a schema's ``__post_init__`` for a value that fails a check.

    ``key`` is the offending key relative to the dataclass raising it, as a
    tuple (``("bind",)`` or ``("jobs", "default_timeout_s")``).
    """

    def __init__(self, key: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.key = (key,) if isinstance(key, str) else tuple(key)
        self.message = message


def setting(
    default: Any = _MISSING,
    *,
    default_factory: Any = _MISSING,
    min: float | None = None,  # noqa: A002 - reads naturally at the call site
    max: float | None = None,  # noqa: A002
    choices: tuple[Any, ...] | None = None,
    pattern: str | None = None,
    exists: str | None = None,
    help: str = "",  # noqa: A002
) -> Any:
    """A dataclass field with validation rules (see the module docstring).

    ``exists`` is ``"file"`` or ``"dir"``: the path must exist and be one.
    """
    meta = {
        "min": min,
        "max": max,
        "choices": choices,
        "pattern": re.compile(pattern) if pattern else None,
        "exists": exists,
        "help": help,
    }
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata=meta
    )


def load(path: str | Path, schema: type[T], *, check_files: bool = True) -> T:
    """Read ``path`` and build ``schema`` from it, or raise :class:`ConfigError`."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    ctx = _Context(path, path.resolve().parent, check_files)
    return ctx.build(schema, data, ())


def loads(text: str, schema: type[T], *, name: str = "<string>", base: Path) -> T:
    """Like :func:`load` for TOML text; relative paths resolve against ``base``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name}: invalid TOML: {exc}") from None
    return _Context(Path(name), base, True).build(schema, data, ())


def describe(schema: type, prefix: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """(key, type, help) for every setting of ``schema``, for documentation."""
    rows = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + (f.name,))
        else:
            rows.append(
                (_key(prefix + (f.name,)), _type_name(tp), f.metadata.get("help", ""))
            )
    return rows


def _key(keys: tuple[str, ...]) -> str:
    if len(keys) == 1:
        return keys[0]
    return f"[{'.'.join(keys[:-1])}].{keys[-1]}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args)
    if origin is dict:
        return "table of strings"
    if origin in (list, tuple):
        return "array of strings"
    return {
        str: "string",
        int: "integer",
        float: "number",
        bool: "boolean",
        Path: "path",
    }.get(tp, getattr(tp, "__name__", str(tp)))


class _Context:
    def __init__(self, path: Path, base: Path, check_files: bool):
        self.path = path
        self.base = base
        self.check_files = check_files

    def error(self, keys: tuple[str, ...], message: str) -> ConfigError:
        where = _key(keys) if keys else "(top level)"
        return ConfigError(f"{self.path}: {where}: {message}")

    def build(self, schema: type[T], data: dict[str, Any], keys: tuple[str, ...]) -> T:
        hints = typing.get_type_hints(schema)
        fields = {f.name: f for f in dataclasses.fields(schema)}
        retired = getattr(schema, "RETIRED", {})
        for name in [n for n in data if n in retired and n not in fields]:
            # A key an older version knew: it no longer means anything, and
            # a config written for that version still loads.
            del data[name]
            logging.getLogger(__name__).warning(
                "%s: %s: no longer used (%s); remove it",
                self.path,
                _key(keys + (name,)),
                retired[name],
            )
        for name in data:
            if name not in fields:
                known = ", ".join(sorted(fields))
                raise self.error(keys + (name,), f"unknown key (known keys: {known})")
        values = {}
        for name, f in fields.items():
            k = keys + (name,)
            tp = hints[name]
            if name in data:
                values[name] = self.convert(tp, data[name], k, f.metadata)
            elif dataclasses.is_dataclass(tp):
                values[name] = self.build(tp, {}, k)
            elif f.default is _MISSING and f.default_factory is _MISSING:
                raise self.error(k, "required key is missing")
        try:
            return schema(**values)
        except Invalid as exc:  # checks in __post_init__
            raise self.error(keys + exc.key, exc.message) from None

    def convert(self, tp: Any, value: Any, keys: tuple[str, ...], meta: Any) -> Any:
        origin = typing.get_origin(tp)
        if origin in (types.UnionType, typing.Union):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            return self.convert(args[0], value, keys, meta)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.error(keys, f"expected a table, got {_toml_type(value)}")
            return self.build(tp, value, keys)
        if origin is dict:
            if not isinstance(value, dict):
                raise self.error(keys, f"expected a table, got {_toml_type(value)}")
            vtype = typing.get_args(tp)[1]
            out = {}
            for k, v in value.items():
                out[k] = self.convert(vtype, v, keys[:-1] + (f"{keys[-1]}.{k}",), meta)
            return types.MappingProxyType(out)
        if origin in (list, tuple):
            if not isinstance(value, list):
                raise self.error(keys, f"expected an array, got {_toml_type(value)}")
            itype = typing.get_args(tp)[0]
            return tuple(
                self.convert(itype, v, keys[:-1] + (f"{keys[-1]}[{i}]",), meta)
                for i, v in enumerate(value)
            )
        if tp is bool:
            if not isinstance(value, bool):
                raise self.error(
                    keys, f"expected true or false, got {_toml_type(value)}"
                )
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.error(keys, f"expected an integer, got {_toml_type(value)}")
            self.check_range(value, keys, meta)
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self.error(keys, f"expected a number, got {_toml_type(value)}")
            if not math.isfinite(value):
                raise self.error(keys, f"{value} is not a finite number")
            self.check_range(value, keys, meta)
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise self.error(keys, f"expected a string, got {_toml_type(value)}")
            self.check_choices(value, keys, meta)
            pattern = meta.get("pattern")
            if pattern is not None and not pattern.fullmatch(value):
                raise self.error(keys, f"{value!r} does not match {pattern.pattern}")
            return value
        if tp is Path:
            if not isinstance(value, str) or not value:
                raise self.error(
                    keys, f"expected a path string, got {_toml_type(value)}"
                )
            p = Path(value)
            if not p.is_absolute():
                p = self.base / p
            self.check_exists(p, keys, meta.get("exists"))
            return p
        raise TypeError(f"unsupported config type {tp!r}")  # a schema bug

    def check_range(self, value: float, keys: tuple[str, ...], meta: Any) -> None:
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise self.error(keys, f"{value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise self.error(keys, f"{value} is above the maximum {hi}")

    def check_choices(self, value: Any, keys: tuple[str, ...], meta: Any) -> None:
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise self.error(keys, f"{value!r} is not one of {allowed}")

    def check_exists(self, p: Path, keys: tuple[str, ...], kind: str | None) -> None:
        if kind is None or not self.check_files:
            return
        if not p.exists():
            raise self.error(
                keys, f"no such {'directory' if kind == 'dir' else 'file'} '{p}'"
            )
        if kind == "dir" and not p.is_dir():
            raise self.error(keys, f"'{p}' is not a directory")
        if kind == "file" and not p.is_file():
            raise self.error(keys, f"'{p}' is not a regular file")


def _toml_type(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def parse_hostport(value: str, key: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too); raise :class:`Invalid` with a hint."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise Invalid(key, f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise Invalid(key, f"{value!r}: the port must be a number from 0 to 65535")
    return host, int(port)
