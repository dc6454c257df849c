"""Packages by audience: every import in src/ goes down the house, never up.

- the job model (``jobgate.model``): the standard library only, so that
  everyone may use it;
- shared server code (``jobgate``, its stubs ``jobgate.v1``): itself and the model;
- the services (``scheduler``, ``worker``): themselves and the shared code;
- the client (``jobgate.client``, what a user installs on a laptop): itself,
  the job model and the standard library; nothing of the services, no gRPC;
- development tooling (``jobgate.dev``): anything; nothing imports it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
FIRST_PARTY = ("jobgate", "scheduler", "worker")

# What each layer may import, of the first-party packages.
ALLOWED = {
    "shared": {"shared", "stubs", "model"},
    "stubs": {"stubs"},
    "scheduler": {"scheduler", "shared", "stubs", "model"},
    "worker": {"worker", "shared", "stubs", "model"},
    "client": {"client", "model"},
    "model": {"model"},
    "dev": {"dev", "shared", "stubs", "scheduler", "worker", "client", "model"},
}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in ("scheduler", "worker"):
        return top
    for prefix, name in (
        ("jobgate.client", "client"),
        ("jobgate.dev", "dev"),
        ("jobgate.v1", "stubs"),
        ("jobgate.model", "model"),
    ):
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module == "jobgate":
        return "model"  # the package itself: its version, nothing else
    return "shared"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module))
            # "from jobgate import model" imports the module jobgate.model.
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def sources() -> list[Path]:
    return sorted(
        p
        for p in SRC.rglob("*.py")
        if "egg-info" not in str(p) and "jobgate/v1" not in p.as_posix()
    )


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package under src/ (not a name in one)."""
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def violations(path: Path) -> list[str]:
    here = layer(module_name(path))
    found = []
    for line, name in imports(path):
        top = name.split(".")[0]
        if top in FIRST_PARTY:
            if not is_module(name):
                continue  # a name imported from a module, judged by its module
            there = layer(name)
            if there not in ALLOWED[here]:
                found.append(f"{path.relative_to(SRC)}:{line}: {here} imports {name}")
        elif here in ("client", "model") and top not in sys.stdlib_module_names:
            found.append(
                f"{path.relative_to(SRC)}:{line}: {here} imports {name}, "
                "which is not the standard library"
            )
    return found


def test_every_import_in_src_goes_down_the_house():
    found = [v for path in sources() for v in violations(path)]
    assert not found, "\n".join(found)


def test_each_layer_has_modules_so_the_rules_are_not_empty():
    layers = {layer(module_name(p)) for p in sources()}
    assert layers >= {"shared", "scheduler", "worker", "client", "model", "dev"}


@pytest.mark.parametrize(
    ("module", "text", "expected"),
    [
        ("jobgate/tls.py", "from scheduler.store import Store\n", "shared imports"),
        ("jobgate/client/api.py", "import grpc\n", "not the standard library"),
        ("jobgate/client/api.py", "from jobgate import tls\n", "client imports"),
        ("worker/runner.py", "from jobgate.dev import cluster\n", "worker imports"),
        ("scheduler/store/base.py", "import worker.runner\n", "scheduler imports"),
    ],
)
def test_an_upward_import_is_found(tmp_path, monkeypatch, module, text, expected):
    # The check itself, on a copy of a module with one import added.
    target = SRC / module
    copy = tmp_path / "src" / module
    copy.parent.mkdir(parents=True)
    copy.write_text(text + target.read_text())
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "src")
    for name in FIRST_PARTY:  # is_module() looks under the copy's src
        (tmp_path / "src" / name).mkdir(exist_ok=True)
    for rel in (
        "scheduler/store/__init__.py",
        "scheduler/store/base.py",
        "worker/runner.py",
        "jobgate/tls.py",
    ):
        dest = tmp_path / "src" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.touch(exist_ok=True)
    (tmp_path / "src/jobgate/dev").mkdir(parents=True, exist_ok=True)
    (tmp_path / "src/jobgate/dev/__init__.py").touch()
    (tmp_path / "src/jobgate/dev/cluster.py").touch()
    assert any(expected in v for v in violations(copy))
