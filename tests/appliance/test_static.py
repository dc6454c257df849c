"""Static checks of the appliance files: units, packages, roles, Vagrantfile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from jobgate import config as jobgate_config
from lab import cluster as lab_cluster
from lab import nodes as lab_nodes
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


# -- several schedulers: the inventory's check and the rendered configs --------

ROLES = ANSIBLE_DIR / "roles"
# Renders the roles' config templates on the control node for every host of
# an inventory, with the roles' defaults and internal variables, and writes
# them to OUT; nothing is installed anywhere.
RENDER_PLAYBOOK = """\
- name: Render the configs
  hosts: schedulers:workers
  gather_facts: false
  connection: local
  tasks:
    - name: Load the roles' settings
      ansible.builtin.include_vars:
        file: "{{ item }}"
      loop: "{{ role_files }}"
    - name: Render scheduler.toml
      ansible.builtin.copy:
        content: "{{ lookup('ansible.builtin.template', scheduler_template) }}"
        dest: "{{ out }}/{{ inventory_hostname }}.toml"
        mode: "0600"
      when: inventory_hostname in groups.schedulers
    - name: Render worker.toml
      ansible.builtin.copy:
        content: "{{ lookup('ansible.builtin.template', worker_template) }}"
        dest: "{{ out }}/{{ inventory_hostname }}.toml"
        mode: "0600"
      when: inventory_hostname in groups.workers
    - name: Render keepalived.conf
      ansible.builtin.copy:
        content: "{{ lookup('ansible.builtin.template', keepalived_template) }}"
        dest: "{{ out }}/{{ inventory_hostname }}.keepalived.conf"
        mode: "0600"
      when:
        - inventory_hostname in groups.schedulers
        - keepalived_virtual_ip | length > 0
"""


def render_configs(tmp_path: Path, inventory: str, **extra) -> dict[str, dict]:
    """Host name -> its scheduler.toml or worker.toml, rendered and parsed."""
    tools = need_ansible()
    (tmp_path / "hosts.ini").write_text(inventory)
    (tmp_path / "render.yml").write_text(RENDER_PLAYBOOK)
    out = tmp_path / "out"
    out.mkdir()
    role_files = [
        str(ROLES / role / kind / "main.yml")
        for role, kind in (
            ("common", "defaults"),
            ("common", "vars"),
            ("scheduler", "defaults"),
            ("scheduler", "vars"),
            ("worker", "defaults"),
            ("keepalived", "defaults"),
        )
    ]
    variables = {
        # Modules run on this machine, with Ansible's own interpreter.
        "ansible_python_interpreter": str(tools / "python"),
        "out": str(out),
        "role_files": role_files,
        "scheduler_template": str(ROLES / "scheduler/templates/scheduler.toml.j2"),
        "worker_template": str(ROLES / "worker/templates/worker.toml.j2"),
        "keepalived_template": str(ROLES / "keepalived/templates/keepalived.conf.j2"),
        **extra,
    }
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    res = subprocess.run(
        [
            str(tools / "ansible-playbook"),
            "-i",
            str(tmp_path / "hosts.ini"),
            "-e",
            f"@{tmp_path / 'vars.json'}",
            str(tmp_path / "render.yml"),
        ],
        cwd=ANSIBLE_DIR,
        env=tools_env(tools),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    configs: dict[str, dict | str] = {
        p.stem: tomllib.loads(p.read_text()) for p in out.glob("*.toml")
    }
    configs.update({p.name: p.read_text() for p in out.glob("*.keepalived.conf")})
    return configs


def check_schema(tmp_path: Path, config: dict, schema: type) -> None:
    """The rendered config passes the program's own check (files aside)."""
    path = tmp_path / f"{schema.__name__}.toml"
    path.write_text(toml_text(config))
    jobgate_config.load(path, schema, check_files=False)


