"""The worker's job records on disk: one append-only file of JSON lines.

Every change of a job's record (its start, its end, a job found lost) is
appended to ``<state_dir>/jobs/records.jsonl`` as one line, in one ``write``;
the last line of a job wins. A job removed by retention gets a line
``{"job_id": ..., "removed": true}``. When the file holds many more lines than
there are jobs, it is rewritten with one line per job into a temporary file
that replaces it (``rename``), so a crash mid-way leaves the old file whole.

Why one file rather than a ``job.json`` per job: making a file or a directory
is the dearest thing a start did on the disk. A start now writes one line to
a file that is already open; a job's directory is made only when it has output
to keep (:mod:`worker.output`). On ext4 without a journal each new inode also
scans past every inode deleted in the last minutes, so a busy worker that made
and replaced files for every job paid more for each start the busier it was.
What it bought (bench scenario 1): the worker's system CPU 0.1-0.5 ms per
start against 0.7-2.5 ms, and start p50 2.25 against 4.09 ms.

Like the per-job files before it, a line is in the kernel's page cache once
``write`` returns: it survives the worker's crash, not the host's power loss.
A line cut short (a full disk, a power loss) is skipped with a warning when
the file is read again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from worker.output import write_all

log = logging.getLogger(__name__)

FILE_NAME = "records.jsonl"
# A rewrite is due once the file has this many lines beyond two per job.
COMPACT_SLACK_LINES = 1024


class RecordLog:
    """The latest record of every job, kept in memory and on disk."""

    def __init__(self, directory: Path, slack_lines: int = COMPACT_SLACK_LINES):
        self.path = directory / FILE_NAME
        self._tmp = directory / (FILE_NAME + ".tmp")
        self._slack = slack_lines
        self._lock = threading.Lock()
        self._latest: dict[str, bytes] = {}  # job id -> its last line
        self._lines = 0  # lines in the file
        self._fd: int | None = None
        self._torn = False  # the last write stopped mid-line

    # -- reading ------------------------------------------------------------------

    def load(self) -> list[dict]:
        """The last record of each job the file holds, in the order first seen.

        Lines that are not a record (cut short, or edited by hand) are skipped
        with one warning that says how many and where; empty lines silently.
        Reading leaves this log as it is: :meth:`reset` makes what was read
        its content.
        """
        latest: dict[str, dict] = {}
        bad: list[int] = []
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return []
        with f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    job_id = record["job_id"]
                    if not isinstance(job_id, str):
                        raise TypeError("job_id is not a string")
                except (ValueError, TypeError, KeyError):
                    bad.append(number)
                    continue
                if record.get("removed") is True:
                    latest.pop(job_id, None)
                else:
                    latest[job_id] = record
        if bad:
            log.warning(
                "%s: skipped %d line(s) that are not job records (line %s%s)",
                self.path,
                len(bad),
                ", ".join(map(str, bad[:5])),
                " ..." if len(bad) > 5 else "",
            )
        return list(latest.values())

    def __len__(self) -> int:
        return len(self._latest)

    # -- writing ------------------------------------------------------------------

    def write(self, record: dict) -> None:
        """Append ``record`` (it carries its ``job_id``) as the job's latest.

        Raises OSError when the line cannot be written (a full disk).
        """
        line = _line(record)
        with self._lock:
            self._append(line)
            self._latest[record["job_id"]] = line
            self._compact_if_due()

    def remove(self, job_ids: Iterable[str]) -> None:
        """Forget these jobs (retention): one line each, in one write."""
        with self._lock:
            ids = [j for j in job_ids if self._latest.pop(j, None) is not None]
            if not ids:
                return
            data = b"".join(_line({"job_id": j, "removed": True}) for j in ids)
            self._append(data, len(ids))
            self._compact_if_due()

    def reset(self, records: Iterable[dict]) -> None:
        """Make ``records`` the whole content, one line each (after a load)."""
        with self._lock:
            self._latest = {r["job_id"]: _line(r) for r in records}
            self._rewrite()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- under _lock ----------------------------------------------------------------

    def _append(self, data: bytes, lines: int = 1) -> None:
        if self._fd is None:
            self._fd = os.open(
                self.path,
                os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                0o640,
            )
        if self._torn:
            # End what a failed write may have left, so this line stands
            # alone; a fragment is skipped when the file is read, and an
            # empty line ignored.
            data = b"\n" + data
        try:
            write_all(self._fd, data)
        except OSError:
            self._torn = True
            raise
        self._torn = False
        self._lines += lines

    def _compact_if_due(self) -> None:
        if self._lines > 2 * len(self._latest) + self._slack:
            try:
                self._rewrite()
            except OSError as exc:  # the appends go on; retried at the next due
                log.error("%s: could not rewrite it: %s", self.path, exc)

    def _rewrite(self) -> None:
        data = b"".join(self._latest.values())
        fd = os.open(
            self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640
        )
        try:
            write_all(fd, data)
        except BaseException:
            os.close(fd)
            os.unlink(self._tmp)
            raise
        os.close(fd)
        os.replace(self._tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._lines = len(self._latest)
        self._torn = False


def _line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"
