"""Fixtures of the appliance tests: the packages, the lab, the deployment."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lab import cluster as lab_cluster

from .support import (
    PKGTEST,
    REPO,
    Deployment,
    lab_command,
    need_ansible,
    need_lab_host,
    need_programs,
    package_files,
)


@pytest.fixture(scope="session")
def debs():
    """The packages, built once per session with ``make deb``.

    They are built into a directory of this session's own, so that two test
    runs at once do not clobber each other's build. ``JOBGATE_APPLIANCE_DEBS=DIR``
    uses packages built before instead.
    """
    given = os.environ.get("JOBGATE_APPLIANCE_DEBS")
    if given:
        yield Path(given).resolve()
        return
    need_programs("dpkg-buildpackage", "dh", "dh_virtualenv", "make", "git")
    out = Path(tempfile.mkdtemp(prefix="jobgate-debs-"))
    try:
        t0 = time.monotonic()
        res = subprocess.run(
            [
                "make",
                "-C",
                str(REPO),
                "deb",
                f"DEB_BUILD={out / 'build'}",
                f"DEB_DIST={out / 'dist'}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert res.returncode == 0, (
            f"make deb failed:\n{res.stdout[-6000:]}{res.stderr[-6000:]}"
        )
        print(f"make deb: {time.monotonic() - t0:.0f}s")
        yield out / "dist"
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest):
    """Booted nodes, scheduler, worker-1, worker-2 and a spare, as ``make lab``.

    ``python -m lab up`` boots them and runs site.yml once; the tests then
    take the lab over from its state file (the same code ``make lab-status``
    and ``make lab-down`` use). The last test takes it down with
    ``python -m lab down``; should a test stop early, this fixture does.
    """
    need_lab_host()
    need_ansible()
    # Built only once the lab is known to be possible here.
    debs = request.getfixturevalue("debs")
    package_files(debs)
    workdir = Path(tempfile.mkdtemp(prefix="jobgate-appliance-"))
    scripts = workdir / "scripts"
    shutil.copytree(REPO / "examples" / "scripts", scripts)
    for script in sorted((Path(__file__).parent / "scripts").glob("*.sh")):
        shutil.copy(script, scripts)
    cluster = lab_cluster.Cluster(workdir / "lab")
    t0 = time.monotonic()
    up = lab_command(
        cluster.dir,
        "up",
        "--debs",
        str(debs),
        "--scripts",
        str(scripts),
        "--port",
        "0",
        "--spare",
        PKGTEST,
    )
    print(f"python -m lab up: {time.monotonic() - t0:.0f}s")
    try:
        lab = cluster.load()
        assert lab is not None, f"python -m lab up failed:\n{up.stdout}{up.stderr}"
        yield Deployment(cluster, lab, up)
    finally:
        cluster.down()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(deployment: Deployment) -> Deployment:
    """The lab after a first, successful run of site.yml."""
    assert deployment.up.returncode == 0, (
        f"python -m lab up failed ({deployment.up.returncode}):\n"
        f"{deployment.up.stdout[-8000:]}{deployment.up.stderr[-3000:]}\n"
        f"{deployment.diagnostics()}"
    )
    return deployment
