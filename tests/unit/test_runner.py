"""JobRunner against real processes: spawning, output, followers, stopping, history.

When the tests run as root, jobs run as the configured unprivileged account
(``nobody``), so the scripts live in a world-readable temporary directory.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import skip_unless_required

from jobgate.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from jobgate.jobstate import ExitReason, JobState
from worker import accounts, isolation, linux, process
from worker.config import JobsSection
from worker.kept import keeper_available, read_exit
from worker.limits import Enforcer, Limits
from worker.output import OutputLog
from worker.reactor import Reactor
from worker.records import RecordLog
from worker.runner import SAFE_PATH, JobRunner, ProcessOps

pytestmark = pytest.mark.timeout(60)

# Both ways the runner keeps a job's processes together; "cgroup" is skipped
# where the host has no writable cgroup v2.
MODES = ["process-group", "cgroup"]


class ExecChain(ProcessOps):
    """Starts jobs the way a worker without worker._spawn does."""

    native = False


# Both ways a job's program is started: one exec, or /bin/sh and setpriv.
SPAWNERS = {"one-exec": None, "exec-chain": ExecChain}

SCRIPTS = {
    # Interleaves stdout and stderr, then exits with $1.
    "mixed.sh": 'echo "out 1"\necho "err 1" >&2\necho "out 2"\necho "err 2" >&2\n'
    'exit "${1:-0}"\n',
    "hello.sh": 'for a in "$@"; do echo "arg: $a"; done\n',
    "binary.sh": "printf '\\x00\\x01\\xff\\xfe\\xc3\\x28\\r\\n'\n",
    "env.sh": 'env\necho "uid=$(id -u)"\necho "stdin=$(readlink /proc/self/fd/0)"\n',
    "sleeper.sh": 'echo ready\nsleep "${1:-30}"\n',
    # Sleeps without a word: closing its output pipe does not end it.
    "quiet.sh": 'sleep "${1:-30}"\n',
    "killself.sh": "echo before\nkill -KILL $$\n",
    # gated.sh FIFO N: N lines, wait for a word on FIFO, N more lines with it.
    "gated.sh": 'for ((i = 1; i <= ${2:-1}; i++)); do echo "before $i"; done\n'
    'read -r word < "$1"\n'
    'for ((i = 1; i <= ${2:-1}; i++)); do echo "after $i $word"; done\n',
    # late.sh FIFO FIFO2: nothing until a word comes on FIFO, then one line,
    # then it waits for a word on FIFO2.
    "late.sh": 'read -r word < "$1"\necho "late $word"\nread -r word < "$2"\n',
    # A child that ignores SIGTERM and one that does not, then waits.
    "tree.sh": 'sleep 30 &\necho "child $!"\n'
    'bash -c \'trap "" TERM; echo "stubborn $$"; exec sleep 30\' &\nwait\n',
    # The main process itself ignores SIGTERM.
    "stubborn.sh": "trap '' TERM\necho ready\nsleep 30\n",
    # Exits at once, leaving a child behind that holds the output pipe.
    "leaver.sh": 'sleep 30 &\necho "child $!"\nexit 0\n',
    # $1 lines of 100 bytes, then exits 0 (a SIGPIPE would end it earlier).
    "writer.sh": 'for ((i = 0; i < $1; i++)); do printf "%099d\\n" "$i"; done\n'
    "echo done >&2\n",
    # Keeps a secret in its own temporary directory, then waits.
    "victim.sh": 'echo "secret of $JOBGATE_JOB_ID" > "$TMPDIR/secret"\n'
    'echo "pid $$ tmp $TMPDIR uid $(id -u)"\nsleep "${1:-30}"\n',
    # Tries to harm the job whose pid and temporary directory it is given.
    "attacker.sh": 'kill -KILL "$1" 2>&1; echo "kill: $?"\n'
    'cat "/proc/$1/environ" 2>&1 >/dev/null; echo "environ: $?"\n'
    'cat "$2/secret" 2>&1; echo "secret: $?"\n'
    'ls "$(dirname "$2")" 2>&1; echo "list: $?"\n',
    # Kills every process it may signal, then says whether it survived.
    "killall.sh": 'sleep 30 &\necho "child $!"\nkill -s KILL -1\necho "after"\n',
    # Keeps all of $1 MiB in memory (tail holds a line until it ends).
    "hog.sh": 'head -c "${1}M" /dev/zero | tail\n',
    # Starts $1 sleeping children (run with sh: dash fails a fork at once).
    "forks.sh": "i=0\nwhile [ $i -lt $1 ]; do sleep 10 & i=$((i + 1)); done\n"
    'echo "started $i"\nkill $(jobs -p)\n',
    # Spins a child for $1 s of wall time; prints the CPU time it got.
    "spin.sh": "timeout $1 bash -c 'while :; do :; done'\ntimes\n",
    # A line every 10 ms, $1 times.
    "ticker.sh": 'for ((i = 1; i <= $1; i++)); do echo "tick $i"; sleep 0.01; done\n',
    # Leaves a process in a session of its own that holds the output pipe.
    "escape.sh": "setsid sleep 5 &\npid=$!\n"
    "for ((i = 0; i < 100000; i++)); do\n"
    '  [ "$(cut -d" " -f6 /proc/$pid/stat)" = "$pid" ] && break\n'
    "done\n"
    'echo "escaped $pid"\nexit 0\n',
}


def public_dir(prefix: str) -> Path:
    """A temporary directory the job account can read (tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


@pytest.fixture(scope="module")
def scripts():
    path = public_dir("jobgate-runner-scripts-")
    for name, text in SCRIPTS.items():
        (path / name).write_text(text)
        os.chmod(path / name, 0o644)
    (path / "subdir").mkdir()
    outside = public_dir("jobgate-runner-outside-")
    (outside / "evil.sh").write_text("echo evil\n")
    (path / "escape-link.sh").symlink_to(outside / "evil.sh")
    (path / "inner-link.sh").symlink_to("hello.sh")
    yield path
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(outside, ignore_errors=True)


@pytest.fixture
def fifos():
    """Makes FIFOs a job can block on until the test writes a word into them."""
    directory = public_dir("jobgate-runner-fifo-")

    def make() -> Path:
        path = directory / f"gate-{uuid.uuid4().hex[:8]}"
        os.mkfifo(path)
        os.chmod(path, 0o644)
        return path

    yield make
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def make_runner(scripts, tmp_path):
    runners = []

    def make(ops: ProcessOps | None = None, **settings) -> JobRunner:
        settings.setdefault("stop_grace_s", 2.0)
        settings.setdefault("drain_timeout_s", 1.0)
        state_dir = settings.pop("state_dir", tmp_path / "state")
        cfg = JobsSection(scripts_dir=scripts, state_dir=state_dir, **settings)
        try:
            runner = JobRunner(cfg, worker_name="worker-1", ops=ops)
        except OSError as exc:
            if cfg.isolation == "cgroup" and "cgroup" in str(exc):
                # No delegated cgroup v2 here (CI has one).
                skip_unless_required(str(exc), "JOBGATE_REQUIRE_CGROUP")
            raise
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        runner.shutdown(grace_s=0.2)


def release(fifo: Path, word: str = "go") -> None:
    """Let a job blocked in ``read < fifo`` go on (blocks until it reads)."""
    with open(fifo, "w") as f:
        f.write(word + "\n")


def follow(runner: JobRunner, job_id: str, offset: int = 0) -> bytes:
    chunks = runner.read_output(job_id, offset, follow=True)
    return b"".join(chunk[1] for chunk in chunks)


def run(runner: JobRunner, path: str, *args: str, **kw):
    """Run a job to its end; returns its final record and its output."""
    record, existing = runner.start("bash", path, args, **kw)
    assert not existing
    output = follow(runner, record.job_id)
    return runner.get(record.job_id), output


def wait_for(runner: JobRunner, job_id: str, marker: bytes) -> bytes:
    """Follow the output until ``marker`` appears; returns the output so far."""
    seen = b""
    for chunk in runner.read_output(job_id, follow=True):
        seen += chunk[1]
        if marker in seen:
            return seen
    raise AssertionError(f"the job ended before writing {marker!r}; it wrote {seen!r}")


def in_thread(fn, *args, timeout: float = 10.0):
    """Call ``fn`` in a thread; fail if it does not return within ``timeout``."""
    result = {}

    def target():
        result["value"] = fn(*args)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{fn.__name__} did not return within {timeout}s"
    return result["value"]


def live_group_members(pgid: int) -> list[int]:
    """Pids of processes of group ``pgid`` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def assert_group_gone(pgid: int) -> None:
    # SIGKILL is delivered asynchronously: allow the kernel a moment to finish.
    deadline = time.monotonic() + 2
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert live_group_members(pgid) == []


def running_as_root() -> bool:
    return os.geteuid() == 0


# -- running and output --------------------------------------------------------


def test_output_keeps_stdout_stderr_order_exactly(make_runner, tmp_path):
    runner = make_runner()
    record, output = run(runner, "mixed.sh")
    assert output == b"out 1\nerr 1\nout 2\nerr 2\n"
    assert record.output_bytes == len(output)
    directory = tmp_path / "state" / "jobs" / record.job_id
    log = directory / ("output.data" if runner.ops.kept else "output.log")
    assert log.read_bytes() == output


def test_binary_output_is_kept_byte_for_byte(make_runner):
    _, output = run(make_runner(), "binary.sh")
    assert output == b"\x00\x01\xff\xfe\xc3\x28\r\n"


def test_exit_code_zero_is_succeeded(make_runner):
    record, _ = run(make_runner(), "mixed.sh", "0")
    assert record.state is JobState.SUCCEEDED
    assert record.exit_code == 0
    assert record.signal is None
    assert record.reason == "exited with code 0"
    assert record.ended_at is not None and record.ended_at >= record.started_at


def test_nonzero_exit_code_is_failed_with_reason(make_runner):
    record, _ = run(make_runner(), "mixed.sh", "3")
    assert record.state is JobState.FAILED
    assert record.exit_code == 3
    assert record.reason == "exited with code 3"


def test_job_killed_by_a_signal_is_failed_with_signal_name(make_runner):
    record, output = run(make_runner(), "killself.sh")
    assert output == b"before\n"
    assert record.state is JobState.FAILED
    assert record.signal == signal.SIGKILL
    assert record.exit_code is None
    assert record.exit_reason is ExitReason.KILLED
    assert record.reason == "killed by SIGKILL"


def saved(runner: JobRunner, job_id: str) -> dict | None:
    """The job's record as a restarted worker would read it from disk."""
    return {r["job_id"]: r for r in RecordLog(runner.jobs_dir).load()}.get(job_id)


def test_final_record_is_persisted(make_runner):
    runner = make_runner()
    record, _ = run(runner, "mixed.sh", "2")
    assert saved(runner, record.job_id) == record.to_json()
    assert saved(runner, record.job_id)["state"] == "failed"


def test_a_job_without_output_leaves_no_directory(make_runner):
    # Without a keeper, the worker makes the directory with the first byte.
    runner = make_runner(ops=ExecChain())
    record, output = run(runner, "hello.sh")  # no args: prints nothing
    assert output == b""
    assert record.state is JobState.SUCCEEDED
    assert not (runner.jobs_dir / record.job_id).exists()
    assert sorted(p.name for p in runner.jobs_dir.iterdir()) == ["records.jsonl"]


def keeper_done(runner: JobRunner, job_id: str) -> None:
    """Wait until the job's keeper is done with it: ended (its server reaps
    it), or waiting for another job (``--spare`` again)."""
    pid = runner._job(job_id).proc.keeper_pid
    deadline = time.monotonic() + 10
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return
        if cmdline.rstrip(b"\0") == b"jobgate-keeper\0--spare":
            return
        assert time.monotonic() < deadline, "the keeper did not end"
        time.sleep(0.01)


def test_a_kept_job_leaves_its_output_in_its_directory(make_runner):
    runner = make_runner()
    # The build makes the keeper (setup.py, make): a worker without it is a
    # broken build here, not a host to skip.
    assert runner.ops.kept, keeper_available()
    record, output = run(runner, "mixed.sh", "4")
    assert record.exit_code == 4
    keeper_done(runner, record.job_id)
    # Its end came on the keeper's channel and is recorded: no exit file.
    directory = runner.jobs_dir / record.job_id
    assert sorted(p.name for p in directory.iterdir()) == ["output.data"]
    assert (directory / "output.data").read_bytes() == output


def test_a_kept_job_without_output_leaves_nothing_on_disk_but_its_record(
    make_runner,
):
    # The keeper makes the output file, and the directory, with the first
    # byte: a quiet job costs no inode (each is dear on ext4 without a
    # journal).
    runner = make_runner()
    assert runner.ops.kept, keeper_available()
    record, output = run(runner, "hello.sh")  # no args: prints nothing
    assert output == b""
    assert (record.state, record.output_bytes) == (JobState.SUCCEEDED, 0)
    keeper_done(runner, record.job_id)
    assert not (runner.jobs_dir / record.job_id).exists()
    assert list(runner.read_output(record.job_id)) == []


def test_a_kept_jobs_end_the_worker_could_not_record_goes_to_its_exit_file(
    make_runner, monkeypatch
):
    runner = make_runner()
    write = runner._records.write

    def full_at_the_end(line):
        if line.get("state") != "running":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(line)

    monkeypatch.setattr(runner._records, "write", full_at_the_end)
    record, _ = run(runner, "hello.sh")
    assert record.exit_code == 0
    keeper_done(runner, record.job_id)
    # Unanswered, the keeper wrote the end down itself, for a later run.
    ended = read_exit(str(runner.jobs_dir / record.job_id))
    assert ended is not None and ended.returncode == 0


def test_kept_jobs_start_through_the_keeper_server_and_it_ends_with_the_runner(
    make_runner,
):
    runner = make_runner()
    server = runner.ops.keeper_server()
    assert server is not None
    record, output = run(runner, "mixed.sh", "4")
    assert (record.exit_code, output) == (4, b"out 1\nerr 1\nout 2\nerr 2\n")
    runner.shutdown(grace_s=0.2)
    assert server.closed
    assert not Path(f"/proc/{server.pid}").exists()  # exited, and reaped


def test_a_keeper_server_that_failed_leaves_the_starts_to_an_exec(make_runner):
    runner = make_runner()
    server = runner.ops.keeper_server()
    os.kill(server.pid, signal.SIGKILL)
    # Dead (a zombie, the runner's to reap), so its spare is too.
    deadline = time.monotonic() + 10
    while linux.process_state(server.pid) != "Z":
        assert time.monotonic() < deadline, "the keeper server did not die"
        time.sleep(0.01)
    record, output = run(runner, "mixed.sh", "3")
    assert (record.exit_code, output) == (3, b"out 1\nerr 1\nout 2\nerr 2\n")
    assert runner.ops.keeper_server() is None  # not started again
    record, _ = run(runner, "mixed.sh", "2")
    assert record.exit_code == 2


def test_args_reach_the_script_verbatim(make_runner):
    args = ["a b", "*", "$HOME", "-n", "", "naïve"]
    record, output = run(make_runner(), "hello.sh", *args)
    assert output == "".join(f"arg: {a}\n" for a in args).encode()
    assert record.args == args


@pytest.mark.parametrize("spawner", SPAWNERS)
@pytest.mark.parametrize("mode", MODES)
def test_environment_is_scrubbed_and_stdin_is_dev_null(
    make_runner, monkeypatch, mode, spawner
):
    monkeypatch.setenv("LEAKME", "x")
    ops = SPAWNERS[spawner]
    runner = make_runner(ops=ops and ops(), environment={"EXTRA": "1"}, isolation=mode)
    record, output = run(runner, "env.sh")
    lines = output.decode().splitlines()
    env = dict(line.split("=", 1) for line in lines if "=" in line)
    assert "LEAKME" not in env
    assert env["PATH"] == SAFE_PATH
    assert env["JOBGATE_JOB_ID"] == record.job_id
    assert env["JOBGATE_WORKER"] == "worker-1"
    assert env["EXTRA"] == "1"
    assert env["stdin"] == "/dev/null"
    expected = {"PATH", "HOME", "LANG", "JOBGATE_JOB_ID", "JOBGATE_WORKER", "EXTRA"}
    expected.add("TMPDIR")  # the job's own directory
    if running_as_root():
        # A dynamic id's login shell, as systemd gives its DynamicUser= ids.
        expected |= {"USER", "LOGNAME", "SHELL"}
        assert env["SHELL"] == "/usr/sbin/nologin"
    added_by_bash = {"PWD", "SHLVL", "_"}
    assert set(env) - {"uid", "stdin"} - added_by_bash == expected


@pytest.mark.parametrize("spawner", SPAWNERS)
@pytest.mark.parametrize("mode", MODES)
def test_job_runs_as_the_configured_account(make_runner, mode, spawner):
    needs_root()
    ops = SPAWNERS[spawner]
    runner = make_runner(
        ops=ops and ops(), user_mode="fixed", user="nobody", isolation=mode
    )
    _, output = run(runner, "env.sh")
    assert f"uid={pwd.getpwnam('nobody').pw_uid}\n".encode() in output
    assert b"USER=nobody\n" in output
    assert f"SHELL={pwd.getpwnam('nobody').pw_shell}\n".encode() in output


def test_cgroup_mode_needs_no_setpriv_with_the_one_exec_spawner(
    make_runner, monkeypatch
):
    needs_root()
    monkeypatch.setattr(process.shutil, "which", lambda *a, **kw: None)
    runner = make_runner(user_mode="fixed", user="nobody", isolation="cgroup")
    assert runner.isolation.name == "cgroup"
    _, output = run(runner, "env.sh")
    assert f"uid={pwd.getpwnam('nobody').pw_uid}\n".encode() in output


def test_runner_refuses_to_run_jobs_as_root(scripts, tmp_path):
    needs_root()
    cfg = JobsSection(
        scripts_dir=scripts,
        state_dir=tmp_path / "s",
        user_mode="fixed",
        user="root",
        isolation="process-group",
    )
    with pytest.raises(OSError, match="'root' is root; jobs never run as root"):
        JobRunner(cfg)


def test_runner_refuses_unknown_job_account(scripts, tmp_path):
    needs_root()
    cfg = JobsSection(
        scripts_dir=scripts,
        state_dir=tmp_path / "s",
        user_mode="fixed",
        user="no-such-user",
        isolation="process-group",
    )
    with pytest.raises(OSError, match="no such account 'no-such-user'"):
        JobRunner(cfg)


@pytest.mark.parametrize("mode", MODES)
def test_interpreter_that_cannot_start_fails_the_job(make_runner, mode):
    runner = make_runner(
        interpreters={"broken": "/nonexistent/interpreter"}, isolation=mode
    )
    started, _ = runner.start("broken", "hello.sh")
    record = runner.wait(started.job_id, 10)
    assert record.state is JobState.FAILED
    assert record.exit_reason is ExitReason.START_FAILED
    assert record.reason == (
        "could not execute /nonexistent/interpreter: No such file or directory"
    )
    assert [r.job_id for r in runner.list()] == [record.job_id]
    assert runner.running_count() == 0


# -- refusing requests ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("escape-link.sh", PermissionDenied, "outside the scripts directory"),
        ("subdir/../../x.sh", PermissionDenied, "outside the scripts directory"),
        ("missing.sh", InvalidArgument, "no script 'missing.sh'"),
        ("subdir", InvalidArgument, "path 'subdir' is a directory, not a script"),
        ("", InvalidArgument, "path is required"),
        ("hello.sh\0", InvalidArgument, "must not contain NUL"),
    ],
)
def test_script_path_is_checked(make_runner, path, error, message):
    runner = make_runner()
    with pytest.raises(error, match=message):
        runner.start("bash", path)
    assert runner.list() == []