def toml_text(config: dict) -> str:
    """``config`` (two levels of tables, as jobgate's configs) as TOML."""
    lines = []
    for section, table in config.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            if isinstance(value, dict):
                continue
            lines.append(f"{key} = {json.dumps(value)}")
        for key, value in table.items():
            if isinstance(value, dict):
                lines.append(f"[{section}.{key}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
    return "\n".join(lines) + "\n"


def test_one_scheduler_without_a_database_keeps_sqlite_and_one_address(
    tmp_path: Path,
):
    configs = render_configs(
        tmp_path, (ANSIBLE_DIR / "inventories/lab/hosts.ini").read_text()
    )
    assert configs["scheduler"]["state"] == {"path": "/var/lib/jobgate/scheduler.db"}
    for name in ("worker-1", "worker-2"):
        assert configs[name]["scheduler"] == {"address": "198.18.0.11:7443"}
    check_schema(tmp_path, configs["scheduler"], SchedulerConfig)
    check_schema(tmp_path, configs["worker-1"], WorkerConfig)
    # No database password is made for a cluster without a database.
    assert not list(tmp_path.rglob("*.password"))


def test_several_schedulers_get_the_database_and_workers_every_address(
    tmp_path: Path,
):
    # (Role defaults are loaded above the inventory here: its virtual
    # address is given again.)
    configs = render_configs(
        tmp_path,
        (ANSIBLE_DIR / "inventories/lab/ha.ini").read_text(),
        keepalived_virtual_ip="198.18.0.10/24",
    )
    for name in ("scheduler-1", "scheduler-2"):
        state = configs[name]["state"]
        assert state["url"] == (
            "postgresql://jobgate@198.18.0.13:5432/jobgate"
            "?sslmode=verify-full&sslrootcert=/etc/jobgate/pki/ca.pem"
        )
        assert state["password_file"] == "/etc/jobgate/state-password"
        check_schema(tmp_path, configs[name], SchedulerConfig)
    for name in ("worker-1", "worker-2"):
        assert configs[name]["scheduler"] == {
            "addresses": ["198.18.0.11:7443", "198.18.0.12:7443"]
        }
        check_schema(tmp_path, configs[name], WorkerConfig)
    # One VRRP instance over both, each with a priority of its own, the
    # address held only while GET /readyz answers.
    priorities = set()
    for name in ("scheduler-1", "scheduler-2"):
        conf = configs[f"{name}.keepalived.conf"]
        assert "198.18.0.10/24 dev eth0" in conf
        assert "virtual_router_id 51" in conf
        assert "track_script {\n        jobgate_scheduler_ready\n" in conf
        assert conf.count("{") == conf.count("}")
        priorities.update(re.findall(r"^\s*priority (\d+)$", conf, re.M))
    assert len(priorities) == 2
    # The password was made on the control node, readable by its owner only.
    made = list((tmp_path / "pki").rglob("database-jobgate.password"))
    assert len(made) == 1 and made[0].stat().st_mode & 0o777 == 0o600


def test_an_external_database_url_is_used_as_given(tmp_path: Path):
    url = (
        "postgresql://jobgate@db.example.net:5432/jobgate"
        "?sslmode=verify-full&sslrootcert=/etc/jobgate/pki/database-ca.pem"
    )
    inventory = (
        "[schedulers]\na ansible_host=192.0.2.1\nb ansible_host=192.0.2.2\n"
        "[workers]\nw ansible_host=192.0.2.3\n"
    )
    configs = render_configs(
        tmp_path,
        inventory,
        scheduler_state_url=url,
        scheduler_state_password="a-password-in-a-vault",
    )
    assert configs["a"]["state"]["url"] == url
    assert configs["w"]["scheduler"] == {
        "addresses": ["192.0.2.1:7443", "192.0.2.2:7443"]
    }
    assert not list((tmp_path / "pki").rglob("*.password"))


def test_several_schedulers_on_sqlite_are_refused_before_any_change(
    tmp_path: Path,
):
    tools = need_ansible()
    inventory = tmp_path / "hosts.ini"
    # Addresses of a documentation network: nothing may be contacted.
    inventory.write_text(
        "[schedulers]\nsched-a ansible_host=192.0.2.1\n"
        "sched-b ansible_host=192.0.2.2\n[workers]\nw ansible_host=192.0.2.3\n"
    )
    res = subprocess.run(
        [str(tools / "ansible-playbook"), "-i", str(inventory), "site.yml"],
        cwd=ANSIBLE_DIR,
        env=tools_env(tools),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert (
        "2 schedulers (sched-a, sched-b) must share their state in one PostgreSQL "
        "database, and none is configured"
    ) in " ".join(out.split()), out
    assert "Gathering Facts" not in out and "UNREACHABLE" not in out, out


def inventory_hosts(path: Path) -> list[tuple[str, str]]:
    """(host, ansible_host) of an INI inventory, in its order."""
    hosts = []
    for line in path.read_text().splitlines():
        m = re.match(r"^([a-z0-9-]+)\s+ansible_host=(\S+)", line)
        if m:
            hosts.append((m.group(1), m.group(2)))
    return hosts


@pytest.mark.parametrize("name", sorted(lab_cluster.TOPOLOGIES))
def test_lab_inventories_give_the_nodes_the_lab_addresses(name: str):
    topology = lab_cluster.TOPOLOGIES[name]
    expected = [(n, lab_nodes.node_address(i)) for i, n in enumerate(topology.nodes)]
    assert inventory_hosts(topology.inventory) == expected
    vip = re.findall(
        r"^keepalived_virtual_ip=(\S+)/\d+$", topology.inventory.read_text(), re.M
    )
    assert vip == ([topology.virtual_address] if topology.virtual_address else [])
