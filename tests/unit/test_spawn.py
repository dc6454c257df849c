"""worker.spawn: a job's program started with one exec, set up by the child."""

from __future__ import annotations

import errno
import os
import pwd
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import children, skip_unless_required

from worker import isolation, spawn

# Prints what the tests check about the process it runs in.
REPORT = r"""
echo "pid=$$"
echo "ids=$(id -u) $(id -g)"
echo "cwd=$(pwd)"
for fd in /proc/$$/fd/*; do echo "fd=${fd##*/}"; done
echo "sid=$(cut -d' ' -f6 /proc/$$/stat)"
echo "cgroup=$(grep '^0::' /proc/$$/cgroup | cut -d: -f3)"
echo "env=$(env | grep -c .)"
"""


def start(argv: list[str], **kw) -> spawn.Child:
    """spawn.spawn with defaults: in /, PATH only, no user, no cgroup."""
    kw.setdefault("cwd", "/")
    kw.setdefault("env", {"PATH": "/usr/bin:/bin"})
    kw.setdefault("user", None)
    kw.setdefault("group", None)
    kw.setdefault("cgroup_procs", None)
    return spawn.spawn(argv, **kw)


def status(**kw) -> dict[str, str]:
    """/proc/PID/status of a child that is the spawned program itself."""
    child = start(["/bin/cat", "/proc/self/status"], **kw)
    with child.stdout:
        out = child.stdout.read().decode()
    assert child.wait(timeout=10) == 0
    return {
        k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())
    }


def run(argv, **kw) -> tuple[spawn.Child, dict[str, list[str]]]:
    child = start(argv, **kw)
    with child.stdout:
        out = child.stdout.read().decode()
    child.wait(timeout=10)
    facts: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        facts.setdefault(key, []).append(value)
    return child, facts


def test_the_one_exec_spawner_is_built_and_usable_here():
    # The package build compiles it (setup.py); without it every job costs
    # two more execs. A broken build must not go unnoticed.
    assert spawn.available() == ""


def test_the_child_gets_a_clean_process(tmp_path):
    leaked = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(leaked, True)  # even an inheritable one must not pass
    try:
        child, facts = run(
            ["/bin/bash", "-c", REPORT],
            cwd=str(tmp_path),
            env={"PATH": "/usr/bin:/bin"},
        )
    finally:
        os.close(leaked)
    assert child.returncode == 0
    assert facts["pid"] == [str(child.pid)]
    assert facts["sid"] == [str(child.pid)]  # leads a new session
    assert facts["cwd"] == [str(tmp_path)]
    # 0, 1, 2 and the descriptor the glob itself reads /proc through.
    assert sorted(facts["fd"])[:3] == ["0", "1", "2"] and len(facts["fd"]) == 4
    # PATH, and what bash adds itself (PWD, SHLVL, _).
    assert facts["env"] == ["4"]
    old = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        own = status(user=None, group=None, cgroup_procs=None)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR2])
        signal.signal(signal.SIGUSR1, old)
    # Nothing blocked or ignored, whatever the worker blocks or ignores.
    assert own["SigBlk"] == "0000000000000000"
    assert own["SigIgn"] == "0000000000000000"


def test_stdin_is_dev_null_and_stderr_shares_stdout():
    child, facts = run(
        ["/bin/sh", "-c", 'echo "in=$(readlink /proc/$$/fd/0)"; echo err=1 >&2']
    )
    assert facts == {"in": ["/dev/null"], "err": ["1"]}


@pytest.mark.skipif(os.geteuid() != 0, reason="the child changes ids only as root")
def test_the_child_has_only_the_jobs_ids_and_no_privilege():
    nobody = pwd.getpwnam("nobody")
    child, facts = run(
        [
            "/bin/bash",
            "-c",
            REPORT + "setpriv --reuid=0 true 2>/dev/null && echo root=1",
        ],
        user=nobody.pw_uid,
        group=nobody.pw_gid,
    )
    assert facts["ids"] == [f"{nobody.pw_uid} {nobody.pw_gid}"]
    assert "root" not in facts  # no way back to root
    own = status(user=nobody.pw_uid, group=nobody.pw_gid, cgroup_procs=None)
    ids = f"{nobody.pw_uid}\t{nobody.pw_uid}\t{nobody.pw_uid}\t{nobody.pw_uid}"
    assert own["Uid"] == ids  # real, effective, saved, filesystem
    assert own["Gid"] == ids.replace(str(nobody.pw_uid), str(nobody.pw_gid))
    assert own["Groups"] == ""
    for caps in ("CapPrm", "CapEff", "CapAmb", "CapInh"):
        assert own[caps] == "0000000000000000", caps


