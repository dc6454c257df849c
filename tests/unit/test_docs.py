"""The documentation follows the code: settings, and links between pages.

``docs/configuration.md`` describes every key of ``scheduler.toml`` and
``worker.toml`` in tables whose key, type, default and allowed values are
checked here against the config schemas (``scheduler.config``,
``worker.config``, built with :func:`jobgate.config.setting`). A key added to
a schema without a row, a row for a key that is gone, or a default changed in
one place only fails these tests, and the failure prints the row as it should
read. Every ``[section].key`` named anywhere in the README and ``docs/`` must
exist too, and every relative link must lead to a file (and heading) that
exists.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from jobgate import config
from scheduler.config import SchedulerConfig
from worker.config import WorkerConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
PAGES = sorted(
    [ROOT / "README.md", ROOT / "bench" / "README.md", *(ROOT / "docs").glob("*.md")]
)
# The part of docs/configuration.md that describes each file.
PARTS = {"scheduler.toml": SchedulerConfig, "worker.toml": WorkerConfig}

# `[section].key` or `[section.sub].key`; a trailing * names a family of keys.
KEY_MENTION = re.compile(r"\[([a-z][a-z_]*(?:\.[a-z_]+)*)\]\.([a-z_]+\*?)")
ROW = re.compile(r"^\|\s*`(\[[^`]+\]\.[a-z_]+)`\s*\|(.*)\|\s*$")
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


# -- what the schemas say --------------------------------------------------------


def fields(schema: type, prefix: tuple[str, ...] = ()):
    """(``[section].key``, field) of every setting, as ``config.describe`` has it."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from fields(hints[f.name], prefix + (f.name,))
        else:
            keys = prefix + (f.name,)
            yield f"[{'.'.join(keys[:-1])}].{keys[-1]}", f


def retired(schema: type, prefix: tuple[str, ...] = ()) -> set[str]:
    """Keys a section still accepts (with a warning) though they mean nothing."""
    out = {f"[{'.'.join(prefix)}].{k}" for k in getattr(schema, "RETIRED", {})}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= retired(hints[f.name], prefix + (f.name,))
    return out


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, typing.Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
        return "{ " + items + " }"
    raise TypeError(f"no TOML rendering for {value!r}")


def _number(n: float) -> str:
    return f"{int(n):,}" if float(n).is_integer() else str(n)


def expected_cells(f: dataclasses.Field, type_name: str) -> list[str]:
    """Type, default and allowed values of a setting, as its row shows them."""
    if f.default is not dataclasses.MISSING:
        default = "unset" if f.default is None else f"`{_toml(f.default)}`"
    elif f.default_factory is not dataclasses.MISSING:
        default = f"`{_toml(f.default_factory())}`"
    else:
        default = "required"
    meta = f.metadata
    allowed = []
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        allowed.append(f"{_number(lo)} to {_number(hi)}")
    elif lo is not None:
        allowed.append(f"≥ {_number(lo)}")
    elif hi is not None:
        allowed.append(f"≤ {_number(hi)}")
    if meta.get("choices"):
        allowed.append(" or ".join(f'`"{c}"`' for c in meta["choices"]))
    if meta.get("pattern") is not None:
        allowed.append("a name")
    if meta.get("exists"):
        allowed.append(
            f"an existing {'directory' if meta['exists'] == 'dir' else 'file'}"
        )
    return [type_name, default, "; ".join(allowed) or "any"]


def schema_rows(schema: type) -> dict[str, list[str]]:
    types = {key: type_name for key, type_name, _ in config.describe(schema)}
    return {key: expected_cells(f, types[key]) for key, f in fields(schema)}


# -- what the page says ----------------------------------------------------------


def parts(text: str) -> dict[str | None, str]:
    """The page cut at its level-2 headings: the part per file, None for the rest."""
    out: dict[str | None, list[str]] = {None: []}
    current: str | None = None
    for line in text.splitlines():
        heading = re.match(r"^## `?([a-z]+\.toml)`?\s*$", line)
        if heading and heading.group(1) in PARTS:
            current = heading.group(1)
            out.setdefault(current, [])
        elif line.startswith("## "):
            current = None
        out[current].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def page_rows(text: str) -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            cells = [c.strip() for c in m.group(2).split("|")]
            assert m.group(1) not in rows, f"two rows for {m.group(1)}"
            rows[m.group(1)] = cells
    return rows


@pytest.fixture(scope="module")
def page() -> dict[str | None, str]:
    found = parts(CONFIGURATION.read_text())
    assert set(PARTS) <= set(found), f"{CONFIGURATION.name} lacks a part: {PARTS}"
    return found


