"""The jobs of earlier runs of the worker, and which finished jobs to forget.

A restarted worker still answers for the jobs it ran before. A job that was
running when the worker stopped is ``lost``: it keeps the pid it had, and its
``ended_at`` is the last moment the worker is known to have been watching it
(the worker stamps its state directory every ``[jobs].alive_interval_s``
while it runs), or null when no such moment is known; never the time of the
restart, which says nothing about the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from jobgate.jobstate import ExitReason, JobState
from worker.job import Job, JobRecord, Phase
from worker.output import OutputLog
from worker.records import RecordLog

log = logging.getLogger(__name__)

ALIVE_NAME = "alive"
# Written with a kept job's record while it runs (worker.runner).
ADOPTION_KEYS = ("keeper", "account")


class AliveStamp:
    """A file whose mtime is the last moment the worker was running.

    Touched by the worker every ``[jobs].alive_interval_s``; read at the next
    start to date the jobs the worker lost.
    """

    def __init__(self, directory: Path):
        self.path = directory / ALIVE_NAME

    def last(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def touch(self) -> None:
        """Raises OSError (a full disk cannot stop a touch, an I/O error can)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.utime(fd)
        finally:
            os.close(fd)


def load(
    records: RecordLog,
    jobs_dir: Path,
    make_output: Callable[[Path, int, bool], OutputLog],
    last_alive: float | None,
) -> list[Job]:
    """Read the records a previous run left; jobs it was running are lost.

    Records of the earlier layout, a ``job.json`` in each job's directory,
    are taken over into the record file and their files removed.
    """
    found = records.load()
    known = {d["job_id"] for d in found}
    legacy = []  # taken over: removed once the record file holds them
    for path in sorted(jobs_dir.glob("*/job.json")):
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable job record %s: %s", path, exc)
            continue
        legacy.append(path)
        if d.get("job_id") not in known:
            found.append(d)
    jobs, kept = [], []
    for d in found:
        try:
            record = JobRecord.from_json(d)
            if record.job_id != str(uuid.UUID(record.job_id)):
                raise ValueError(f"job id {record.job_id!r} is not a UUID")
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("ignoring job record %r: %s", d.get("job_id"), exc)
            continue
        directory = jobs_dir / record.job_id
        kept_job = record.state is JobState.RUNNING and "keeper" in d
        output = make_output(directory, record.output_bytes, kept_job)
        job = Job(record, directory, output)
        if kept_job:
            # Kept: it may still run. The runner adopts it, or calls it lost.
            job.extra = {k: d[k] for k in ADOPTION_KEYS if k in d}
            kept.append(record.to_json() | job.extra)
        else:
            if record.state is JobState.RUNNING:
                _lose(job, last_alive)
            kept.append(record.to_json())
        jobs.append(job)
    # One line per job, the lost ones with their end; a line a crash cut
    # short is gone, so appends start on a line of their own.
    records.reset(kept)
    for path in legacy:
        with contextlib.suppress(OSError):
            path.unlink()
    if jobs:
        log.info("loaded %d job records from %s", len(jobs), jobs_dir)
    return jobs


def _lose(job: Job, last_alive: float | None) -> None:
    record = job.record
    mark_lost(record, last_alive)
    record.output_bytes = job.output.recover()
    job.change(Phase.ENDED, "lost when the worker stopped")
    job.done.set()
    log.warning(
        "job %s was running when the worker stopped: lost",
        record.job_id,
        extra={"JOB_ID": record.job_id},
    )


def lose(job: Job, last_alive: float | None, records: RecordLog) -> None:
    """A kept job that could not be adopted: its keeper is gone without a word."""
    _lose(job, last_alive)
    job.record.reason = (
        "the job was running when the worker stopped, and had ended without "
        "a record of its end when the worker came back (its keeper was "
        "killed, or the host restarted); ended_at is the last time the "
        "worker knew it running"
    )
    try:
        records.write(job.record.to_json())
    except OSError as exc:
        log.error("job %s: could not record it lost: %s", job.record.job_id, exc)


def mark_lost(record: JobRecord, last_alive: float | None) -> None:
    """End the record of a job the worker stopped watching (its pid stays).

    The worker knew the job running when it spawned it and at every stamp
    after: ``ended_at`` is the later of the two. A job without a pid may
    never have started; its end is not known.
    """
    record.state = JobState.LOST
    record.exit_reason = ExitReason.LOST
    if record.pid:
        record.ended_at = max(last_alive or 0.0, record.started_at)
        record.reason = (
            "the worker stopped while the job was running; ended_at is the "
            "last time the worker knew it running"
        )
    else:
        record.ended_at = None
        record.reason = (
            "the worker stopped while the job was starting; whether and when "
            "it ran is not known"
        )


def expired(
    finished: Iterable[Job], now: float, max_jobs: int, max_age_s: float
) -> list[Job]:
    """The finished jobs retention removes: beyond ``max_jobs``, or too old."""

    def ended(j: Job) -> float:
        return j.record.ended_at or j.record.started_at

    ordered = sorted(finished, key=ended)
    excess = max(0, len(ordered) - max_jobs)
    return ordered[:excess] + [
        j for j in ordered[excess:] if now - ended(j) > max_age_s
    ]
