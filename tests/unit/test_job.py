"""The job state machine, driven directly: no process, no runner."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from jobgate.jobstate import ExitReason, JobState
from worker.job import Job, JobRecord, Phase, TransitionError
from worker.output import OutputLog


class FakeProc:
    pid = 4242
    stdout = None


@pytest.fixture
def clock():
    ticks = itertools.count(1000)
    return lambda: float(next(ticks))


@pytest.fixture
def make_job(tmp_path, clock):
    def make() -> Job:
        record = JobRecord(
            job_id="00000000-0000-4000-8000-000000000001",
            command="bash",
            path="x.sh",
            args=[],
            state=JobState.RUNNING,
            started_at=clock(),
        )
        output = OutputLog(Path(tmp_path) / "out", 1024, 4096)
        return Job(record, output.directory, output, clock=clock)

    return make


def running(job: Job) -> Job:
    assert job.started(FakeProc()) is None
    return job


def ended(job: Job) -> JobRecord:
    job.end("test")
    return job.seal()


def test_a_job_that_runs_and_exits_goes_through_every_phase(make_job):
    job = running(make_job())
    assert not job.exited(0)  # its output is still open
    assert job.output_closed("its output ended")
    record = ended(job)
    assert [t.new for t in job.history] == [
        Phase.RUNNING,
        Phase.EXITED,
        Phase.DRAINED,
        Phase.ENDED,
    ]
    assert [t.why for t in job.history][2] == "its output ended"
    assert (record.state, record.exit_reason) == (
        JobState.SUCCEEDED,
        ExitReason.SUCCEEDED,
    )
    assert (record.exit_code, record.signal, record.pid) == (0, None, 4242)
    assert record.reason == "exited with code 0"


def test_output_closed_before_the_exit_is_drained_at_the_exit(make_job):
    job = running(make_job())
    assert not job.output_closed("its output ended")
    assert job.phase is Phase.RUNNING
    assert job.exited(3)
    assert job.phase is Phase.DRAINED
    record = ended(job)
    assert (record.state, record.exit_code) == (JobState.FAILED, 3)
    assert record.reason == "exited with code 3"


def test_a_signal_nobody_here_sent_is_killed_with_its_name(make_job):
    job = running(make_job())
    job.exited(-9)
    job.output_closed("eof")
    record = ended(job)
    assert (record.state, record.exit_reason) == (JobState.FAILED, ExitReason.KILLED)
    assert (record.exit_code, record.signal) == (None, 9)
    assert record.reason == "killed by SIGKILL"


def test_stop_during_start_takes_effect_once_the_process_runs(make_job):
    job = make_job()
    assert not job.request_stop(ExitReason.STOPPED, "stopped by ops", "ops")
    assert job.phase is Phase.STARTING
    pending = job.started(FakeProc())
    assert pending == (ExitReason.STOPPED, "stopped by ops")
    assert job.phase is Phase.STOPPING
    job.exited(-15)
    job.output_closed("eof")
    record = ended(job)
    assert (record.state, record.stopped_by) == (JobState.STOPPED, "ops")
    assert record.signal == 15


def test_exit_during_stop_is_still_stopped(make_job):
    job = running(make_job())
    assert job.request_stop(ExitReason.STOPPED, "stopped on request by ops", "ops")
    job.exited(0)  # it exited on its own within the grace
    job.output_closed("eof")
    record = ended(job)
    assert (record.state, record.exit_reason) == (JobState.STOPPED, ExitReason.STOPPED)
    assert record.reason == "stopped on request by ops"
    assert record.stopped_at is not None


def test_a_stop_after_the_exit_changes_nothing(make_job):
    job = running(make_job())
    job.exited(0)
    assert not job.request_stop(ExitReason.STOPPED, "too late", "ops")
    job.output_closed("eof")
    record = ended(job)
    assert record.state is JobState.SUCCEEDED
    assert (record.stopped_by, record.stopped_at) == ("", None)


def test_timeout_and_stop_at_once_the_first_wins(make_job):
    job = running(make_job())
    assert job.request_stop(ExitReason.TIMED_OUT, "ran longer than its timeout")
    assert not job.request_stop(ExitReason.STOPPED, "stopped by ops", "ops")
    job.exited(-15)
    job.output_closed("eof")
    record = ended(job)
    assert (record.state, record.reason) == (
        JobState.TIMED_OUT,
        "ran longer than its timeout",
    )
    assert record.stopped_by == ""


@pytest.mark.parametrize(
    ("phase", "signal_now"),
    [
        (Phase.STARTING, False),
        (Phase.RUNNING, True),
        (Phase.STOPPING, False),
        (Phase.EXITED, False),
        (Phase.DRAINED, False),
        (Phase.ENDED, False),
    ],
)
def test_shutdown_meets_a_job_in_every_phase(make_job, phase, signal_now):
    job = make_job()
    steps = {
        Phase.RUNNING: [lambda: job.started(FakeProc())],
        Phase.STOPPING: [
            lambda: job.started(FakeProc()),
            lambda: job.request_stop(ExitReason.TIMED_OUT, "timeout"),
        ],
        Phase.EXITED: [lambda: job.started(FakeProc()), lambda: job.exited(0)],
        Phase.DRAINED: [
            lambda: job.started(FakeProc()),
            lambda: job.exited(0),
            lambda: job.output_closed("eof"),
        ],
        Phase.ENDED: [lambda: job.end("start failed")],
    }
    for step in steps.get(phase, []):
        step()
    assert job.phase is phase
    shutdown = (ExitReason.STOPPED, "stopped because the worker shut down")
    assert job.request_stop(*shutdown, "the worker") is signal_now
    if phase is Phase.STARTING:
        assert job.started(FakeProc()) == shutdown
    if phase in (Phase.EXITED, Phase.DRAINED):
        job.output_closed("eof")
        assert ended(job).state is JobState.SUCCEEDED  # it ends on its own


def test_a_change_the_table_does_not_allow_is_refused_with_its_reason(make_job):
    job = running(make_job())
    with pytest.raises(TransitionError, match="cannot go from running to drained"):
        job.change(Phase.DRAINED, "a bug")
    assert job.phase is Phase.RUNNING
    job.end("first")
    assert not job.end("second")
    with pytest.raises(TransitionError, match="cannot go from ended to running"):
        job.change(Phase.RUNNING, "a bug")
    assert [t.why for t in job.history] == ["process 4242 spawned", "first"]


def test_output_that_could_not_be_kept_fails_a_job_that_succeeded(make_job):
    job = running(make_job())
    assert job.output_failed("could not write output: No space left on device")
    assert not job.output_failed("a later error")  # the first one is kept
    job.exited(0)
    job.output_closed("eof")
    record = ended(job)
    assert (record.state, record.exit_reason) == (
        JobState.FAILED,
        ExitReason.OUTPUT_FAILED,
    )
    assert record.exit_code == 0
    assert record.reason == (
        "could not write output: No space left on device (exited with code 0)"
    )


def test_a_stopped_job_stays_stopped_and_names_its_lost_output(make_job):
    job = running(make_job())
    job.request_stop(ExitReason.STOPPED, "stopped on request by ops", "ops")
    job.output_failed("could not write output: Input/output error")
    job.exited(-15)
    job.output_closed("eof")
    record = ended(job)
    assert record.state is JobState.STOPPED
    assert record.reason == (
        "stopped on request by ops; could not write output: Input/output error"
    )


def test_an_imposed_start_failure_has_no_exit_of_its_own(make_job):
    job = running(make_job())
    job.end("cannot watch", forced=(ExitReason.START_FAILED, "no descriptors"))
    job.returncode = -9  # the worker killed it
    record = job.seal()
    assert (record.state, record.exit_reason) == (
        JobState.FAILED,
        ExitReason.START_FAILED,
    )
    assert (record.exit_code, record.signal, record.reason) == (
        None,
        None,
        "no descriptors",
    )


def test_a_process_that_could_not_join_its_cgroup_is_a_start_failure(make_job):
    job = running(make_job())
    job.exited(125)
    job.output_closed("eof")
    job.start_error = "could not move the job into its cgroup"
    record = ended(job)
    assert record.exit_reason is ExitReason.START_FAILED
    assert record.reason == "could not move the job into its cgroup"
