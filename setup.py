"""Build hooks: the gRPC stubs and the worker's job spawner.

All metadata lives in pyproject.toml. This file makes ``pip install .`` (and
so the Debian package build) produce ``jobgate/v1/*_pb2*.py`` from the
``.proto`` files, the same way ``make proto`` does for a development checkout,
and compile ``worker._spawn`` (C, Linux only), which starts a job's program
with one exec. It is optional: where no C compiler is at hand the build goes
on without it, and the worker starts jobs through ``setpriv`` instead.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs(out_dir: Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{ROOT / 'proto'}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed to generate the gRPC stubs")
    (out_dir / "jobgate" / "v1" / "__init__.py").touch()


class BuildWithStubs(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            generate_stubs(Path(self.build_lib))


SPAWN = Extension(
    "worker._spawn",
    ["src/worker/_spawn.c"],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-O2"],
    optional=True,
)

setup(cmdclass={"build_py": BuildWithStubs}, ext_modules=[SPAWN])