def test_path_to_an_existing_script_outside_is_refused(make_runner, scripts):
    runner = make_runner()
    evil = (scripts / "escape-link.sh").resolve()
    relative = os.path.relpath(evil, scripts)
    assert relative.startswith("..") and evil.is_file()
    with pytest.raises(PermissionDenied, match="outside the scripts directory"):
        runner.start("bash", relative)


def test_absolute_path_is_refused_even_inside_the_scripts_dir(make_runner, scripts):
    runner = make_runner()
    with pytest.raises(PermissionDenied, match="is absolute"):
        runner.start("bash", str(scripts / "hello.sh"))


def test_symlink_inside_the_scripts_dir_is_followed(make_runner, scripts):
    runner = make_runner()
    assert runner.resolve_script("inner-link.sh") == (scripts / "hello.sh").resolve()
    _, output = run(runner, "inner-link.sh", "x")
    assert output == b"arg: x\n"


def test_command_not_in_interpreters_is_refused(make_runner):
    runner = make_runner()
    with pytest.raises(PermissionDenied) as exc:
        runner.start("python3", "hello.sh")
    assert exc.value.message == (
        "command 'python3' is not allowed on this worker (allowed: bash, sh)"
    )
    assert runner.list() == []


def test_too_many_args_are_refused(make_runner):
    runner = make_runner(max_args=2)
    with pytest.raises(InvalidArgument, match="args has 3 items; this worker allows 2"):
        runner.start("bash", "hello.sh", ["a", "b", "c"])
    assert runner.list() == []


