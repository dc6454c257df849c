"""The example configs document every setting, so they must follow the schemas.

``examples/scheduler.toml`` and ``examples/worker.toml`` name production paths
(``/etc/jobgate/...``) that do not exist here, so they are loaded with
``check_files=False``; everything else about them is checked as
``check-config`` would check it.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from pathlib import Path

import pytest

from jobgate import config
from scheduler.config import SchedulerConfig
from worker.config import WorkerConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

CASES = [
    pytest.param(EXAMPLES / "scheduler.toml", SchedulerConfig, id="scheduler"),
    pytest.param(EXAMPLES / "worker.toml", WorkerConfig, id="worker"),
]


def settings(schema: type, prefix: tuple[str, ...] = ()):
    """(key path, field) of every setting, in schema order, like ``describe``."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from settings(hints[f.name], prefix + (f.name,))
        else:
            yield prefix + (f.name,), f


def key_path(described: str) -> tuple[str, ...]:
    """``[jobs].max_args`` -> ("jobs", "max_args"); ``name`` -> ("name",)."""
    m = re.fullmatch(r"\[([^\]]+)\]\.(.+)", described)
    if m is None:
        return (described,)
    return (*m.group(1).split("."), m.group(2))


def lookup(data: dict, path: tuple[str, ...]):
    for part in path:
        if not isinstance(data, dict) or part not in data:
            raise KeyError(part)
        data = data[part]
    return data


def document(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)


@pytest.mark.parametrize(("path", "schema"), CASES)
def test_example_is_valid_toml_and_loads(path: Path, schema: type) -> None:
    document(path)  # raises on invalid TOML
    # load() refuses unknown keys, wrong types and out-of-range values.
    cfg = config.load(path, schema, check_files=False)
    assert isinstance(cfg, schema)


@pytest.mark.parametrize(("path", "schema"), CASES)
def test_example_sets_every_key_of_the_schema(path: Path, schema: type) -> None:
    data = document(path)
    missing = []
    for key, _type, _help in config.describe(schema):
        try:
            lookup(data, key_path(key))
        except KeyError:
            missing.append(key)
    assert not missing, f"{path.name} does not show: {', '.join(missing)}"


@pytest.mark.parametrize(("path", "schema"), CASES)
def test_example_has_no_key_the_schema_lacks(path: Path, schema: type) -> None:
    known = {p for p, _ in settings(schema)}
    sections = {p[:i] for p in known for i in range(1, len(p))}
    unknown = []

    def walk(node: dict, prefix: tuple[str, ...]) -> None:
        for name, value in node.items():
            here = prefix + (name,)
            if here in known:
                continue  # a setting (tables of strings are settings too)
            if here in sections and isinstance(value, dict):
                walk(value, here)
            else:
                unknown.append(".".join(here))

    walk(document(path), ())
    assert not unknown, f"{path.name}: not settings of {schema.__name__}: {unknown}"


@pytest.mark.parametrize(("path", "schema"), CASES)
def test_example_follows_the_schema_order(path: Path, schema: type) -> None:
    def flatten(node: dict, prefix: tuple[str, ...] = ()):
        for name, value in node.items():
            here = prefix + (name,)
            if isinstance(value, dict) and here not in known:
                yield from flatten(value, here)
            else:
                yield here

    known = {p for p, _ in settings(schema)}
    in_file = list(flatten(document(path)))
    in_schema = [p for p, _ in settings(schema)]
    assert in_file == in_schema


@pytest.mark.parametrize(("path", "schema"), CASES)
def test_every_key_has_a_comment_with_its_default(path: Path, schema: type) -> None:
    """Each key follows a comment that gives its default or says it is required."""
    lines = path.read_text().splitlines()
    section: tuple[str, ...] = ()
    seen = {}
    for i, line in enumerate(lines):
        header = re.fullmatch(r"\[([a-z_.]+)\]", line.strip())
        if header:
            section = tuple(header.group(1).split("."))
            continue
        m = re.match(r"([a-z_]+)\s*=", line)
        if not m:
            continue
        block = []
        j = i - 1
        while j >= 0 and lines[j].startswith("#"):
            block.insert(0, lines[j])
            j -= 1
        seen[section + (m.group(1),)] = "\n".join(block)
    for key, f in settings(schema):
        comment = seen.get(key)
        name = ".".join(key)
        assert comment, f"{path.name}: {name} has no comment right above it"
        required = f.default is dataclasses.MISSING and (
            f.default_factory is dataclasses.MISSING
        )
        word = "Required." if required else "Default"
        assert word in comment, f"{path.name}: the comment of {name} lacks {word!r}"


@pytest.mark.parametrize(("path", "schema"), CASES)
def test_example_paths_are_production_paths(path: Path, schema: type) -> None:
    cfg = config.load(path, schema, check_files=False)
    paths = []
    for key, _ in settings(schema):
        value = cfg
        for part in key:
            value = getattr(value, part)
        if isinstance(value, Path):
            paths.append(value)
    assert paths
    prefixes = ("/etc/jobgate/", "/var/lib/jobgate/", "/srv/jobgate/", "/run/jobgate/")
    for p in paths:
        assert str(p).startswith(prefixes), p