@pytest.fixture
def cgroup():
    """A fresh cgroup v2 below this process's own, removed afterwards."""
    mount, own = isolation._cgroup2_mount(), isolation._own_cgroup()
    if mount is None or own is None or os.geteuid() != 0:
        skip_unless_required("no writable cgroup v2 here", "JOBGATE_REQUIRE_CGROUP")
    path = mount / own.lstrip("/") / f"jobgate-spawn-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    yield path
    path.rmdir()


def test_the_child_joins_the_cgroup_before_it_runs(cgroup: Path):
    child, facts = run(
        ["/bin/bash", "-c", REPORT], cgroup_procs=str(cgroup / "cgroup.procs")
    )
    own = isolation._own_cgroup().rstrip("/")
    assert facts["cgroup"] == [f"{own}/{cgroup.name}"]


def test_a_cgroup_that_cannot_be_joined_fails_the_start_and_runs_nothing(
    cgroup: Path, tmp_path
):
    marker = tmp_path / "ran"
    with pytest.raises(OSError) as caught:
        # A file that is not a cgroup.procs: the write fails in the child.
        start(
            ["/bin/sh", "-c", f"touch {marker}"],
            cgroup_procs=str(cgroup / "cgroup.events"),
        )
    assert caught.value.strerror.startswith("joining the job's cgroup: ")
    assert not marker.exists()


def test_a_program_that_cannot_be_executed_raises_what_exec_met(tmp_path):
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho ran\n")
    for path, code in [(tmp_path / "missing", errno.ENOENT), (script, errno.EACCES)]:
        with pytest.raises(OSError) as caught:
            start([str(path)])
        assert caught.value.errno == code
        assert caught.value.filename == os.fsencode(path)
    # The failed children were reaped: no zombie is left of them.
    assert zombie_children() == []


def zombie_children() -> list[int]:
    return [pid for pid, state in children().items() if state == "Z"]


def test_a_working_directory_that_is_missing_fails_the_start(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        start(["/bin/true"], cwd=str(tmp_path / "gone"))
    assert caught.value.strerror == (
        "changing to the working directory: No such file or directory"
    )


def test_arguments_with_nul_are_refused_before_anything_starts():
    with pytest.raises(ValueError):
        start(["/bin/echo", "a\0b"])
    with pytest.raises(ValueError):
        start(["/bin/true"], user=1)


def test_wait_with_a_timeout_and_poll():
    child = start(["/bin/sleep", "0.3"])
    child.stdout.close()
    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.05)
    assert child.wait(timeout=10) == 0
    assert child.poll() == 0
    killed = start(["/bin/sleep", "30"])
    killed.stdout.close()
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL


def test_descriptors_passed_on_survive_the_exec_under_their_numbers(tmp_path):
    kept = os.open(tmp_path, os.O_RDONLY | os.O_CLOEXEC)  # close-on-exec here
    dropped = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(dropped, True)
    try:
        child, facts = run(
            ["/bin/bash", "-c", REPORT + f'echo "kept=$(readlink /proc/$$/fd/{kept})"'],
            pass_fds=(kept,),
        )
    finally:
        os.close(dropped)
    assert facts["kept"] == [str(tmp_path)]
    assert str(dropped) not in facts["fd"]
    # 0, 1, 2, the one the glob reads /proc through, and the one passed on.
    assert str(kept) in facts["fd"] and len(facts["fd"]) == 5
    # The worker's own descriptor is still closed on exec.
    assert not os.get_inheritable(kept)
    os.close(kept)


def test_descriptors_to_pass_on_are_checked_before_anything_starts():
    with pytest.raises(ValueError):
        start(["/bin/true"], pass_fds=(-1,))
    with pytest.raises(ValueError):
        start(["/bin/true"], pass_fds=tuple(range(3, 20)))
    with pytest.raises(OSError) as caught:
        start(["/bin/true"], pass_fds=(999,))  # not open
    assert caught.value.strerror == (
        "keeping the descriptors passed on: Bad file descriptor"
    )