def test_args_larger_than_the_limit_are_refused(make_runner):
    runner = make_runner(max_arg_bytes=10)
    with pytest.raises(InvalidArgument, match="args total 11 bytes"):
        runner.start("bash", "hello.sh", ["12345", "678901"])


def test_arg_with_nul_is_refused(make_runner):
    with pytest.raises(InvalidArgument, match=r"args\[1\] must not contain NUL"):
        make_runner().start("bash", "hello.sh", ["ok", "b\0d"])


@pytest.mark.parametrize(
    ("timeout_s", "message"),
    [
        (-1, "timeout_s must be 0"),
        (11, "timeout_s 11 is above this worker's maximum 10"),
    ],
)
def test_bad_timeout_is_refused(make_runner, timeout_s, message):
    runner = make_runner(max_timeout_s=10)
    with pytest.raises(InvalidArgument, match=message):
        runner.start("bash", "hello.sh", timeout_s=timeout_s)


def test_max_concurrent_refuses_another_job_until_one_ends(make_runner):
    runner = make_runner(max_concurrent=1)
    first, _ = runner.start("bash", "sleeper.sh")
    with pytest.raises(ResourceExhausted, match=r"\[jobs\].max_concurrent"):
        runner.start("bash", "hello.sh")
    assert runner.running_count() == 1
    runner.stop(first.job_id, grace_s=0.5)
    assert runner.running_count() == 0
    second, existing = runner.start("bash", "hello.sh")
    assert not existing and second.job_id != first.job_id


def test_unknown_job_is_not_found(make_runner):
    runner = make_runner()
    with pytest.raises(NotFound):
        runner.get("nope")
    with pytest.raises(NotFound):
        runner.stop("nope")
    with pytest.raises(NotFound):
        list(runner.read_output("nope"))


def test_negative_offset_is_refused(make_runner):
    runner = make_runner()
    record, _ = run(runner, "hello.sh")
    with pytest.raises(InvalidArgument, match="offset must not be negative"):
        list(runner.read_output(record.job_id, -1))


# -- idempotency ---------------------------------------------------------------


def test_idempotency_key_returns_the_same_job(make_runner):
    runner = make_runner()
    first, existing = runner.start("bash", "hello.sh", ["1"], idempotency_key="k-1")
    assert not existing
    again, existing = runner.start("bash", "hello.sh", ["1"], idempotency_key="k-1")
    assert existing
    assert again.job_id == first.job_id
    assert [r.job_id for r in runner.list()] == [first.job_id]
    other, existing = runner.start("bash", "hello.sh", ["1"], idempotency_key="k-2")
    assert not existing and other.job_id != first.job_id


def test_idempotency_key_survives_a_restart(make_runner):
    runner = make_runner()
    first, _ = run(runner, "hello.sh", idempotency_key="retry-me")
    reloaded = make_runner()
    again, existing = reloaded.start("bash", "hello.sh", idempotency_key="retry-me")
    assert existing
    assert again.job_id == first.job_id
    assert again.state is JobState.SUCCEEDED


def test_overlong_idempotency_key_is_refused(make_runner):
    with pytest.raises(InvalidArgument, match="longer than 256"):
        make_runner().start("bash", "hello.sh", idempotency_key="k" * 257)


# -- following output ----------------------------------------------------------


def test_many_concurrent_followers_get_identical_full_output(make_runner, fifos):
    runner = make_runner(read_chunk_bytes=512)
    gate = fifos()
    n = 300
    record, _ = runner.start("bash", "gated.sh", [str(gate), str(n)])
    before = "".join(f"before {i}\n" for i in range(1, n + 1)).encode()
    after = "".join(f"after {i} go\n" for i in range(1, n + 1)).encode()
    followers = 20
    results: list[list[tuple[int, bytes, int]]] = [[] for _ in range(followers)]
    saw_first_half = [threading.Event() for _ in range(followers)]

    def follower(i: int) -> None:
        size = 0
        for chunk in runner.read_output(record.job_id, follow=True):
            results[i].append(chunk)
            size += len(chunk[1])
            if size >= len(before):
                saw_first_half[i].set()

    threads = [threading.Thread(target=follower, args=(i,)) for i in range(followers)]
    for t in threads:
        t.start()
    for event in saw_first_half:
        assert event.wait(10), "a follower did not receive the first half"
    release(gate)  # the rest is written while every follower is waiting for it
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a follower did not end when the job ended"
    for chunks in results:
        assert b"".join(data for _, data, _ in chunks) == before + after
        offsets = [offset for offset, _, _ in chunks]
        sizes = [len(data) for _, data, _ in chunks]
        assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]
        assert max(sizes) <= 512
        assert all(skipped == 0 for _, _, skipped in chunks)
    assert runner.get(record.job_id).state is JobState.SUCCEEDED


def test_follower_from_an_offset_gets_the_rest(make_runner, fifos):
    runner = make_runner()
    gate = fifos()
    record, _ = runner.start("bash", "gated.sh", [str(gate), "2"])
    wait_for(runner, record.job_id, b"before 2\n")
    result = {}
    late = threading.Thread(
        target=lambda: result.setdefault("data", follow(runner, record.job_id, 3))
    )
    late.start()
    release(gate, "now")
    late.join(10)
    assert not late.is_alive()
    full = b"before 1\nbefore 2\nafter 1 now\nafter 2 now\n"
    assert result["data"] == full[3:]
    assert follow(runner, record.job_id, 12) == full[12:]
    assert follow(runner, record.job_id, len(full) + 100) == b""


def test_follow_ends_when_the_job_ends(make_runner, fifos):
    runner = make_runner()
    gate = fifos()
    record, _ = runner.start("bash", "gated.sh", [str(gate)])
    wait_for(runner, record.job_id, b"before 1\n")
    result = {}
    follower = threading.Thread(
        target=lambda: result.setdefault("data", follow(runner, record.job_id))
    )
    follower.start()
    release(gate)
    follower.join(10)
    assert not follower.is_alive(), "follow did not return after the job ended"
    assert result["data"] == b"before 1\nafter 1 go\n"
    assert runner.get(record.job_id).state is JobState.SUCCEEDED


