"""worker.kept.spawn_kept: a job whose parent is jobgate-keeper, not the worker."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import random
import select
import signal
import stat
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import children, skip_unless_required

from worker import isolation, linux, spawn
from worker import kept as through_keeper

MiB = 1024 * 1024
# A user and group id no account has: the job's ids come from the keeper's
# arguments, not from the password database.
JOB_ID = 61999
PR_SET_CHILD_SUBREAPER = 36


def needs_root(why: str) -> None:
    if os.geteuid() != 0:
        skip_unless_required(why, "JOBGATE_REQUIRE_ROOT")


class Job:
    """A kept job with its directory and output file, for the tests."""

    def __init__(
        self,
        tmp_path: Path,
        argv: list[str],
        output: Path | None = None,
        flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
        **kw,
    ):
        self.dir = tmp_path / f"job-{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        self.output = output or self.dir / "output"
        fd = os.open(self.output, flags, 0o600)
        kw.setdefault("cwd", "/")
        kw.setdefault("env", {"PATH": "/usr/bin:/bin"})
        kw.setdefault("user", None)
        kw.setdefault("group", None)
        kw.setdefault("cgroup_procs", None)
        kw.setdefault("cgroup_kill", None)
        kw.setdefault("head_bytes", MiB)
        kw.setdefault("tail_bytes", MiB)
        kw.setdefault("drain_s", 5.0)
        try:
            self.kept = through_keeper.spawn_kept(
                argv, job_dir=str(self.dir), output_fd=fd, **kw
            )
        finally:
            os.close(fd)  # the keeper has its own

    def finish(self, timeout: float = 10) -> through_keeper.KeeperExit:
        assert self.kept.keeper.wait(timeout=timeout) == 0
        ended = through_keeper.read_exit(str(self.dir))
        assert ended is not None
        assert "exit.tmp" not in os.listdir(self.dir)
        return ended

    def read(self) -> bytes:
        return self.output.read_bytes()

    def wait_for_output(self, size: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while self.output.stat().st_size < size:
            assert time.monotonic() < deadline, "the output never came"
            time.sleep(0.01)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended: only its parent's wait is due)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


_BEFORE: set[int] = set()


@pytest.fixture(autouse=True)
def _children_before():
    """What children the test process had before the test (other tests of the
    session may leave some running, e.g. a session's database server)."""
    _BEFORE.clear()
    _BEFORE.update(children())


def new_children() -> list[int]:
    """This process's children that the test made, zombies included."""
    return [pid for pid in children() if pid not in _BEFORE]


def wait_until(check, timeout: float = 10, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_keeper_is_built_and_usable_here():
    # The package build compiles it (setup.py); without it jobs would die
    # with every restart of the worker.
    assert through_keeper.keeper_available() == ""
    assert os.access(through_keeper.keeper_path(), os.X_OK)


@pytest.mark.parametrize(
    "script, returncode",
    [
        ("exit 0", 0),
        ("exit 3", 3),
        # A program that ran and exited 127 is not one that did not start.
        ("exit 127", 127),
        ("kill -TERM $$", -signal.SIGTERM),
    ],
)
def test_the_output_is_copied_exactly_and_the_exit_file_tells_the_end(
    tmp_path, script, returncode
):
    expected = b"out\x00\xff\x01\n" + b"err\n"
    job = Job(
        tmp_path,
        ["/bin/sh", "-c", f"printf 'out\\000\\377\\001\\n'; echo err >&2; {script}"],
    )
    ended = job.finish()
    assert job.read() == expected
    assert ended.returncode == returncode
    assert os.waitstatus_to_exitcode(ended.status) == returncode
    assert ended.output_bytes == len(expected)
    assert (ended.output_error, ended.drain_cut, ended.start_error) == (
        None,
        False,
        None,
    )
    # The keeper reaped the job: the worker has only the keeper to reap.
    assert not alive(job.kept.pid)
    assert new_children() == []


def named_output_job(
    tmp_path: Path, argv: list[str]
) -> tuple[Path, through_keeper.Kept]:
    directory = tmp_path / f"job-{uuid.uuid4().hex[:8]}"
    directory.mkdir()
    kept = through_keeper.spawn_kept(
        argv,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        user=None,
        group=None,
        cgroup_procs=None,
        cgroup_kill=None,
        job_dir=str(directory),
        output_name="out.data",
        head_bytes=MiB,
        tail_bytes=MiB,
        drain_s=5.0,
    )
    assert kept.keeper.wait(timeout=10) == 0
    return directory, kept


def test_a_named_output_file_is_made_with_the_first_byte(tmp_path):
    old = os.umask(0)
    try:
        directory, _ = named_output_job(tmp_path, ["/bin/sh", "-c", "echo hi >&2"])
    finally:
        os.umask(old)
    assert (directory / "out.data").read_bytes() == b"hi\n"
    assert stat.S_IMODE((directory / "out.data").stat().st_mode) == 0o640
    ended = through_keeper.read_exit(str(directory))
    assert (ended.output_bytes, ended.output_error) == (3, None)


def test_a_job_that_writes_nothing_gets_no_output_file(tmp_path):
    directory, _ = named_output_job(tmp_path, ["/bin/true"])
    assert sorted(os.listdir(directory)) == ["exit"]
    ended = through_keeper.read_exit(str(directory))
    assert (ended.returncode, ended.output_bytes, ended.output_error) == (0, 0, None)


def test_an_output_file_that_cannot_be_made_is_an_output_error(tmp_path):
    directory = tmp_path / "job"
    directory.mkdir()
    (directory / "out.data").mkdir()  # in the way: opening it fails (EISDIR)
    kept = through_keeper.spawn_kept(
        ["/bin/sh", "-c", "head -c 1000000 /dev/zero"],
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        user=None,
        group=None,
        cgroup_procs=None,
        cgroup_kill=None,
        job_dir=str(directory),
        output_name="out.data",
        head_bytes=MiB,
        tail_bytes=MiB,
        drain_s=5.0,
    )
    assert kept.keeper.wait(timeout=10) == 0
    ended = through_keeper.read_exit(str(directory))
    assert (ended.returncode, ended.output_bytes) == (0, 1000000)
    assert ended.output_error == (errno.EISDIR, 0)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b"])
def test_an_output_name_must_be_a_name(tmp_path, name):
    with pytest.raises(ValueError, match="output"):
        through_keeper.spawn_kept(
            ["/bin/true"],
            cwd="/",
            env={},
            user=None,
            group=None,
            cgroup_procs=None,
            cgroup_kill=None,
            job_dir=str(tmp_path),
            output_name=name,
            head_bytes=MiB,
            tail_bytes=MiB,
            drain_s=5.0,
        )


def test_the_job_is_the_keepers_child_with_a_session_of_its_own(tmp_path):
    job = Job(
        tmp_path,
        [
            "/bin/bash",
            "-c",
            'echo "$PPID $(cut -d" " -f6 /proc/$$/stat)"\n'
            'for fd in /proc/$$/fd/*; do echo "${fd##*/}"; done',
        ],
    )
    job.finish()
    first, *fds = job.read().decode().splitlines()
    assert first == f"{job.kept.keeper.pid} {job.kept.pid}"
    # 0, 1, 2 and the descriptor the glob reads /proc through: none of the
    # keeper's went on to the job.
    assert sorted(fds)[:3] == ["0", "1", "2"] and len(fds) == 4


def test_the_keeper_shrugs_off_signals_and_keeps_copying(tmp_path):
    job = Job(tmp_path, ["/bin/sh", "-c", "echo one; sleep 0.5; echo two"])
    job.wait_for_output(4)
    for sig in (
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        signal.SIGQUIT,
        signal.SIGPIPE,
        signal.SIGUSR1,
        signal.SIGUSR2,
    ):
        os.kill(job.kept.keeper.pid, sig)
    assert job.kept.keeper.poll() is None
    ended = job.finish()
    assert (job.read(), ended.returncode) == (b"one\ntwo\n", 0)


def test_a_signal_sent_as_soon_as_the_job_has_a_pid_is_not_lost(tmp_path):
    # The keeper reports the pid before its child has put the keeper's
    # ignored signals back to default: the child keeps them pending until
    # then. Several tries, as the signal may also come after that.
    for _ in range(10):
        job = Job(tmp_path, ["/bin/sleep", "30"])
        os.kill(job.kept.pid, signal.SIGTERM)
        assert job.finish(timeout=10).returncode == -signal.SIGTERM


WORKER = """
import os, signal, sys
from worker import kept as through_keeper

job_dir, script = sys.argv[1:]
fd = os.open(os.path.join(job_dir, "output"), os.O_WRONLY | os.O_CREAT, 0o600)
kept = through_keeper.spawn_kept(
    ["/bin/sh", "-c", script], cwd="/", env={"PATH": "/usr/bin:/bin"},
    user=None, group=None, cgroup_procs=None, cgroup_kill=None, job_dir=job_dir,
    output_fd=fd, head_bytes=1 << 20, tail_bytes=1 << 20, drain_s=5,
)
print(kept.keeper.pid, kept.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """This process adopts its descendants' orphans (as a service manager
    does), so that the test can reap the keeper of a worker it killed."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.fail(f"prctl: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def run_dying_worker(script: str, job_dir) -> subprocess.CompletedProcess:
    """Run ``script``, a worker that starts a kept job printing "after" and
    exiting 5 half a second later, then kills itself with SIGKILL."""
    return subprocess.run(
        [sys.executable, "-c", script, str(job_dir), "sleep 0.5; echo after; exit 5"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=30,
    )


def test_the_job_outlives_the_worker_killed_with_sigkill(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    with adopting_orphans():
        worker = run_dying_worker(WORKER, job_dir)
        assert worker.returncode == -signal.SIGKILL
        keeper_pid, job_pid = map(int, worker.stdout.split())
        assert alive(job_pid)  # the worker is gone, the job is not
        _, status = os.waitpid(keeper_pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ended = through_keeper.read_exit(str(job_dir))
    assert (ended.returncode, ended.output_bytes) == (5, 6)
    assert (job_dir / "output").read_bytes() == b"after\n"


def test_the_job_runs_as_its_user_and_group_only(tmp_path):
    needs_root("jobs change user only as root")
    job = Job(
        tmp_path,
        [
            "/bin/sh",
            "-c",
            "id -u; id -g; id -G; grep -E '^(Groups|CapEff):' /proc/self/status",
        ],
        user=JOB_ID,
        group=JOB_ID,
    )
    assert job.finish().returncode == 0
    lines = job.read().decode().splitlines()
    assert lines[:3] == [str(JOB_ID)] * 3
    assert lines[3].split() == ["Groups:"]
    assert lines[4].split() == ["CapEff:", "0000000000000000"]


def spawn_error(argv: list[str], **kw) -> OSError:
    """What spawn.spawn raises for ``argv``: a kept job's start_error must
    come out the same."""
    kw.setdefault("cwd", "/")
    with pytest.raises(OSError) as caught:
        spawn.spawn(
            argv,
            env={"PATH": "/usr/bin:/bin"},
            user=None,
            group=None,
            cgroup_procs=None,
            **kw,
        )
    return caught.value


def same_error(a: OSError, b: OSError) -> bool:
    return (type(a), a.errno, a.strerror, a.filename) == (
        type(b),
        b.errno,
        b.strerror,
        b.filename,
    )


def test_a_program_that_cannot_be_executed_is_told_in_the_exit_file(tmp_path):
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\necho ran\n")
    for path, code in [(tmp_path / "missing", errno.ENOENT), (script, errno.EACCES)]:
        # The keeper reports the start before the exec: it is no failure of
        # spawn_kept's.
        job = Job(tmp_path, [str(path)], head_bytes=0, tail_bytes=0, drain_s=1)
        ended = job.finish()
        assert (ended.returncode, ended.output_bytes, job.read()) == (127, 0, b"")
        assert ended.start_error is not None and ended.start_error[1] == code
        error = through_keeper.start_failure(*ended.start_error, str(path))
        assert error.errno == code
        assert error.filename == os.fsencode(path)
        assert same_error(error, spawn_error([str(path)]))
    # The keepers were reaped, and they reaped their children: nothing is left.
    assert new_children() == []


def test_a_step_before_exec_is_told_as_spawn_tells_it(tmp_path):
    job = Job(tmp_path, ["/bin/true"], cwd=str(tmp_path / "gone"))
    ended = job.finish()
    assert ended.returncode == 127 and ended.start_error is not None
    error = through_keeper.start_failure(*ended.start_error, "/bin/true")
    assert isinstance(error, FileNotFoundError)
    assert error.strerror == (
        "changing to the working directory: No such file or directory"
    )
    assert same_error(error, spawn_error(["/bin/true"], cwd=str(tmp_path / "gone")))
    assert new_children() == []


def test_an_unknown_step_is_an_error_of_its_own():
    error = through_keeper.start_failure(99, errno.EPERM, "/bin/true")
    assert error.errno == errno.EIO
    assert "unknown step 99" in str(error)


def kept_error(tmp_path: Path, **kw) -> OSError:
    """What spawn_kept raises for a keeper that does not start the job."""
    job_dir = tmp_path / f"job-{uuid.uuid4().hex[:8]}"
    job_dir.mkdir()
    fd = os.open(job_dir / "output", os.O_WRONLY | os.O_CREAT, 0o600)
    kw.setdefault("cwd", "/")
    try:
        with pytest.raises(OSError) as caught:
            through_keeper.spawn_kept(
                ["/bin/true"],
                env={},
                user=None,
                group=None,
                cgroup_procs=None,
                cgroup_kill=None,
                job_dir=str(job_dir),
                output_fd=fd,
                head_bytes=0,
                tail_bytes=0,
                drain_s=1,
                **kw,
            )
        os.fstat(fd)  # the caller's descriptor stays open
    finally:
        os.close(fd)
    assert os.listdir(job_dir) == ["output"]  # no exit file
    assert new_children() == []  # nothing left, not even a zombie
    return caught.value


def test_a_keeper_that_cannot_be_executed_fails_the_start(tmp_path, monkeypatch):
    not_executable = tmp_path / "not-executable"
    not_executable.write_text("#!/bin/sh\n")
    for path, code in [
        (tmp_path / "missing", errno.ENOENT),
        (not_executable, errno.EACCES),
    ]:
        monkeypatch.setattr(through_keeper, "keeper_path", lambda path=path: str(path))
        error = kept_error(tmp_path)
        assert (error.errno, error.filename) == (code, os.fsencode(path))


def test_a_keeper_given_a_bad_argument_fails_the_start(tmp_path):
    # An empty working directory: the keeper refuses it before it forks.
    error = kept_error(tmp_path, cwd="")
    assert error.errno == errno.EIO
    assert "ended (exit status 2) before it reported" in error.strerror


def test_a_keeper_that_cannot_start_the_jobs_process_reports_why(tmp_path):
    # Only the descriptors it was given, and one for the dynamic loader: no
    # room for the pipe to the job.
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    run = subprocess.run(
        [
            "/bin/bash",
            "-c",
            'ulimit -n 7; exec "$0" --report 3 --output 4 --dir 5 --head 0 --tail 0 '
            '--drain-ms 0 --cwd / -- /bin/true true 3>"$1" 4>"$2" 5<"$3"',
            through_keeper.keeper_path(),
            str(tmp_path / "report"),
            str(job_dir / "output"),
            str(job_dir),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=10,
    )
    assert run.returncode == 127, run.stderr
    report = (tmp_path / "report").read_bytes()
    step, err, start = through_keeper._REPORT.unpack(report)
    assert start > 0  # the keeper's, read before it could not go on
    assert err == errno.EMFILE
    error = through_keeper.start_failure(step, err, "/bin/true")
    assert error.strerror == f"starting the job's process: {os.strerror(errno.EMFILE)}"
    assert os.listdir(job_dir) == ["output"]


def test_the_output_keeps_its_head_and_tail_and_frees_the_middle(tmp_path):
    head, tail, size = 64 * 1024, 256 * 1024, 8 * MiB
    data = random.Random(7).randbytes(size)
    writer = (
        "import random, sys, time; "
        f"sys.stdout.buffer.write(random.Random(7).randbytes({size})); "
        "sys.stdout.flush(); time.sleep(30)"
    )
    job = Job(
        tmp_path,
        [sys.executable, "-c", writer],
        head_bytes=head,
        tail_bytes=tail,
    )
    job.wait_for_output(size)
    # While the job runs: the middle is freed a MiB at a time.
    on_disk = job.output.stat().st_blocks * 512
    # (A read's worth may be written but not yet freed, and the file system
    # may round up.)
    assert on_disk <= head + tail + 2 * MiB, on_disk
    os.kill(job.kept.pid, signal.SIGKILL)
    ended = job.finish()
    assert (ended.returncode, ended.output_bytes) == (-signal.SIGKILL, size)
    st = job.output.stat()
    # Offsets are offsets in everything the job wrote.
    assert st.st_size == size
    written = job.read()
    assert written[:head] == data[:head]
    assert written[-tail:] == data[-tail:]
    # Once the job has ended, nothing of the middle is left on disk.
    assert written[head:-tail] == bytes(size - head - tail)
    assert st.st_blocks * 512 <= head + tail + 64 * 1024, st.st_blocks


def test_a_process_left_holding_the_output_is_ended_with_the_job(tmp_path):
    job = Job(
        tmp_path,
        ["/bin/sh", "-c", "sleep 30 & echo $!"],
        drain_s=20,
    )
    started = time.monotonic()
    ended = job.finish()
    # Its process group went with it: no waiting for the drain's deadline.
    assert time.monotonic() - started < 5
    assert (ended.returncode, ended.drain_cut) == (0, False)
    left = int(job.read())
    wait_until(lambda: not alive(left), what="the background process to end")


def test_the_drain_gives_up_on_a_process_outside_the_jobs_reach(tmp_path):
    job = Job(
        tmp_path,
        # The grandchild leaves the job's session: only a cgroup would find it.
        ["/bin/sh", "-c", "setsid /bin/sh -c 'echo $$; exec sleep 30' & sleep 0.2"],
        drain_s=0.2,
    )
    try:
        started = time.monotonic()
        ended = job.finish()
        assert time.monotonic() - started < 5
        assert (ended.returncode, ended.drain_cut) == (0, True)
    finally:
        escaped = int(job.read())
        os.kill(escaped, signal.SIGKILL)
    assert ended.output_bytes == len(job.read())


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def test_the_job_is_reaped_only_once_the_drain_is_over(tmp_path):
    left = tmp_path / "left"
    job = Job(
        tmp_path,
        # The grandchild leaves the job's session and holds the output open;
        # the job ends once it has left.
        [
            "/bin/sh",
            "-c",
            f"setsid /bin/sh -c 'echo $$ > {left}; exec sleep 30' &"
            f"while [ ! -s {left} ]; do sleep 0.01; done",
        ],
        drain_s=30,
    )
    keeper = job.kept.keeper.pid
    escaped = 0
    try:
        wait_until(lambda: left.exists() and left.read_text().endswith("\n"))
        escaped = int(left.read_text())
        wait_until(lambda: not alive(job.kept.pid), what="the job's exit")
        # Exited, not reaped: the keeper's zombie child, whose pid (and
        # process group id) no other process can take.
        stat = Path(f"/proc/{job.kept.pid}/stat").read_text().rpartition(")")[2]
        assert stat.split()[:2] == ["Z", str(keeper)]
        os.killpg(job.kept.pid, 0)
        # The keeper waits for the drain without spinning on the zombie.
        before = cpu_ticks(keeper)
        time.sleep(0.5)
        assert cpu_ticks(keeper) - before <= 5
        assert job.kept.keeper.poll() is None
    finally:
        if escaped:
            os.kill(escaped, signal.SIGKILL)
    ended = job.finish()
    assert (ended.returncode, ended.drain_cut) == (0, False)
    assert not os.path.exists(f"/proc/{job.kept.pid}")


def test_held_descriptors_stay_with_the_keeper_and_not_the_job(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    started = tmp_path / "started"
    go = tmp_path / "go"

    def locked() -> bool:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    held = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        job = Job(
            tmp_path,
            [
                "/bin/sh",
                "-c",
                f"touch {started}; while [ ! -e {go} ]; do sleep 0.01; done",
            ],
            hold_fds=(held,),
        )
    finally:
        os.close(held)  # the keeper's copy holds the lock on its own now
    keeper = job.kept.keeper.pid
    wait_until(started.exists, what="the job to run")
    assert locked()

    def holders(pid: int) -> list[str]:
        fds = Path(f"/proc/{pid}/fd")
        return [str(fd) for fd in fds.iterdir() if fd.resolve() == lock]

    assert holders(keeper) == [f"/proc/{keeper}/fd/{held}"]
    assert holders(job.kept.pid) == []
    go.touch()
    wait_until(lambda: not alive(job.kept.pid), what="the job to end")
    # The job has ended: the keeper has not yet, or has only just.
    ended = job.finish()
    assert ended.returncode == 0
    assert not locked()


@pytest.fixture
def cgroup():
    """A fresh cgroup v2 below this process's own, removed afterwards."""
    mount, own = isolation._cgroup2_mount(), isolation._own_cgroup()
    if mount is None or own is None or os.geteuid() != 0:
        skip_unless_required("no writable cgroup v2 here", "JOBGATE_REQUIRE_CGROUP")
    path = mount / own.lstrip("/") / f"jobgate-keeper-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
    except OSError as exc:
        skip_unless_required(f"cannot make a cgroup: {exc}", "JOBGATE_REQUIRE_CGROUP")
    yield path
    # Killed members may take a moment to be gone.
    deadline = time.monotonic() + 5
    while True:
        try:
            path.rmdir()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_the_job_joins_its_cgroup_and_cgroup_kill_ends_what_it_left(
    tmp_path, cgroup: Path
):
    script = textwrap.dedent(
        """
        grep '^0::' /proc/self/cgroup | cut -d: -f3
        setsid sleep 30 &
        echo $!
        sleep 0.3
        """
    )
    job = Job(
        tmp_path,
        ["/bin/sh", "-c", script],
        cgroup_procs=[str(cgroup / "cgroup.procs")],
        cgroup_kill=str(cgroup / "cgroup.kill"),
        drain_s=20,
    )
    # The keeper is not in the job's cgroup: killing it spares the keeper.
    keeper_cgroup = Path(f"/proc/{job.kept.keeper.pid}/cgroup").read_text()
    assert cgroup.name not in keeper_cgroup
    started = time.monotonic()
    ended = job.finish()
    assert time.monotonic() - started < 5
    assert (ended.returncode, ended.drain_cut) == (0, False)
    joined, escaped = job.read().decode().split()
    own = isolation._own_cgroup().rstrip("/")
    assert joined == f"{own}/{cgroup.name}"
    wait_until(lambda: not alive(int(escaped)), what="the escaped process to end")
    wait_until(
        lambda: (cgroup / "cgroup.procs").read_text() == "", what="an empty cgroup"
    )


def test_a_cgroup_that_cannot_be_joined_is_told_and_runs_nothing(
    tmp_path, cgroup: Path
):
    marker = tmp_path / "ran"
    job = Job(
        tmp_path,
        ["/bin/sh", "-c", f"touch {marker}"],
        cgroup_procs=[str(cgroup / "cgroup.events")],
    )
    ended = job.finish()
    assert ended.returncode == 127 and ended.start_error is not None
    error = through_keeper.start_failure(*ended.start_error, "/bin/sh")
    assert error.strerror.startswith("joining the job's cgroup: ")
    assert not marker.exists()
    assert new_children() == []


def test_an_output_that_cannot_be_written_is_named_and_the_job_runs_on(tmp_path):
    read_only = tmp_path / "read-only"
    read_only.touch()
    job = Job(
        tmp_path,
        # More than a pipe holds: a keeper that stopped reading would block
        # the job.
        ["/bin/sh", "-c", "head -c 1000000 /dev/zero; echo done >&2"],
        output=read_only,
        flags=os.O_RDONLY,  # every write fails at once
    )
    ended = job.finish()
    assert (ended.returncode, ended.output_bytes) == (0, 1000005)
    assert ended.output_error == (errno.EBADF, 0)


def test_a_full_disk_keeps_what_fit_and_the_job_runs_on(tmp_path):
    needs_root("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(disk)],
        check=True,
    )
    try:
        data = random.Random(3).randbytes(MiB)
        writer = (
            "import random, sys; "
            f"sys.stdout.buffer.write(random.Random(3).randbytes({MiB}))"
        )
        # Only the output is on the full disk: the exit file still fits.
        job = Job(tmp_path, [sys.executable, "-c", writer], output=disk / "output")
        ended = job.finish()
        assert (ended.returncode, ended.output_bytes) == (0, MiB)
        code, kept = ended.output_error
        assert code == errno.ENOSPC
        assert 0 < kept < MiB
        assert job.read() == data[:kept]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_read_exit_refuses_what_the_keeper_does_not_write(tmp_path):
    assert through_keeper.read_exit(str(tmp_path)) is None
    exit_file = tmp_path / "exit"
    exit_file.write_text("status 0\noutput_bytes 12\noutput_error 28 4\ndrain_cut 1\n")
    assert through_keeper.read_exit(str(tmp_path)) == through_keeper.KeeperExit(
        status=0, returncode=0, output_bytes=12, output_error=(28, 4), drain_cut=True
    )
    exit_file.write_text("status 32512\noutput_bytes 0\nstart_error 10 2\n")
    assert through_keeper.read_exit(str(tmp_path)) == through_keeper.KeeperExit(
        status=32512,
        returncode=127,
        output_bytes=0,
        output_error=None,
        drain_cut=False,
        start_error=(10, 2),
    )
    for bad in [
        "status 0\n",
        "status 0\noutput_bytes 1",
        "status 0\noutput_bytes x\n",
        "status 0\noutput_bytes 1\noutput_bytes 1\n",
        "status 0\noutput_bytes 1\nwhat 1\n",
        "status 0\noutput_bytes 1\noutput_error 28\n",
        "status 0\noutput_bytes 1\nstart_error 10\n",
        "status 4991\noutput_bytes 1\n",  # stopped, not ended
    ]:
        exit_file.write_text(bad)
        with pytest.raises(ValueError):
            through_keeper.read_exit(str(tmp_path))


def test_a_start_no_worker_hears_of_runs_the_job_to_its_end(tmp_path):
    """The job's process reports its own start: a worker gone by then (the
    report's pipe has no reader) costs the job nothing, not even SIGPIPE."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    output = job_dir / "output"
    read_end, write_end = os.pipe()
    os.close(read_end)
    dir_fd = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY)
    out_fd = os.open(output, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        run = subprocess.run(
            [
                through_keeper.keeper_path(),
                "--report",
                str(write_end),
                "--output",
                str(out_fd),
                "--dir",
                str(dir_fd),
                "--head",
                "4096",
                "--tail",
                "4096",
                "--drain-ms",
                "1000",
                "--cwd",
                "/",
                "--",
                "/bin/sh",
                "sh",
                "-c",
                "sleep 0.2; echo done; exit 3",
            ],
            pass_fds=(write_end, dir_fd, out_fd),
            capture_output=True,
            timeout=10,
        )
    finally:
        for fd in (write_end, dir_fd, out_fd):
            os.close(fd)
    assert run.returncode == 0, run.stderr
    assert b"cannot report" not in run.stderr  # the job's process reported
    ended = through_keeper.read_exit(str(job_dir))
    assert (ended.returncode, ended.output_bytes) == (3, 5)
    assert output.read_bytes() == b"done\n"


def test_bad_arguments_end_the_keeper_before_it_starts_anything(tmp_path):
    run = subprocess.run(
        [through_keeper.keeper_path(), "--report", "1", "--", "/bin/true", "true"],
        capture_output=True,
        timeout=10,
    )
    assert run.returncode == 2
    assert run.stderr.startswith(b"jobgate-keeper: ")


# -- the keeper server -----------------------------------------------------------


@pytest.fixture
def server() -> Iterator[through_keeper.KeeperServer]:
    served = through_keeper.KeeperServer()
    yield served
    served.close()


def served_job(
    server: through_keeper.KeeperServer, directory: Path, argv: list[str], **kw
) -> through_keeper.Kept:
    """A job the server's keeper keeps; ``directory`` is made here first,
    unless ``make_dir`` is given (spawn_kept's)."""
    if kw.get("make_dir") is None:
        directory.mkdir(exist_ok=True)
    kw.setdefault("env", {"PATH": "/usr/bin:/bin"})
    return through_keeper.spawn_kept(
        argv,
        cwd="/",
        user=None,
        group=None,
        cgroup_procs=None,
        cgroup_kill=None,
        job_dir=str(directory),
        output_name="output",
        head_bytes=MiB,
        tail_bytes=MiB,
        drain_s=5.0,
        server=server,
        **kw,
    )


def release(fifo: Path) -> None:
    """Let a job blocked in ``read word < fifo`` go on."""
    with open(fifo, "w") as f:
        f.write("go\n")


def ended_by_pidfd(kept: through_keeper.Kept, timeout: float = 10) -> None:
    try:
        ready, _, _ = select.select([kept.pidfd], [], [], timeout)
        assert ready, "the keeper did not end"
    finally:
        os.close(kept.pidfd)


def test_a_served_keeper_keeps_the_job_as_an_executed_one_does(tmp_path, server):
    kept = served_job(
        server,
        tmp_path / "job",
        ["/bin/sh", "-c", 'printf "%s|" "$0" "$1" "$FOO"; exit 3', "", "a b"],
        env={"PATH": "/usr/bin:/bin", "FOO": "x=y"},
    )
    # Forked by the server, not the worker's child: watched by its pidfd.
    assert kept.keeper is None and kept.keeper_pid not in children()
    assert kept.pid != kept.keeper_pid
    ended_by_pidfd(kept)
    ended = through_keeper.read_exit(str(tmp_path / "job"))
    assert (ended.returncode, ended.start_error) == (3, None)
    assert (tmp_path / "job" / "output").read_bytes() == b"|a b|x=y|"


def test_a_served_keeper_tells_a_failed_exec_in_the_exit_file(tmp_path, server):
    kept = served_job(server, tmp_path / "job", ["/nonexistent/program"])
    ended_by_pidfd(kept)
    ended = through_keeper.read_exit(str(tmp_path / "job"))
    failure = through_keeper.start_failure(*ended.start_error, "/nonexistent/program")
    assert isinstance(failure, FileNotFoundError)


def test_a_served_keeper_holds_what_it_is_given_and_the_job_does_not(tmp_path, server):
    lock = os.open(tmp_path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        kept = served_job(
            server,
            tmp_path / "job",
            ["/bin/sh", "-c", "ls /proc/self/fd; sleep 0.3"],
            hold_fds=(lock,),
        )
    finally:
        os.close(lock)  # the keeper's copy holds the lock on
    other = os.open(tmp_path / "lock", os.O_RDWR | os.O_CLOEXEC)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        ended_by_pidfd(kept)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once it ended
    finally:
        os.close(other)
    # The job saw its stdio and the descriptor ls opened: nothing of the
    # keeper's.
    assert (tmp_path / "job" / "output").read_bytes().split() == [
        b"0",
        b"1",
        b"2",
        b"3",
    ]


def test_served_keepers_outlive_the_server(tmp_path):
    served = through_keeper.KeeperServer()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kept = served_job(
        served, tmp_path / "job", ["/bin/sh", "-c", f"read word < {fifo}; echo $word"]
    )
    served.close()  # the server exits (close() reaps it)
    assert alive(kept.keeper_pid) and alive(kept.pid)
    release(fifo)
    ended_by_pidfd(kept)
    ended = through_keeper.read_exit(str(tmp_path / "job"))
    assert (ended.returncode, ended.output_bytes) == (0, 3)


SERVED_WORKER = """
import os, signal, sys
from worker import kept as through_keeper

job_dir, script = sys.argv[1:]
server = through_keeper.KeeperServer()
kept = through_keeper.spawn_kept(
    ["/bin/sh", "-c", script], cwd="/", env={"PATH": "/usr/bin:/bin"},
    user=None, group=None, cgroup_procs=None, cgroup_kill=None, job_dir=job_dir,
    output_name="output", head_bytes=1 << 20, tail_bytes=1 << 20, drain_s=5,
    server=server,
)
print(server.pid, kept.keeper_pid, kept.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_server_exits_with_its_worker_and_the_job_runs_on(tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    with adopting_orphans():
        worker = run_dying_worker(SERVED_WORKER, job_dir)
        assert worker.returncode == -signal.SIGKILL
        server_pid, keeper_pid, job_pid = map(int, worker.stdout.split())
        assert alive(job_pid)  # the worker is gone, the job is not
        # The server saw its socket close and exited; the keeper did not.
        _, status = os.waitpid(server_pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        _, status = os.waitpid(keeper_pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ended = through_keeper.read_exit(str(job_dir))
    assert (ended.returncode, ended.output_bytes) == (5, 6)
    assert (job_dir / "output").read_bytes() == b"after\n"


def test_a_server_that_is_gone_starts_nothing_and_says_so(tmp_path):
    served = through_keeper.KeeperServer()
    os.kill(served.pid, signal.SIGKILL)
    os.waitpid(served.pid, 0)
    with pytest.raises(through_keeper.ServerGone):
        served_job(served, tmp_path / "job", ["/bin/true"])
    assert new_children() == []
    served.closed = True  # reaped above


def test_a_start_too_big_for_the_server_is_refused_and_the_server_serves_on(
    tmp_path, server
):
    big = {"PATH": "/usr/bin:/bin", "BIG": "x" * (1 << 20)}
    with pytest.raises(through_keeper.ServerGone) as refused:
        served_job(server, tmp_path / "big", ["/bin/true"], env=big)
    assert refused.value.usable
    kept = served_job(server, tmp_path / "job", ["/bin/sh", "-c", "echo ok"])
    ended_by_pidfd(kept)
    assert (tmp_path / "job" / "output").read_bytes() == b"ok\n"


def test_a_served_keeper_shows_its_jobs_environment_and_arguments(tmp_path, server):
    # The job's processes, its keeper among them, are found by the job's
    # environment, as when the keeper is executed with it.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kept = served_job(
        server,
        tmp_path / "job",
        ["/bin/sh", "-c", f"read word < {fifo}"],
        env={"PATH": "/usr/bin:/bin", "JOBGATE_JOB_ID": "j-1"},
    )
    try:
        environ = Path(f"/proc/{kept.keeper_pid}/environ").read_bytes()
        assert environ.rstrip(b"\0").split(b"\0") == [
            b"PATH=/usr/bin:/bin",
            b"JOBGATE_JOB_ID=j-1",
        ]
        cmdline = Path(f"/proc/{kept.keeper_pid}/cmdline").read_bytes()
        words = cmdline.rstrip(b"\0").split(b"\0")
        assert words[:2] == [b"jobgate-keeper", b"--report"]
        assert words[-2:] == [b"-c", f"read word < {fifo}".encode()]
    finally:
        release(fifo)
        ended_by_pidfd(kept)


def test_a_job_environment_too_big_to_show_is_not_served(tmp_path, server):
    env = {"PATH": "/usr/bin:/bin", "BIG": "x" * through_keeper.KeeperServer.ENV_ROOM}
    with pytest.raises(through_keeper.ServerGone) as refused:
        served_job(server, tmp_path / "job", ["/bin/true"], env=env)
    assert refused.value.usable


# -- spares: keepers forked ahead, with their job's directory --------------------


def spares(server: through_keeper.KeeperServer) -> list[int]:
    """The server's spares: its children that wait for a request, as ps
    shows them (the rest of the room for a job's arguments is NULs)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if (
            int(fields[1]) == server.pid
            and cmdline.rstrip(b"\0") == b"jobgate-keeper\0--spare"
        ):
            found.append(int(entry))
    return found


def spare_pid(server: through_keeper.KeeperServer, *but: int) -> int:
    """The pid of the spare waiting for ``server`` (none of ``but``)."""

    def waiting() -> list[int]:
        return [pid for pid in spares(server) if pid not in but]

    wait_until(waiting, what="a spare")
    (pid,) = waiting()
    return pid


@contextlib.contextmanager
def serving(tmp_path: Path, **kw) -> Iterator[tuple[Path, through_keeper.KeeperServer]]:
    """A keeper server whose keepers make jobs' directories in ``jobs``."""
    jobs = tmp_path / "jobs"
    jobs.mkdir(exist_ok=True)
    served = through_keeper.KeeperServer(jobs_dir=str(jobs), **kw)
    try:
        yield jobs, served
    finally:
        served.close()


def test_a_spare_takes_the_start_and_makes_the_directory_only_when_needed(tmp_path):
    made_here: list[str] = []
    with serving(tmp_path) as (jobs, served):
        first = spare_pid(served)
        assert os.listdir(jobs) == []  # a spare makes nothing ahead
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        argv = ["/bin/sh", "-c", f"read word < {fifo}; echo ok"]
        kept = served_job(served, jobs / "job-1", argv, make_dir=made_here.append)
        # The spare that took the start is the job's keeper; the directory
        # is made by neither the caller nor the keeper until the job writes.
        assert kept.keeper_pid == first and made_here == []
        assert kept.keeper_start == linux.start_time(first)  # it still runs
        assert os.listdir(jobs) == []
        release(fifo)
        ended_by_pidfd(kept)
        assert (jobs / "job-1" / "output").read_bytes() == b"ok\n"
        assert through_keeper.read_exit(str(jobs / "job-1")).returncode == 0
        spare_pid(served, first)  # the next one waits
        # A job that writes nothing gets its directory for the exit file.
        kept = served_job(
            served, jobs / "job-2", ["/bin/true"], make_dir=made_here.append
        )
        ended_by_pidfd(kept)
        assert os.listdir(jobs / "job-2") == ["exit"]
    assert sorted(os.listdir(jobs)) == ["job-1", "job-2"]


def channel_job(
    server: through_keeper.KeeperServer, jobs: Path, name: str, argv: list[str]
) -> through_keeper.Kept:
    kept = served_job(server, jobs / name, argv, make_dir=os.mkdir, channel=True)
    assert kept.channel is not None
    return kept


def told_and_answered(kept: through_keeper.Kept) -> through_keeper.KeeperExit:
    """The job's end as its keeper sends it on the channel, answered."""
    ready, _, _ = select.select([kept.channel], [], [], 10)
    assert ready, "the end never came"
    ended = through_keeper.parse_exit(os.read(kept.channel, 4096))
    # It waits for the answer: a later run of the worker would need it.
    assert alive(kept.keeper_pid)
    os.write(kept.channel, b"k")
    os.close(kept.channel)
    os.close(kept.pidfd)
    return ended


def test_the_end_told_on_the_channel_and_taken_leaves_no_exit_file(tmp_path):
    with serving(tmp_path) as (jobs, served):
        kept = channel_job(served, jobs, "quiet", ["/bin/sh", "-c", "exit 4"])
        ended = told_and_answered(kept)
        assert (ended.returncode, ended.output_bytes) == (4, 0)
        # Answered, the keeper waits for another job instead of exiting,
        # beside the spare forked at its start:
        wait_until(lambda: len(spares(served)) == 2, what="the keepers waiting")
        assert kept.keeper_pid in spares(served)
        assert os.listdir(jobs) == []  # no directory, no exit file: no inode
        first = kept.keeper_pid
        kept = channel_job(served, jobs, "loud", ["/bin/echo", "hi"])
        assert told_and_answered(kept).output_bytes == 3
        assert os.listdir(jobs / "loud") == ["output"]
        # The next starts go to the keepers waiting: no keeper is forked.
        wait_until(lambda: len(spares(served)) == 2, what="the keepers' return")
        kept = channel_job(served, jobs, "again", ["/bin/sh", "-c", "exit 0"])
        assert told_and_answered(kept).returncode == 0
        wait_until(lambda: len(spares(served)) == 2, what="the keepers' return")
        assert first in spares(served)


def test_a_keeper_back_from_its_job_waits_only_so_long(tmp_path):
    with serving(tmp_path, idle_s=2.0) as (jobs, served):
        kept = channel_job(served, jobs, "one", ["/bin/true"])
        told_and_answered(kept)
        wait_until(lambda: kept.keeper_pid in spares(served), what="its return")
        # Nothing to keep: it leaves, and the spare forked at its start stays.
        wait_until(lambda: not alive(kept.keeper_pid), what="its leaving")
        wait_until(lambda: len(spares(served)) == 1, what="the spare alone")
        kept = channel_job(served, jobs, "two", ["/bin/sh", "-c", "exit 3"])
        assert told_and_answered(kept).returncode == 3
    # With no wait at all, a keeper exits with its job, as it did before.
    with serving(tmp_path, idle_s=0) as (jobs, served):
        kept = channel_job(served, jobs, "three", ["/bin/true"])
        pid = kept.keeper_pid
        told_and_answered(kept)
        wait_until(lambda: not alive(pid), what="the keeper's end")


def test_a_keeper_back_from_its_job_holds_nothing_of_it(tmp_path):
    lock = tmp_path / "lock"
    lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    with serving(tmp_path) as (jobs, served):
        kept = served_job(
            served,
            jobs / "job",
            ["/bin/echo", "hi"],
            make_dir=os.mkdir,
            channel=True,
            hold_fds=(lock_fd,),
        )
        os.close(lock_fd)  # the keeper holds the lock now
        told_and_answered(kept)
        wait_until(lambda: kept.keeper_pid in spares(served), what="its return")
        # The lock of the job's user id went with the job, and so did every
        # other descriptor of it: the output file and its directory.
        other = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
        held = {
            os.readlink(f"/proc/{kept.keeper_pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{kept.keeper_pid}/fd")
        }
        assert str(lock) not in held
        assert not any(path.startswith(str(jobs / "job")) for path in held), held


def test_an_end_nobody_takes_from_the_channel_goes_to_the_exit_file(tmp_path):
    with serving(tmp_path) as (jobs, served):
        # The worker went (a restart) while the job ran.
        kept = channel_job(served, jobs, "left", ["/bin/sh", "-c", "sleep 0.2; exit 5"])
        os.close(kept.channel)
        ended_by_pidfd(kept)
        assert through_keeper.read_exit(str(jobs / "left")).returncode == 5
        # The worker read the end, then went before it answered.
        kept = channel_job(served, jobs, "unanswered", ["/bin/sh", "-c", "exit 6"])
        select.select([kept.channel], [], [], 10)
        assert through_keeper.parse_exit(os.read(kept.channel, 4096)).returncode == 6
        os.close(kept.channel)
        ended_by_pidfd(kept)
        assert through_keeper.read_exit(str(jobs / "unanswered")).returncode == 6


def test_a_directory_elsewhere_is_made_by_the_caller(tmp_path, server):
    made: list[str] = []

    def make(path: str) -> None:
        made.append(path)
        os.mkdir(path)

    # The server was started without jobs_dir: its spares make none.
    kept = served_job(server, tmp_path / "job", ["/bin/true"], make_dir=make)
    ended_by_pidfd(kept)
    assert made == [str(tmp_path / "job")]
    assert through_keeper.read_exit(str(tmp_path / "job")).returncode == 0


def test_a_killed_spare_is_replaced_and_a_killed_server_takes_its_spare_along(
    tmp_path,
):
    with serving(tmp_path) as (jobs, served):
        first = spare_pid(served)
        os.kill(first, signal.SIGKILL)  # out of memory, say
        spare_pid(served, first)  # its successor
        kept = served_job(served, tmp_path / "job", ["/bin/sh", "-c", "exit 4"])
        ended_by_pidfd(kept)
        assert through_keeper.read_exit(str(tmp_path / "job")).returncode == 4
        waiting = spare_pid(served, kept.keeper_pid, first)
        os.kill(served.pid, signal.SIGKILL)
        os.waitpid(served.pid, 0)
        served.closed = True  # reaped above
        # The spare dies with its server (it has no job yet): nothing takes
        # a start any more.
        wait_until(lambda: not alive(waiting), what="the spare's end")