@pytest.mark.parametrize("part", sorted(PARTS))
def test_configuration_page_has_a_row_for_every_setting(page, part):
    want = schema_rows(PARTS[part])
    have = page_rows(page[part])
    missing = [
        f"| `{key}` | {' | '.join(cells)} | ... |"
        for key, cells in want.items()
        if key not in have
    ]
    assert not missing, f"{part}: rows missing from {CONFIGURATION.name}:\n" + (
        "\n".join(missing)
    )


@pytest.mark.parametrize("part", sorted(PARTS))
def test_configuration_page_has_no_row_for_a_key_that_does_not_exist(page, part):
    extra = sorted(set(page_rows(page[part])) - set(schema_rows(PARTS[part])))
    assert not extra, f"{part}: rows for keys {PARTS[part].__name__} lacks: {extra}"


@pytest.mark.parametrize("part", sorted(PARTS))
def test_configuration_rows_give_the_schema_type_default_and_range(page, part):
    want = schema_rows(PARTS[part])
    wrong = []
    for key, cells in page_rows(page[part]).items():
        if key in want and cells[:3] != want[key]:
            wrong.append(
                f"{key}:\n  page:   {' | '.join(cells[:3])}\n"
                f"  schema: {' | '.join(want[key])}"
            )
    assert not wrong, f"{part}: rows that differ from the schema:\n" + "\n".join(wrong)


@pytest.mark.parametrize("part", sorted(PARTS))
def test_configuration_rows_say_what_the_setting_does(page, part):
    empty = [
        k for k, cells in page_rows(page[part]).items() if not cells[3:] or not cells[3]
    ]
    assert not empty, f"{part}: rows without a meaning: {empty}"


def _unknown_mentions(text: str, known: set[str]) -> list[str]:
    unknown = []
    for m in KEY_MENTION.finditer(text):
        key = f"[{m.group(1)}].{m.group(2)}"
        if key.endswith("*"):
            if not any(k.startswith(key[:-1]) for k in known):
                unknown.append(key)
        elif key not in known:
            unknown.append(key)
    return unknown


def test_configuration_page_names_only_keys_of_its_file(page):
    everything = set(schema_rows(SchedulerConfig)) | set(schema_rows(WorkerConfig))
    old = retired(SchedulerConfig) | retired(WorkerConfig)
    problems = []
    for part, text in page.items():
        known = set(schema_rows(PARTS[part])) if part else everything | old
        problems += [
            f"{part or 'outside the parts'}: {k}"
            for k in _unknown_mentions(text, known)
        ]
    assert not problems, (
        f"{CONFIGURATION.name} names keys that do not exist: {problems}"
    )


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_setting_named_in_the_docs_exists(path):
    known = set(schema_rows(SchedulerConfig)) | set(schema_rows(WorkerConfig))
    if path == CONFIGURATION:
        known |= retired(SchedulerConfig) | retired(WorkerConfig)
    unknown = _unknown_mentions(path.read_text(), known)
    assert not unknown, (
        f"{path.relative_to(ROOT)} names settings that do not exist: {unknown}"
    )


# -- links -------------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor a Markdown renderer (GitHub's) gives a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return LINK.findall(text)


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings_that_exist(path):
    broken = []
    for target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto: ...
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.name}")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_checker_sees_links():
    """The checks above would pass on pages they cannot read: make sure they read."""
    readme = ROOT / "README.md"
    assert any(t.startswith("docs/") for t in links(readme))
    assert slug("The path of a job start") == "the-path-of-a-job-start"
    assert slug("`make lab`") == "make-lab"


def test_every_operation_of_the_api_description_has_its_reference_page():
    """docs/api.md (and the original API's page) name every route the
    scheduler serves, as ``METHOD /path`` with any names for its parameters:
    a route added to the app (and so to /openapi.json) needs its prose."""
    from scheduler.http import openapi

    pages = "\n".join(
        (ROOT / "docs" / name).read_text() for name in ("api.md", "original-api.md")
    )
    missing = []
    for path, operations in openapi.document()["paths"].items():
        pattern = re.escape(path)
        pattern = re.sub(r"\\\{[a-z_]+\\\}", r"\\{[a-z_]+\\}", pattern)
        for method in operations:
            if method in ("get", "post", "put", "patch", "delete"):
                if not re.search(rf"{method.upper()} `?{pattern}(?![\w/{{])", pages):
                    missing.append(f"{method.upper()} {path}")
    assert not missing, f"not in docs/api.md or docs/original-api.md: {missing}"