def test_a_follower_of_a_quiet_job_hears_its_first_byte(make_runner, fifos):
    # A kept job's directory is made with its first byte: until then the
    # worker hears of it through the jobs' directory.
    runner = make_runner()
    gate, end = fifos(), fifos()
    record, _ = runner.start("bash", "late.sh", [str(gate), str(end)])
    assert not (runner.jobs_dir / record.job_id).exists()
    got = threading.Event()

    def first_chunk() -> None:
        for _, data, _ in runner.read_output(record.job_id, follow=True):
            if data:
                got.set()
                return

    follower = threading.Thread(target=first_chunk)
    follower.start()
    time.sleep(0.2)  # the follower waits on the job's condition by now
    release(gate)
    # It runs on: only the making of its directory can have told.
    assert got.wait(10), "the follower never heard of the output"
    follower.join(10)
    assert runner.get(record.job_id).state is JobState.RUNNING
    release(end)
    assert follow(runner, record.job_id) == b"late go\n"
    assert runner.get(record.job_id).state is JobState.SUCCEEDED


def test_read_without_follow_returns_what_exists_of_a_running_job(make_runner, fifos):
    runner = make_runner()
    gate = fifos()
    record, _ = runner.start("bash", "gated.sh", [str(gate), "3"])
    wait_for(runner, record.job_id, b"before 3\n")

    def read_now() -> bytes:
        chunks = runner.read_output(record.job_id, follow=False)
        return b"".join(chunk[1] for chunk in chunks)

    assert in_thread(read_now) == b"before 1\nbefore 2\nbefore 3\n"
    assert runner.get(record.job_id).state is JobState.RUNNING
    release(gate)
    assert follow(runner, record.job_id).endswith(b"after 3 go\n")


def test_cancelled_follower_returns_when_woken(make_runner):
    runner = make_runner()
    record, _ = runner.start("bash", "sleeper.sh")
    wait_for(runner, record.job_id, b"ready\n")
    cancel = threading.Event()
    seen = []
    follower = threading.Thread(
        target=lambda: seen.extend(
            runner.read_output(record.job_id, follow=True, cancelled=cancel.is_set)
        )
    )
    follower.start()
    cancel.set()
    runner.wake(record.job_id)
    follower.join(10)
    assert not follower.is_alive(), "a cancelled follower kept waiting"
    assert runner.get(record.job_id).state is JobState.RUNNING
    runner.stop(record.job_id, grace_s=0.5)


# -- stopping and timeouts -----------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_stop_kills_whole_process_group(make_runner, mode):
    runner = make_runner(stop_grace_s=20, isolation=mode)
    record, _ = runner.start("bash", "tree.sh")
    output = wait_for(runner, record.job_id, b"stubborn")
    children = [int(line.split()[1]) for line in output.decode().splitlines()]
    assert set(children) <= set(live_group_members(record.pid))
    started = time.monotonic()
    final = runner.stop(record.job_id, requested_by="ops")
    # The main process dies of SIGTERM; what it left (even a child that ignores
    # SIGTERM) is killed at once rather than after the grace period.
    assert time.monotonic() - started < 10
    assert final.state is JobState.STOPPED
    assert final.exit_reason is ExitReason.STOPPED
    assert final.signal == signal.SIGTERM
    assert final.reason == "stopped on request by ops"
    assert final.stopped_by == "ops"
    assert_group_gone(record.pid)


@pytest.mark.parametrize("mode", MODES)
def test_stop_sigkills_a_job_that_ignores_sigterm_after_grace(make_runner, mode):
    runner = make_runner(stop_grace_s=30, isolation=mode)
    record, _ = runner.start("bash", "stubborn.sh")
    wait_for(runner, record.job_id, b"ready\n")
    started = time.monotonic()
    final = runner.stop(record.job_id, grace_s=0.3)
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 10
    assert final.state is JobState.STOPPED
    assert final.signal == signal.SIGKILL
    assert final.reason == "stopped on request by an unnamed client"
    assert_group_gone(record.pid)


def test_stop_of_an_ended_job_returns_its_record_unchanged(make_runner):
    runner = make_runner()
    record, _ = run(runner, "mixed.sh", "4")
    assert runner.stop(record.job_id) == record


def test_negative_grace_is_refused(make_runner):
    runner = make_runner()
    record, _ = run(runner, "hello.sh")
    with pytest.raises(InvalidArgument, match="grace_s must not be negative"):
        runner.stop(record.job_id, grace_s=-1)


@pytest.mark.parametrize("mode", MODES)
def test_job_past_its_default_timeout_is_timed_out(make_runner, mode):
    runner = make_runner(default_timeout_s=1, stop_grace_s=1, isolation=mode)
    started = time.monotonic()
    record, output = run(runner, "sleeper.sh", "30")
    assert time.monotonic() - started >= 1
    assert output == b"ready\n"
    assert record.timeout_s == 1
    assert record.state is JobState.TIMED_OUT
    assert record.exit_reason is ExitReason.TIMED_OUT
    assert record.signal == signal.SIGTERM
    assert record.reason == "ran longer than its timeout of 1s"
    assert_group_gone(record.pid)


def test_job_within_its_timeout_succeeds(make_runner):
    record, _ = run(make_runner(), "mixed.sh", timeout_s=5)
    assert record.timeout_s == 5
    assert record.state is JobState.SUCCEEDED


