"""Static checks of the appliance files: units, packages, roles, Vagrantfile."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from jobgate import config as jobgate_config
from scheduler.config import SchedulerConfig
from worker.config import JobsSection, WorkerConfig

from .support import ANSIBLE_DIR, REPO, need, need_ansible, need_programs, tools_env

UNITS = REPO / "packaging" / "systemd"
DEB = REPO / "packaging" / "deb"

# Highest `systemd-analyze security` exposure allowed for each unit (0-10;
# lower is better). The worker must keep setuid/setgid/kill and a delegated
# cgroup for its jobs, so it scores higher than the unprivileged scheduler.
EXPOSURE_LIMITS = {"jobgate-scheduler.service": 1.5, "jobgate-worker.service": 3.0}


@pytest.mark.parametrize("unit", sorted(EXPOSURE_LIMITS))
def test_systemd_analyze_verify_prints_nothing(unit: str, tmp_path: Path):
    need_programs("systemd-analyze")
    # A root with the system's own units, the unit under test, and stand-ins
    # for the programs it runs (their packaged versions are tested in the lab).
    shutil.copytree(
        "/lib/systemd/system", tmp_path / "lib/systemd/system", symlinks=True
    )
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNITS / unit, tmp_path / "etc/systemd/system" / unit)
    bindir = tmp_path / "opt/venvs/jobgate/bin"
    bindir.mkdir(parents=True)
    for prog in ("jobgate-scheduler", "jobgate-worker"):
        (bindir / prog).write_text("#!/bin/sh\n")
        (bindir / prog).chmod(0o755)
    # ExecReload's kill (procps, a dependency of the scheduler's package).
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/kill").write_text("#!/bin/sh\n")
    (tmp_path / "bin/kill").chmod(0o755)
    res = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", unit],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), (
        res.stdout + res.stderr
    )


@pytest.mark.parametrize("unit", sorted(EXPOSURE_LIMITS))
def test_systemd_analyze_security_exposure_is_low(unit: str):
    need_programs("systemd-analyze")
    res = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--no-pager",
            str(UNITS / unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout)
    assert m, res.stdout + res.stderr
    score = float(m.group(1))
    print(f"{unit}: exposure {score}")
    assert score <= EXPOSURE_LIMITS[unit], res.stdout
    # The same, as systemd-analyze itself enforces it.
    threshold = int(EXPOSURE_LIMITS[unit] * 10)
    res = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            f"--threshold={threshold}",
            str(UNITS / unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stdout


def test_units_keep_the_promised_settings():
    for unit in EXPOSURE_LIMITS:
        text = (UNITS / unit).read_text()
        for line in (
            "Type=notify",
            "NotifyAccess=main",
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
        ):
            assert f"\n{line}\n" in text, (unit, line)
        assert re.search(r"^WatchdogSec=\d+s$", text, re.M), unit
    worker = (UNITS / "jobgate-worker.service").read_text()
    assert "\nDelegate=yes\n" in worker
    # Jobs outlive a restart of the worker: its keepers are left alone.
    assert "\nKillMode=process\n" in worker
    assert "\nRuntimeDirectoryPreserve=restart\n" in worker
    # ... and so do their temporary directories (test_worker_role_...).
    assert "\nCacheDirectory=jobgate/tmp\nCacheDirectoryMode=0711\n" in worker
    scheduler_unit = (UNITS / "jobgate-scheduler.service").read_text()
    assert "\nKillMode=mixed\n" in scheduler_unit
    assert (
        "\nCapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_KILL CAP_CHOWN\n" in worker
    )
    scheduler = (UNITS / "jobgate-scheduler.service").read_text()
    assert "\nUser=jobgate\n" in scheduler
    assert "\nCapabilityBoundingSet=\n" in scheduler


def test_lintian_reports_no_errors_or_warnings(debs: Path):
    need_programs("lintian")
    changes = sorted(debs.glob("*.changes"))
    assert len(changes) == 1, changes
    res = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(changes[0])],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    tags = [line for line in res.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert res.returncode == 0 and not tags, res.stdout + res.stderr


@pytest.mark.parametrize(
    ("name", "schema"),
    [("scheduler.toml", SchedulerConfig), ("worker.toml", WorkerConfig)],
)
def test_packaged_default_configs_follow_the_schema(name: str, schema: type):
    # The files they name (certificates, tokens) exist only on a configured
    # host; everything else is checked as check-config checks it.
    jobgate_config.load(DEB / "etc" / "jobgate" / name, schema, check_files=False)


def test_worker_role_and_package_give_jobs_what_outlives_a_restart():
    """The jobs' $TMPDIR in the unit's CacheDirectory= (systemd removes the
    unit's private /tmp when it restarts, while kept jobs go on); the role's
    user id range defaults to the worker's own."""
    packaged = jobgate_config.load(
        DEB / "etc" / "jobgate" / "worker.toml", WorkerConfig, check_files=False
    )
    assert packaged.jobs.tmp_dir == "/var/cache/jobgate/tmp"
    role = ANSIBLE_DIR / "roles" / "worker"
    defaults = (role / "defaults" / "main.yml").read_text()
    assert "\nworker_job_tmp_dir: /var/cache/jobgate/tmp\n" in defaults
    fields = JobsSection.__dataclass_fields__
    for var, key in (
        ("worker_job_uid_min", "uid_min"),
        ("worker_job_uid_max", "uid_max"),
    ):
        assert f"\n{var}: {fields[key].default}\n" in defaults, var
    template = (role / "templates" / "worker.toml.j2").read_text()
    for line in (
        "uid_min = {{ worker_job_uid_min | int }}",
        "uid_max = {{ worker_job_uid_max | int }}",
        "tmp_dir = {{ worker_job_tmp_dir | to_json }}",
    ):
        assert f"\n{line}\n" in template, line


def test_package_versions_agree():
    changelog = (DEB / "debian" / "changelog").read_text().splitlines()[0]
    deb_version = re.match(r"jobgate \(([^)]+)\)", changelog).group(1)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert deb_version == pyproject["project"]["version"]
    defaults = (ANSIBLE_DIR / "roles" / "common" / "defaults" / "main.yml").read_text()
    assert f'common_package_version: "{deb_version}"' in defaults


def test_ansible_lint_production_profile_passes():
    tools = need_ansible()
    need((tools / "ansible-lint").exists(), f"no ansible-lint in {tools}")
    res = subprocess.run(
        [
            str(tools / "ansible-lint"),
            "--offline",
            "--profile",
            "production",
            "--nocolor",
            "site.yml",
            "roles",
        ],
        cwd=ANSIBLE_DIR,
        env=tools_env(tools),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]


def test_site_yml_passes_ansible_syntax_check():
    tools = need_ansible()
    res = subprocess.run(
        [str(tools / "ansible-playbook"), "--syntax-check", "site.yml"],
        cwd=ANSIBLE_DIR,
        env=tools_env(tools),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_vagrantfile_is_valid_ruby():
    need_programs("ruby")
    res = subprocess.run(
        ["ruby", "-c", str(REPO / "Vagrantfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and "Syntax OK" in res.stdout, res.stdout + res.stderr


def test_vagrantfile_passes_vagrant_validate(tmp_path: Path):
    need_programs("vagrant")
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VAGRANT_CWD": str(REPO),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / ".vagrant"),
        "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    # No provider (libvirt) is needed to check the configuration itself.
    res = subprocess.run(
        ["vagrant", "validate", "--ignore-provider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "validated successfully" in res.stdout, res.stdout
