"""Build hooks: the gRPC stubs and the worker's job spawner.

All metadata lives in pyproject.toml. This file makes ``pip install .`` (and
so the Debian package build) produce ``jobgate/v1/*_pb2*.py`` from the
``.proto`` files, the same way ``make proto`` does for a development checkout,
and compile ``worker._spawn`` (C, Linux only), which starts a job's program
with one exec, and ``worker/jobgate-keeper`` (C, an executable), the parent
that keeps a job running when the worker restarts. Both are optional: where
no C compiler is at hand the build goes on without them, and the worker
starts jobs through ``setpriv`` instead, as its own children.
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.errors import CCompilerError, CompileError, ExecError, LinkError
from setuptools.modified import newer_group

ROOT = Path(__file__).resolve().parent


def generate_stubs(out_dir: Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)

    protos = sorted(
        str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto")
    )
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


C_FLAGS = ["-std=gnu11", "-Wall", "-Wextra", "-O2"]

SPAWN = Extension(
    "worker._spawn",
    ["src/worker/_spawn.c"],
    depends=["src/worker/jobchild.h"],
    extra_compile_args=C_FLAGS,
    optional=True,
)

KEEPER = "jobgate-keeper"
KEEPER_SOURCES = ["src/worker/keeper.c"]
KEEPER_DEPENDS = ["src/worker/jobchild.h"]


class BuildWithKeeper(build_ext):
    """build_ext, and the keeper: a program, which setuptools has no notion of.

    It is compiled with the extensions' compiler into the build directory,
    next to ``worker._spawn``, so that wheels carry it; for an in-place build
    (``pip install -e``, ``build_ext --inplace``) it is copied into
    ``src/worker`` as the extensions are.
    """

    def run(self) -> None:
        super().run()
        built = self.build_keeper()
        if built is not None and self.inplace:  # editable_mode sets inplace
            self.copy_file(built, str(self.keeper_source_path()), level=self.verbose)

    def keeper_build_path(self) -> Path:
        return Path(self.build_lib) / "worker" / KEEPER

    def keeper_source_path(self) -> Path:
        package_dir = self.get_finalized_command("build_py").get_package_dir("worker")
        return Path(package_dir) / KEEPER

    def build_keeper(self) -> str | None:
        target = self.keeper_build_path()
        if not self.force and not newer_group(
            KEEPER_SOURCES + KEEPER_DEPENDS, str(target), missing="newer"
        ):
            return str(target)
        try:
            objects = self.compiler.compile(
                KEEPER_SOURCES,
                output_dir=self.build_temp,
                extra_postargs=C_FLAGS,
                depends=KEEPER_DEPENDS,
            )
            self.compiler.link_executable(
                objects, KEEPER, output_dir=str(target.parent)
            )
        except (CCompilerError, CompileError, ExecError, LinkError) as exc:
            # Like the optional extension: the worker then runs its jobs as
            # its own children (worker.kept.keeper_available() says why).
            self.warn(f"building {KEEPER} failed: {exc}")
            return None
        # Whatever the builder's umask: it runs from the installed package.
        os.chmod(target, 0o755)  # noqa: S103 (a program, nothing secret in it)
        return str(target)

    def get_source_files(self) -> list[str]:
        # What a source distribution must carry to build the keeper too.
        return [*super().get_source_files(), *KEEPER_SOURCES, *KEEPER_DEPENDS]

    def get_outputs(self) -> list[str]:
        if self.inplace:  # the mapping's build side, as for the extensions
            return super().get_outputs()
        return [*super().get_outputs(), str(self.keeper_build_path())]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        if self.inplace:
            mapping[str(self.keeper_build_path())] = str(self.keeper_source_path())
        return mapping


setup(
    cmdclass={"build_py": BuildWithStubs, "build_ext": BuildWithKeeper},
    ext_modules=[SPAWN],
)