def test_job_that_exited_in_time_is_not_timed_out_while_draining(make_runner):
    # The job exits at once with code 0 but leaves a process in a session of
    # its own holding the output pipe (possible with process groups), so the
    # runner drains for drain_timeout_s, longer than the timeout: the job
    # still ended in time.
    runner = make_runner(drain_timeout_s=1.5, isolation="process-group")
    record, output = run(runner, "escape.sh", timeout_s=1)
    escaped = int(output.split()[-1])
    try:
        assert record.exit_code == 0
        assert record.state is JobState.SUCCEEDED
        assert record.reason == "exited with code 0"
    finally:
        try:
            os.kill(escaped, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(
    "spawner, reason",
    [
        ("one-exec", "could not start the job: joining the job's cgroup: "),
        ("exec-chain", "could not move the job into its cgroup"),
    ],
)
def test_a_job_that_cannot_join_its_cgroup_never_runs(
    make_runner, monkeypatch, spawner, reason
):
    ops = SPAWNERS[spawner]
    runner = make_runner(ops=ops and ops(), isolation="cgroup")
    made = []

    def prepare(job_id: str) -> str:
        procs = Path(real(job_id))
        made.append(procs.parent)
        return str(procs.parent / "cgroup.events")  # not writable: cannot join

    real = runner.isolation.prepare
    monkeypatch.setattr(runner.isolation, "prepare", prepare)
    record, _ = runner.start("bash", "env.sh")
    final = runner.wait(record.job_id, 10)
    assert final.state is JobState.FAILED
    assert final.exit_reason is ExitReason.START_FAILED
    assert final.reason.startswith(reason)
    assert b"uid=" not in follow(runner, record.job_id)  # env.sh never ran
    deadline = time.monotonic() + 5
    while made[0].exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not made[0].exists()  # its cgroup is removed


@pytest.mark.parametrize("spawner", SPAWNERS)
def test_cgroup_ends_processes_that_left_the_session(make_runner, spawner):
    ops = SPAWNERS[spawner]
    runner = make_runner(ops=ops and ops(), drain_timeout_s=5, isolation="cgroup")
    started = time.monotonic()
    record, output = run(runner, "escape.sh")
    escaped = int(output.split()[-1])
    assert record.state is JobState.SUCCEEDED
    assert time.monotonic() - started < 4  # no wait for a pipe held open
    deadline = time.monotonic() + 2
    while process_alive(escaped) and time.monotonic() < deadline:
        time.sleep(0.01)  # SIGKILL is delivered asynchronously
    assert not process_alive(escaped)


def test_shutdown_stops_every_running_job(make_runner):
    runner = make_runner()
    a, _ = runner.start("bash", "sleeper.sh")
    b, _ = runner.start("bash", "sleeper.sh")
    runner.shutdown(grace_s=0.5)
    for job in (a, b):
        final = runner.get(job.job_id)
        assert final.state is JobState.STOPPED
        assert final.reason == "stopped because the worker shut down"
        assert final.stopped_by == "the worker (shutdown)"
        assert_group_gone(job.pid)
    assert runner.running_count() == 0


# -- history -------------------------------------------------------------------


def test_new_runner_reports_earlier_jobs(make_runner):
    first = make_runner()
    ok, ok_output = run(first, "mixed.sh", "0")
    bad, _ = run(first, "mixed.sh", "5")
    reloaded = make_runner()
    assert reloaded.get(ok.job_id) == ok
    assert reloaded.get(bad.job_id) == bad
    assert [r.job_id for r in reloaded.list()] == [bad.job_id, ok.job_id]
    assert follow(reloaded, ok.job_id) == ok_output
    assert reloaded.running_count() == 0


def test_jobs_removed_by_retention_stay_removed_after_a_restart(make_runner):
    first = make_runner(retention_max_jobs=1, retention_interval_s=3600)
    old, _ = run(first, "mixed.sh", "0")
    new, _ = run(first, "mixed.sh", "0")
    assert first.enforce_retention() == [old.job_id]
    assert not (first.jobs_dir / old.job_id).exists()
    reloaded = make_runner(retention_max_jobs=1, retention_interval_s=3600)
    assert [r.job_id for r in reloaded.list()] == [new.job_id]
    with pytest.raises(NotFound):
        reloaded.get(old.job_id)


def test_records_of_the_job_json_layout_are_taken_over(make_runner):
    first = make_runner()
    ended, output = run(first, "mixed.sh", "0")
    first.shutdown(0.2)
    jobs = first.jobs_dir
    (jobs / "records.jsonl").unlink()
    # The layout before the record file: a job.json beside each job's output.
    (jobs / ended.job_id / "job.json").write_text(json.dumps(ended.to_json()))
    running_id = str(uuid.uuid4())
    start = dict(ended.to_json(), job_id=running_id, state="running", ended_at=None)
    (jobs / running_id).mkdir()
    (jobs / running_id / "job.json").write_text(json.dumps(start))
    (jobs / "garbage").mkdir()
    (jobs / "garbage" / "job.json").write_text("{not json")

    reloaded = make_runner()
    assert reloaded.get(ended.job_id) == ended
    assert follow(reloaded, ended.job_id) == output
    assert reloaded.get(running_id).state is JobState.LOST
    assert saved(reloaded, running_id)["state"] == "lost"
    assert saved(reloaded, ended.job_id) == ended.to_json()
    # Taken over, their files are gone; what could not be read is left alone.
    assert list(jobs.glob("*/job.json")) == [jobs / "garbage" / "job.json"]


def test_job_left_running_by_a_previous_worker_is_lost(make_runner, tmp_path):
    first = make_runner()
    record, output = run(first, "mixed.sh", "0")
    first.shutdown(0.2)
    # Make it look as if the worker died while the job ran: its start is the
    # last line of it, and a crash cut the line after that short.
    start = dict(
        record.to_json(),
        state="running",
        exit_code=None,
        ended_at=None,
        exit_reason=None,
        reason="",
        output_bytes=0,
    )
    records = first.jobs_dir / "records.jsonl"
    with records.open("a") as f:
        f.write(json.dumps(start) + '\n{"job_id": "cut sh')
    # The dead worker last stamped its state directory as alive 42 s after
    # the job started.
    last_alive = record.started_at + 42
    os.utime(first.cfg.state_dir / "alive", (last_alive, last_alive))

    reloaded = make_runner()
    lost = reloaded.get(record.job_id)
    assert lost.state is JobState.LOST
    assert lost.reason == (
        "the worker stopped while the job was running; ended_at is the last "
        "time the worker knew it running"
    )
    assert lost.pid == record.pid != 0
    assert lost.ended_at == pytest.approx(last_alive)
    assert lost.output_bytes == len(output)
    assert saved(reloaded, record.job_id)["state"] == "lost"
    assert records.read_bytes().endswith(b"\n")  # the cut line is gone
    assert in_thread(follow, reloaded, record.job_id) == output
    assert [r.job_id for r in reloaded.list()] == [record.job_id]
    assert reloaded.running_count() == 0


def test_job_lost_before_its_process_was_known_has_no_end_time(make_runner):
    first = make_runner()
    record, _ = run(first, "hello.sh")
    first.shutdown(0.2)
    # The worker died between recording the job and spawning it.
    start = dict(record.to_json(), state="running", pid=0, exit_code=None)
    start.update(ended_at=None, exit_reason=None, reason="")
    with (first.jobs_dir / "records.jsonl").open("a") as f:
        f.write(json.dumps(start) + "\n")
    lost = make_runner().get(record.job_id)
    assert lost.state is JobState.LOST
    assert lost.ended_at is None
    assert "whether and when it ran is not known" in lost.reason


# -- the reactor ---------------------------------------------------------------


class GatedExit(ExecChain):
    """Reports a job's exit only when the test says so (a pipe, not a pidfd).

    The worker is then the parent of the job's main process (no keeper), so
    the tests below can see it a zombie until its exit is reported.
    """

    def __init__(self):
        self.gates: dict[int, int] = {}

    def exit_fd(self, pid: int) -> int:
        r, w = os.pipe()
        self.gates[pid] = w
        return r

    def open(self, pid: int) -> None:
        os.write(self.gates.pop(pid), b"x")


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_job_ends_when_its_exit_is_reported_killing_what_it_left(make_runner):
    ops = GatedExit()
    runner = make_runner(ops=ops, isolation="process-group")
    record, _ = runner.start("bash", "leaver.sh")
    output = wait_for(runner, record.job_id, b"child")
    child = int(output.split()[-1])
    deadline = time.monotonic() + 5
    while process_state(record.pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    # The main process exited and is not reaped; until its exit is reported
    # the job runs, and what it left runs too.
    assert process_state(record.pid) == "Z"
    assert runner.get(record.job_id).state is JobState.RUNNING
    assert process_alive(child)
    ops.open(record.pid)
    final = runner.wait(record.job_id, 10)
    assert final.state is JobState.SUCCEEDED
    assert final.exit_code == 0
    deadline = time.monotonic() + 2
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)  # SIGKILL is delivered asynchronously
    assert not process_alive(child)
    assert not Path(f"/proc/{record.pid}").exists()  # reaped


def test_an_error_while_watching_a_job_ends_it_as_lost(make_runner, monkeypatch):
    runner = make_runner(isolation="process-group")
    real_kill_all = runner.isolation.kill_all
    calls = []

    def failing_kill_all(job_id, pgid):
        calls.append(job_id)
        if len(calls) == 1:
            raise OSError("simulated failure")
        real_kill_all(job_id, pgid)

    monkeypatch.setattr(runner.isolation, "kill_all", failing_kill_all)
    record, _ = runner.start("bash", "mixed.sh")
    final = runner.wait(record.job_id, 10)
    assert final.state is JobState.LOST
    assert final.exit_reason is ExitReason.LOST
    assert "the worker lost track of the job: simulated failure" in final.reason
    assert runner.running_count() == 0
    # The reactor goes on watching the jobs that come after.
    again, output = run(runner, "mixed.sh")
    assert again.state is JobState.SUCCEEDED
    assert output == b"out 1\nerr 1\nout 2\nerr 2\n"


def test_many_jobs_share_one_thread(make_runner):
    runner = make_runner(max_concurrent=100)
    tasks = len(os.listdir("/proc/self/task"))
    ids = [runner.start("bash", "ticker.sh", ["30"])[0].job_id for _ in range(40)]
    assert len(os.listdir("/proc/self/task")) <= tasks + 1
    expected = "".join(f"tick {i}\n" for i in range(1, 31)).encode()
    for job_id in ids:
        assert follow(runner, job_id) == expected
        assert runner.get(job_id).state is JobState.SUCCEEDED
    assert runner.running_count() == 0


def test_timeout_of_a_job_that_ended_leaves_no_timer_behind(make_runner):
    runner = make_runner()
    for _ in range(3):
        run(runner, "hello.sh", timeout_s=3600)
    timers = runner._reactor._timers
    assert all(entry[2].cancelled for entry in timers)


def test_reactor_runs_calls_and_timers_in_order_and_survives_errors():
    reactor = Reactor()
    try:
        seen = []
        done = threading.Event()

        def boom():
            raise RuntimeError("a failing callback")

        reactor.call_later(0.05, lambda: (seen.append("late"), done.set()))
        reactor.call_later(0.02, seen.append, "early")
        cancelled = reactor.call_later(0.01, seen.append, "cancelled")
        cancelled.cancel()
        reactor.call_soon(boom)
        reactor.call_soon(seen.append, "soon")
        assert done.wait(5)
        assert seen == ["soon", "early", "late"]
    finally:
        reactor.close()


def test_reactor_drops_cancelled_timers_in_bulk():
    reactor = Reactor()
    try:
        timers = [reactor.call_later(3600, lambda: None) for _ in range(500)]
        for t in timers:
            t.cancel()
        fired = threading.Event()
        reactor.call_later(0, fired.set)
        assert fired.wait(5)
        deadline = time.monotonic() + 5
        while len(reactor._timers) > 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(reactor._timers) <= 100
    finally:
        reactor.close()


# -- a job always ends, whatever fails -------------------------------------------


class NoExitFd(ExecChain):
    """The host is out of descriptors when the job's exit is to be watched
    (the worker the parent of the job's main process, as in GatedExit)."""

    def __init__(self):
        self.spawned: list[int] = []

    def spawn(self, argv, **kw):
        proc = super().spawn(argv, **kw)
        self.spawned.append(proc.pid)
        return proc

    def exit_fd(self, pid: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def disk_full(runner: JobRunner, monkeypatch, when: str) -> None:
    """Make writing a job's first record fail (``"new"``), or its last ("end")."""
    real = runner._records.write

    def write(record):
        if (record["state"] == "running") == (when == "new"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(record)

    monkeypatch.setattr(runner._records, "write", write)


def assert_ended(runner: JobRunner, record, key: str) -> None:
    """The job has ended everywhere: waits, stops, counts, its key."""
    final = in_thread(runner.stop, record.job_id, timeout=5)
    assert final.state is JobState.FAILED
    assert final.exit_reason is ExitReason.START_FAILED
    assert runner.running_count() == 0
    assert in_thread(follow, runner, record.job_id, timeout=5) == b""
    again, existing = runner.start("bash", "hello.sh", idempotency_key=key)
    assert existing
    assert again.job_id == record.job_id
    assert again.state is JobState.FAILED


@pytest.mark.parametrize("records", ["kept", "disk full"])
def test_a_job_that_cannot_be_watched_is_killed_and_ends(
    make_runner, monkeypatch, records
):
    ops = NoExitFd()
    runner = make_runner(ops=ops, isolation="process-group")
    if records == "disk full":
        disk_full(runner, monkeypatch, "end")
    record, existing = runner.start("bash", "sleeper.sh", idempotency_key="k")
    assert not existing
    assert record.state is JobState.FAILED
    assert record.reason == "the worker could not watch the job: Too many open files"
    assert_ended(runner, record, "k")
    pid = ops.spawned[-1]
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped
    state = saved(runner, record.job_id)["state"]
    assert state == ("failed" if records == "kept" else "running")
    in_thread(runner.shutdown, 0.2, timeout=10)


def test_a_job_that_cannot_be_recorded_never_runs_and_ends(make_runner, monkeypatch):
    ops = NoExitFd()
    runner = make_runner(ops=ops)
    disk_full(runner, monkeypatch, "new")
    record, _ = runner.start("bash", "sleeper.sh", idempotency_key="k")
    assert record.state is JobState.FAILED
    assert record.reason == "could not record the job: No space left on device"
    assert ops.spawned == []
    assert_ended(runner, record, "k")
    in_thread(runner.shutdown, 0.2, timeout=10)


def test_a_job_that_cannot_spawn_ends_even_if_its_end_cannot_be_recorded(
    make_runner, monkeypatch
):
    runner = make_runner(interpreters={"bash": "/nonexistent/interpreter"})
    disk_full(runner, monkeypatch, "end")
    record, _ = runner.start("bash", "hello.sh", idempotency_key="k")
    assert record.reason == (
        "could not execute /nonexistent/interpreter: No such file or directory"
    )
    assert_ended(runner, record, "k")


def test_killing_a_job_that_cannot_be_watched_holds_no_lock(make_runner, monkeypatch):
    runner = make_runner(ops=NoExitFd(), isolation="process-group")
    other, _ = runner.start("bash", "hello.sh")  # NoExitFd: ends at once
    gate = threading.Event()
    entered = threading.Event()
    real_kill_all = runner.isolation.kill_all

    def slow_kill_all(job_id, pgid):
        entered.set()
        gate.wait(10)
        real_kill_all(job_id, pgid)

    monkeypatch.setattr(runner.isolation, "kill_all", slow_kill_all)
    starter = threading.Thread(target=runner.start, args=("bash", "sleeper.sh"))
    starter.start()
    try:
        assert entered.wait(10)
        # Other requests go on while the job is killed.
        assert runner.responsive(timeout=2)
        assert in_thread(runner.get, other.job_id, timeout=2).job_id == other.job_id
        assert len(in_thread(runner.list, timeout=2)) == 2
    finally:
        gate.set()
        starter.join(10)
    assert runner.running_count() == 0


def test_job_record_exists_when_start_returns_and_survives_a_crash(make_runner):
    # process-group: a second runner on the same state would otherwise remove
    # the first one's cgroups as left over from an earlier run. Without a
    # keeper: a kept job would be adopted by the second runner
    # (tests/integration/test_faults.py).
    runner = make_runner(ops=ExecChain(), isolation="process-group")
    gate = threading.Event()
    runner._reactor.call_soon(gate.wait, 10)  # the reactor is busy
    try:
        record, _ = runner.start("bash", "hello.sh", idempotency_key="once")
        first = saved(runner, record.job_id)
        assert first["state"] == "running"
        assert first["idempotency_key"] == "once"
        # The worker dies now; its next run knows the job and its key.
        restarted = make_runner(ops=ExecChain(), isolation="process-group")
        lost = restarted.get(record.job_id)
        assert lost.state is JobState.LOST
        again, existing = restarted.start("bash", "hello.sh", idempotency_key="once")
        assert existing
        assert again.job_id == record.job_id
    finally:
        gate.set()
    assert runner.wait(record.job_id, 10).state is JobState.SUCCEEDED


def test_a_job_that_fails_to_spawn_is_recorded_as_start_failed(make_runner):
    runner = make_runner(interpreters={"broken": "/nonexistent/interpreter"})
    record, _ = runner.start("broken", "hello.sh")
    on_disk = saved(runner, record.job_id)
    assert on_disk["state"] == "failed"
    assert on_disk["exit_reason"] == ExitReason.START_FAILED.value
    reloaded = make_runner(interpreters={"broken": "/nonexistent/interpreter"})
    assert reloaded.get(record.job_id).exit_reason is ExitReason.START_FAILED


# -- jobs walled off from each other -------------------------------------------------


def needs_root() -> None:
    if not running_as_root():
        skip_unless_required("jobs change user only as root", "JOBGATE_REQUIRE_ROOT")


def victim(runner: JobRunner) -> tuple[str, int, str, int]:
    """Start victim.sh; returns its job id, pid, temporary directory and uid."""
    record, _ = runner.start("bash", "victim.sh")
    words = wait_for(runner, record.job_id, b"uid ").split()
    return record.job_id, int(words[1]), words[3].decode(), int(words[5])


@pytest.mark.parametrize("spawner", SPAWNERS)
@pytest.mark.parametrize("mode", MODES)
def test_a_job_cannot_kill_read_or_list_another_job(make_runner, mode, spawner):
    needs_root()
    ops = SPAWNERS[spawner]
    runner = make_runner(ops=ops and ops(), isolation=mode)
    job_id, pid, tmp, uid = victim(runner)
    assert runner.cfg.uid_min <= uid <= runner.cfg.uid_max
    record, output = run(runner, "attacker.sh", str(pid), tmp)
    text = output.decode()
    assert "Operation not permitted" in text and "kill: 1" in text
    assert "environ: 1" in text
    assert "secret of" not in text and "secret: 1" in text
    assert "list: 2" in text  # its parent lists nothing but to the worker
    assert process_alive(pid)
    assert runner.get(job_id).state is JobState.RUNNING
    final = runner.stop(job_id, 0.5)
    assert final.state is JobState.STOPPED


@pytest.mark.parametrize("user_mode", ["dynamic", "fixed"])
def test_kill_minus_one_in_a_job_kills_only_that_job(make_runner, user_mode):
    needs_root()
    runner = make_runner(user_mode=user_mode, user="nobody")
    job_id, pid, _, _ = victim(runner)
    record, output = run(runner, "killall.sh")
    child = int(output.split()[1])
    assert b"after\n" in output  # kill -1 spares the caller
    assert not process_alive(child)
    if user_mode == "dynamic":
        assert process_alive(pid)
        assert runner.get(job_id).state is JobState.RUNNING
        runner.stop(job_id, 0.5)
    else:
        # The trade-off of one account for all jobs: they can end each other.
        final = runner.wait(job_id, 10)
        assert (final.state, final.signal) == (JobState.FAILED, signal.SIGKILL)


def wait_returned(runner: JobRunner) -> None:
    deadline = time.monotonic() + 10
    while runner.accounts.held and time.monotonic() < deadline:
        time.sleep(0.02)
    assert runner.accounts.held == 0


def test_each_job_has_its_own_user_id_returned_once_its_processes_are_gone(
    make_runner,
):
    needs_root()
    # process-group: a process in a session of its own escapes the job's
    # group; it is found by its user id when the id is returned.
    runner = make_runner(isolation="process-group")
    first, _, first_tmp, first_uid = victim(runner)
    second, _, second_tmp, second_uid = victim(runner)
    assert first_uid != second_uid
    assert runner.accounts.held == 2
    assert (os.stat(first_tmp).st_uid, os.stat(first_tmp).st_mode & 0o777) == (
        first_uid,
        0o700,
    )
    runner.stop(first, 0.5)
    runner.stop(second, 0.5)
    record, output = run(runner, "escape.sh")
    escaped = int(output.split()[1])
    assert record.state is JobState.SUCCEEDED
    wait_returned(runner)
    deadline = time.monotonic() + 2
    while process_alive(escaped) and time.monotonic() < deadline:
        time.sleep(0.01)  # SIGKILL is delivered asynchronously
    assert not process_alive(escaped)
    assert not Path(first_tmp).exists() and not Path(second_tmp).exists()


@pytest.mark.parametrize("user_mode", ["dynamic", "fixed"])
def test_a_worker_that_may_not_give_jobs_a_directory_says_so(
    make_runner, monkeypatch, user_mode
):
    """As under the packaged unit, whose capabilities leave out CAP_CHOWN."""
    needs_root()

    def chown(path, uid, gid):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(accounts.os, "chown", chown)
    if user_mode == "dynamic":
        with pytest.raises(OSError, match=r"needs the capability .*\(CAP_CHOWN\)"):
            make_runner()
        return
    runner = make_runner(user_mode="fixed", user="nobody")
    record, output = run(runner, "env.sh")
    assert record.state is JobState.SUCCEEDED
    assert b"TMPDIR=" not in output
    assert f"uid={pwd.getpwnam('nobody').pw_uid}\n".encode() in output


def test_user_ids_taken_by_another_worker_on_the_host_are_not_handed_out(
    make_runner, tmp_path
):
    needs_root()
    ids = {"uid_min": 64000, "uid_max": 64001, "max_concurrent": 2}
    other = make_runner(
        state_dir=tmp_path / "other", uid_min=64000, uid_max=64000, max_concurrent=1
    )
    _, _, _, taken = victim(other)
    runner = make_runner(**ids)
    _, _, _, uid = victim(runner)
    assert (taken, uid) == (64000, 64001)
    with pytest.raises(ResourceExhausted, match=r"uid_min-uid_max \(64000-64001\)"):
        runner.start("bash", "hello.sh")


# -- limits ---------------------------------------------------------------------------


def limited_runner(make_runner, *names: str, ops=None, **settings) -> JobRunner:
    runner = make_runner(ops=ops, **settings)
    missing = [n for n in names if not runner.enforcer.how(n)]
    if missing:
        skip_unless_required(
            f"this host cannot enforce {missing}: "
            + "; ".join(runner.enforcer.why_not(n) for n in missing),
            "JOBGATE_REQUIRE_CGROUP",
        )
    return runner


def test_a_job_over_its_memory_limit_ends_oom(make_runner):
    runner = limited_runner(make_runner, "memory_mb")
    record, _ = runner.start("bash", "hog.sh", ["256"], limits={"memory_mb": 32})
    assert record.limits == {"memory_mb": 32}
    final = runner.wait(record.job_id, 30)
    assert (final.state, final.exit_reason) == (JobState.FAILED, ExitReason.OOM)
    assert final.reason == "killed for using more than its memory limit of 32 MiB"
    # Within its limit the same job succeeds.
    again, _ = runner.start("bash", "hog.sh", ["8"], limits={"memory_mb": 64})
    assert runner.wait(again.job_id, 30).state is JobState.SUCCEEDED


def test_a_job_killed_by_someone_else_is_not_oom(make_runner):
    runner = limited_runner(make_runner, "memory_mb")
    record, _ = run(runner, "killself.sh", limits={"memory_mb": 64})
    assert (record.exit_reason, record.reason) == (
        ExitReason.KILLED,
        "killed by SIGKILL",
    )


@pytest.mark.parametrize("spawner", SPAWNERS)
def test_a_job_cannot_start_more_tasks_than_its_limit(make_runner, spawner):
    ops = SPAWNERS[spawner]
    runner = limited_runner(make_runner, "tasks", ops=ops and ops())
    record, _ = runner.start("sh", "forks.sh", ["20"], limits={"tasks": 5})
    final = runner.wait(record.job_id, 30)
    output = follow(runner, record.job_id)
    assert final.state is JobState.FAILED
    assert b"Cannot fork" in output and b"started" not in output
    again, output = run(runner, "forks.sh", "3", limits={"tasks": 5})
    assert output == b"started 3\n"


def cpu_seconds(output: bytes) -> float:
    """The children's user time from bash's ``times`` (its second line)."""
    minutes, seconds = output.decode().splitlines()[-1].split()[0].split("m")
    return int(minutes) * 60 + float(seconds.rstrip("s"))


def test_a_job_gets_no_more_cpu_than_its_limit(make_runner):
    runner = limited_runner(make_runner, "cpu_percent")
    record, output = run(runner, "spin.sh", "2", limits={"cpu_percent": 20})
    assert record.limits == {"cpu_percent": 20}
    # 20 % of 2 s is 0.4 s (the kernel's accounting may overshoot a little).
    assert cpu_seconds(output) < 0.8, output


def test_limits_come_from_the_defaults_else_the_maxima(make_runner):
    runner = limited_runner(
        make_runner,
        "memory_mb",
        "tasks",
        default_memory_mb=128,
        max_memory_mb=512,
        max_tasks=50,
    )
    record, _ = run(runner, "hello.sh")
    assert record.limits == {"memory_mb": 128, "tasks": 50}
    record, _ = run(runner, "hello.sh", limits={"memory_mb": 256, "tasks": 10})
    assert record.limits == {"memory_mb": 256, "tasks": 10}
    assert saved(runner, record.job_id)["limits"] == {"memory_mb": 256, "tasks": 10}


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            {"memory_mb": 513},
            r"limits.memory_mb 513 is above this worker's "
            r"maximum 512 \(\[jobs\].max_memory_mb\)",
        ),
        ({"memory_mb": -1}, "limits.memory_mb must be 0"),
        ({"swap_mb": 1}, "limits.swap_mb is not a limit"),
    ],
)
def test_limits_above_the_maxima_are_refused(make_runner, limits, message):
    runner = limited_runner(make_runner, "memory_mb", max_memory_mb=512)
    with pytest.raises(InvalidArgument, match=message):
        runner.start("bash", "hello.sh", limits=limits)
    assert runner.list() == []


