"""Fixtures of the appliance tests: the packages, the lab, the deployment."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from lab import nodes as appliance_lab

from .support import (
    PKGTEST,
    REPO,
    SCHEDULER,
    WORKERS,
    Deployment,
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
    """Four booted nodes: scheduler, worker-1, worker-2 and a spare."""
    need_lab_host()
    tools = need_ansible()
    # Built only once the lab is known to be possible here.
    debs = request.getfixturevalue("debs")
    package_files(debs)
    workdir = Path(tempfile.mkdtemp(prefix="jobgate-appliance-"))
    key = workdir / "id_ed25519"
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "jobgate-lab",
            "-f",
            str(key),
        ],
        check=True,
    )
    scripts = workdir / "scripts"
    shutil.copytree(REPO / "examples" / "scripts", scripts)
    shutil.copy(Path(__file__).parent / "scripts" / "identity.sh", scripts)
    extra_vars = {
        "common_pki_local_dir": str(workdir / "pki"),
        "common_packages_dir": str(debs),
        "worker_scripts_src": str(scripts),
    }
    t0 = time.monotonic()
    with appliance_lab.Lab(
        [SCHEDULER, *WORKERS, PKGTEST],
        ssh_public_key=(workdir / "id_ed25519.pub").read_text(),
    ) as lab:
        print(f"lab booted in {time.monotonic() - t0:.0f}s")
        dep = Deployment(lab, workdir, tools, extra_vars, key)
        try:
            yield dep
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def deployed(deployment: Deployment) -> Deployment:
    """The lab after a first, successful run of site.yml."""
    if not deployment.runs:
        res = deployment.playbook()
        print(f"first playbook run: {res.duration:.0f}s")
        assert res.returncode == 0, (
            f"ansible-playbook failed ({res.returncode}):\n{res.stdout[-8000:]}"
            f"{res.stderr[-3000:]}\n{deployment.diagnostics()}"
        )
    return deployment