def test_a_limit_the_host_cannot_enforce_is_refused_not_ignored(
    make_runner, monkeypatch
):
    runner = make_runner()
    # Given back before the runner shuts down, which removes what it made.
    monkeypatch.delitem(runner.enforcer.v1, "cpu", raising=False)
    monkeypatch.setattr(runner.enforcer, "v2", runner.enforcer.v2 - {"cpu"})
    with pytest.raises(
        FailedPrecondition,
        match="limits.cpu_percent: this worker cannot enforce it on its host",
    ):
        runner.start("bash", "hello.sh", limits={"cpu_percent": 50})
    assert runner.list() == []


def test_a_worker_refuses_defaults_its_host_cannot_enforce(
    make_runner, monkeypatch, tmp_path
):
    real = Enforcer.discover

    def without_cpu(*args, **kw):
        enforcer = real(*args, **kw)
        base = enforcer.v1.pop("cpu", None)
        if base is not None:
            base.rmdir()  # as on a host without the controller: never made
        enforcer.v2.discard("cpu")
        return enforcer

    monkeypatch.setattr(Enforcer, "discover", without_cpu)
    with pytest.raises(
        OSError,
        match=r"\[jobs\].default_cpu_percent is set, but this "
        "host cannot enforce cpu_percent",
    ):
        make_runner(default_cpu_percent=50)
    # A worker that refuses to start leaves none of its cgroups behind.
    instance = isolation.instance_name("worker-1", tmp_path / "state")
    assert cgroups_named(f"jobgate-{instance}") == []


def test_what_a_worker_that_is_gone_left_in_its_limits_cgroups_is_removed(
    tmp_path,
):
    # A worker killed with its jobs in their cgroups (a dev cluster's, a
    # test's) cannot clean up; isolation.remove_leftovers does it for them,
    # in the limits' cgroup v1 hierarchies too.
    instance = isolation.instance_name("gone", tmp_path)
    enforcer = Enforcer.discover(instance, None)
    if "pids" not in enforcer.v1:
        skip_unless_required("no cgroup v1 pids hierarchy", "JOBGATE_REQUIRE_CGROUP")
    job = subprocess.Popen(["sleep", "60"])
    try:
        for procs in enforcer.prepare("job-1", Limits(tasks=10)):
            with open(procs, "w") as f:
                f.write(str(job.pid))
        assert len(cgroups_named(f"jobgate-{instance}")) == len(enforcer.v1)
        isolation.remove_leftovers(instance)  # the worker is gone: no close()
        assert job.wait(10) == -signal.SIGKILL
        assert cgroups_named(f"jobgate-{instance}") == []
    finally:
        job.kill()
        job.wait()


def cgroups_named(name: str) -> list[str]:
    """Directories called ``name`` in the host's cgroup hierarchies (v1 and
    v2), a few levels down."""
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        if top.count("/") > 6:
            dirs.clear()
        elif name in dirs:
            found.append(os.path.join(top, name))
    return found


# -- a full disk --------------------------------------------------------------------


def disk_fills_after(monkeypatch, limit: int) -> dict:
    """Output beyond ``limit`` bytes fails as on a full disk, until "space" is back."""
    disk = {"full": True}
    real = OutputLog.append

    def append(self, data):
        if disk["full"] and self.total + len(data) > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, data)

    monkeypatch.setattr(OutputLog, "append", append)
    return disk


def test_a_job_whose_output_cannot_be_written_ends_output_failed_not_sigpipe(
    make_runner, monkeypatch
):
    # The worker writes the output itself (no keeper): see test_keeper for
    # the keeper's side of a failed write.
    runner = make_runner(ops=ExecChain(), alive_interval_s=0.1, min_free_bytes=0)
    disk_fills_after(monkeypatch, 1000)
    record, _ = runner.start("bash", "writer.sh", ["2000"])
    final = runner.wait(record.job_id, 20)
    assert (final.state, final.exit_reason) == (
        JobState.FAILED,
        ExitReason.OUTPUT_FAILED,
    )
    # The job ran to its end: nothing of the worker's making killed it.
    assert (final.exit_code, final.signal) == (0, None)
    assert final.reason.startswith("the worker could not write its output after ")
    assert "No space left on device (exited with code 0)" in final.reason
    assert final.output_bytes <= 1000
    assert saved(runner, record.job_id)["exit_reason"] == "output_failed"


def test_a_worker_that_cannot_write_is_degraded_until_space_is_back(
    make_runner, monkeypatch
):
    runner = make_runner(ops=ExecChain(), alive_interval_s=0.1, min_free_bytes=0)
    disk = disk_fills_after(monkeypatch, 0)
    record, _ = runner.start("bash", "hello.sh", ["x"])
    assert runner.wait(record.job_id, 10).exit_reason is ExitReason.OUTPUT_FAILED
    assert "No space left on device" in runner.health.reason
    with pytest.raises(Unavailable, match="degraded: cannot write job output in"):
        runner.start("bash", "hello.sh")
    disk["full"] = False
    # It recovers by itself: the state directory is checked again.
    deadline = time.monotonic() + 5
    while runner.health.reason and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.health.reason == ""
    again, output = run(runner, "hello.sh", "x")
    assert (again.state, output) == (JobState.SUCCEEDED, b"arg: x\n")


def test_a_worker_short_of_free_space_is_degraded_from_the_start(make_runner):
    runner = make_runner(min_free_bytes=2**62)
    assert "less than [jobs].min_free_bytes" in runner.health.reason
    with pytest.raises(Unavailable, match="min_free_bytes"):
        runner.start("bash", "hello.sh")


def test_an_end_that_could_not_be_recorded_is_recorded_once_space_is_back(
    make_runner, monkeypatch
):
    runner = make_runner(alive_interval_s=0.1, min_free_bytes=0)
    real = runner._records.write
    disk = {"full": True}

    def write(record):
        if disk["full"] and record["state"] != "running":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(record)

    monkeypatch.setattr(runner._records, "write", write)
    record, _ = runner.start("bash", "hello.sh")
    assert runner.wait(record.job_id, 10).state is JobState.SUCCEEDED
    assert saved(runner, record.job_id)["state"] == "running"
    assert "cannot write job records" in runner.health.reason
    disk["full"] = False
    deadline = time.monotonic() + 5
    while saved(runner, record.job_id)["state"] == "running":
        assert time.monotonic() < deadline, "the end was never recorded"
        time.sleep(0.05)
    assert saved(runner, record.job_id)["state"] == "succeeded"


# -- shutting down ---------------------------------------------------------------


def test_start_during_shutdown_is_refused_and_nothing_is_left_running(make_runner):
    runner = make_runner()
    first, _ = runner.start("bash", "sleeper.sh")
    refused = []
    real_close = runner._reactor.close

    def close_after_a_late_start(*args, **kwargs):
        # The running jobs were collected and stopped; a start comes now.
        try:
            runner.start("bash", "sleeper.sh")
        except Unavailable as exc:
            refused.append(exc)
        return real_close(*args, **kwargs)

    runner._reactor.close = close_after_a_late_start
    in_thread(runner.shutdown, 0.2, timeout=20)
    assert len(refused) == 1
    assert "shutting down" in refused[0].message
    assert [r.job_id for r in runner.list()] == [first.job_id]
    with pytest.raises(Unavailable, match="shutting down"):
        runner.start("bash", "hello.sh")
    # Asking to stop a job after shutdown answers with its final record.
    final = in_thread(runner.stop, first.job_id, timeout=5)
    assert final.state is JobState.STOPPED
    assert runner.responsive(timeout=1)


def test_reactor_close_runs_the_calls_handed_over_before_it():
    reactor = Reactor()
    gate, busy = threading.Event(), threading.Event()
    seen = []
    reactor.call_soon(lambda: (busy.set(), gate.wait(10)))
    assert busy.wait(5)
    reactor.call_soon(seen.append, "queued")
    closer = threading.Thread(target=reactor.close)
    closer.start()
    deadline = time.monotonic() + 5
    while not reactor._closing and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError):
        reactor.call_soon(seen.append, "late")
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    assert seen == ["queued"]


# -- drain ----------------------------------------------------------------------


def test_a_drained_worker_starts_no_jobs_and_lets_running_ones_end(make_runner, fifos):
    runner = make_runner()
    gate = fifos()
    record, _ = runner.start("bash", "gated.sh", [str(gate), "1"])
    wait_for(runner, record.job_id, b"before 1")
    runner.set_drain(True, "token ops")
    assert runner.degraded().startswith("draining: asked by token ops at ")
    with pytest.raises(Unavailable, match="the worker is draining: asked by token"):
        runner.start("bash", "hello.sh")
    # The running job is not touched: it still runs, and ends as it would.
    assert runner.get(record.job_id).state is JobState.RUNNING
    assert runner.wait_idle(0.2) == 1
    left = []
    waiter = threading.Thread(target=lambda: left.append(runner.wait_idle(10)))
    waiter.start()
    release(gate)
    waiter.join(10)
    assert left == [0]
    assert runner.get(record.job_id).state is JobState.SUCCEEDED

    runner.set_drain(False, "token ops")
    assert runner.degraded() == ""
    again, output = run(runner, "hello.sh", "x")
    assert (again.state, output) == (JobState.SUCCEEDED, b"arg: x\n")


def test_a_drain_outlives_a_restart_of_the_worker(make_runner, tmp_path):
    state_dir = tmp_path / "drained"
    first = make_runner(state_dir=state_dir)
    first.set_drain(True, "token ops")
    reason = first.degraded()
    first.shutdown(grace_s=0.2)
    second = make_runner(state_dir=state_dir)
    assert second.degraded() == reason
    with pytest.raises(Unavailable, match="draining"):
        second.start("bash", "hello.sh")


def test_a_drain_that_cannot_be_recorded_is_refused_and_changes_nothing(
    make_runner, monkeypatch
):
    runner = make_runner()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(Unavailable, match="could not record the drain in .*No space"):
        runner.set_drain(True, "token ops")
    monkeypatch.undo()
    assert runner.degraded() == ""
    assert run(runner, "hello.sh")[0].state is JobState.SUCCEEDED


# -- health and host requirements ------------------------------------------------


def test_runner_is_not_responsive_while_its_reactor_is_wedged(make_runner):
    runner = make_runner()
    assert runner.responsive(timeout=5)
    gate = threading.Event()
    runner._reactor.call_soon(gate.wait, 10)
    try:
        assert not runner.responsive(timeout=0.2)
    finally:
        gate.set()
    assert runner.responsive(timeout=5)


@pytest.mark.parametrize("missing", ["ENOSYS", "EPERM", "no function"])
def test_runner_refuses_to_start_without_pidfd_open(
    scripts, tmp_path, monkeypatch, missing
):
    if missing == "no function":
        monkeypatch.delattr(os, "pidfd_open")
    else:

        def pidfd_open(pid, flags=0):
            code = getattr(errno, missing)
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    cfg = JobsSection(
        scripts_dir=scripts, state_dir=tmp_path / "state", isolation="process-group"
    )
    with pytest.raises(OSError, match=r"needs pidfd_open \(Linux 5\.3 or newer"):
        JobRunner(cfg, worker_name="worker-1")


# -- loose ends ------------------------------------------------------------------


def test_a_job_whose_process_does_not_die_is_not_marked_reaped(
    make_runner, monkeypatch
):
    ops = NoExitFd()
    runner = make_runner(ops=ops, isolation="process-group")
    monkeypatch.setattr(runner.isolation, "kill_all", lambda job_id, pgid: None)
    record, _ = runner.start("bash", "quiet.sh")
    pid = ops.spawned[-1]
    job = runner._jobs[record.job_id]
    try:
        assert record.exit_reason is ExitReason.START_FAILED
        assert not job.reaped  # its pid is still the job's: never reused
        assert process_alive(pid)
    finally:
        os.killpg(pid, signal.SIGKILL)
    # Once it dies it is reaped, not left a zombie until the worker exits.
    deadline = time.monotonic() + 10
    while not job.reaped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job.reaped
    assert not Path(f"/proc/{pid}").exists()


def test_an_event_of_a_job_torn_down_in_the_same_round_is_ignored(make_runner, caplog):
    ops = GatedExit()
    runner = make_runner(ops=ops, isolation="process-group")
    gate = threading.Event()
    # The reactor is busy from before the start, so it cannot read the
    # job's output before the test has broken the log.
    runner._reactor.call_soon(gate.wait, 10)
    record, _ = runner.start("bash", "hello.sh", ["x"])
    job = runner._jobs[record.job_id]
    try:
        deadline = time.monotonic() + 5
        while process_state(record.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        # The output is ready first, then the exit: one round gets both.

        def broken_append(data):
            raise RuntimeError("simulated failure")

        job.output.append = broken_append
        ops.open(record.pid)
    finally:
        gate.set()
    final = runner.wait(record.job_id, 10)
    assert final.state is JobState.LOST
    messages = [r.getMessage() for r in caplog.records]
    assert sum("watching it failed" in m for m in messages) == 1
    assert not [m for m in messages if "after its end" in m]
