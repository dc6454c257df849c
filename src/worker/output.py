"""A job's output on disk, capped: the head and the tail are kept.

Offsets are positions in everything the job wrote. The first ``head_bytes``
go to ``output.log``; after that, bytes go to ``output.tail``, a ring of
``tail_bytes`` that always holds the newest output. Both live in the job's
directory, made with the first byte: a job that writes nothing leaves no
file. What falls out of the ring
between the two is dropped and counted, so a job writing without end costs at
most ``head_bytes + tail_bytes`` of disk and no memory beyond one chunk.

The writer calls :meth:`append`; readers call :meth:`read`. Reads of the ring
take the log's lock, so the writer never overwrites bytes mid-read; reads of
the head need none, since the head never changes once written.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from worker import linux

HEAD_NAME = "output.log"
TAIL_NAME = "output.tail"
# A kept job's output (KeptOutput): one sparse file.
DATA_NAME = "output.data"
# The keeper's exit file before it is renamed "exit" (worker.kept), and the
# room kept for it.
EXIT_TMP_NAME = "exit.tmp"
EXIT_RESERVE_BYTES = 4096


class OutputLog:
    def __init__(
        self, directory: Path, head_bytes: int, tail_bytes: int, total: int = 0
    ):
        self.directory = directory
        self.head_path = directory / HEAD_NAME
        self.tail_path = directory / TAIL_NAME
        self.head_bytes = head_bytes
        self.tail_bytes = tail_bytes
        self.total = total
        self.lock = threading.Lock()
        self._head_fd: int | None = None
        self._tail_fd: int | None = None

    # -- writing (one writer) -------------------------------------------------

    def _make_directory(self) -> None:
        try:
            os.mkdir(self.directory, 0o750)
        except FileExistsError:
            pass

    def open_for_append(self) -> None:
        """Open the head for writing; :meth:`append` does it when first needed."""
        self._make_directory()
        self._head_fd = os.open(
            self.head_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
        )

    def append(self, data: bytes) -> None:
        with self.lock:
            pos = self.total
            if pos < self.head_bytes:
                if self._head_fd is None:
                    self.open_for_append()
                part = data[: self.head_bytes - pos]
                write_all(self._head_fd, part)
                pos += len(part)
                data = data[len(part) :]
            if data:
                if self._tail_fd is None:
                    if self._head_fd is None:  # no head is kept at all
                        self._make_directory()
                    self._tail_fd = os.open(
                        self.tail_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
                    )
                ring = self.tail_bytes
                if len(data) > ring:  # only the newest `ring` bytes can be kept
                    pos += len(data) - ring
                    data = data[-ring:]
                start = (pos - self.head_bytes) % ring
                first = data[: ring - start]
                _pwrite_all(self._tail_fd, first, start)
                if len(first) < len(data):
                    _pwrite_all(self._tail_fd, data[len(first) :], 0)
                pos += len(data)
            self.total = pos

    def close(self) -> None:
        """Close the writer's files; reading goes on (each read opens them)."""
        with self.lock:  # a reader of the ring may be using the tail's fd
            fds = (self._head_fd, self._tail_fd)
            self._head_fd = self._tail_fd = None
            for fd in fds:
                if fd is not None:
                    os.close(fd)

    # -- reading --------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return max(0, self.total - self.head_bytes - self.tail_bytes)

    def read(self, pos: int, limit: int, total: int) -> tuple[int, bytes]:
        """Up to ``limit`` bytes from ``pos``, given ``total`` bytes are written.

        Returns ``(start, data)``: ``start`` is ``pos`` unless ``pos`` lies in
        the dropped gap, in which case reading resumes where the tail begins.
        """
        if pos < min(total, self.head_bytes):
            end = min(pos + limit, total, self.head_bytes)
            with open(self.head_path, "rb") as f:
                f.seek(pos)
                return pos, f.read(end - pos)
        with self.lock:
            kept_from = max(self.head_bytes, self.total - self.tail_bytes)
            pos = max(pos, kept_from)
            end = min(pos + limit, total, self.total)
            if end <= pos:
                return pos, b""
            ring = self.tail_bytes
            start = (pos - self.head_bytes) % ring
            n = end - pos
            fd = self._tail_fd
            if fd is not None:  # the writer's
                return pos, _pread_ring(fd, start, n, ring)
            # A finished job's log: opened for this read only, so that no
            # descriptor stays open per job once it has ended.
            fd = os.open(self.tail_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return pos, _pread_ring(fd, start, n, ring)
            finally:
                os.close(fd)

    def recover(self) -> int:
        """Recompute ``total`` from the files after the writer died unexpectedly.

        The ring's start is unknown once it has wrapped, so a wrapped tail is
        discarded; returns the total that can still be served.
        """
        head = self.head_path.stat().st_size if self.head_path.exists() else 0
        tail = self.tail_path.stat().st_size if self.tail_path.exists() else 0
        if tail >= self.tail_bytes:
            self.tail_path.unlink()
            tail = 0
        self.total = head + tail
        return self.total


class KeptOutput:
    """A kept job's output: one file its keeper writes, capped in place.

    The keeper (``jobgate-keeper``, :mod:`worker.kept`) writes everything
    the job writes at its position in the file, so the file's size is the
    job's ``total`` and an offset is a position in the file. Of what lies
    beyond the first ``head_bytes``, the keeper deallocates all but the
    newest ``tail_bytes`` (it punches holes): the file is sparse and its disk
    use stays about ``head_bytes + tail_bytes``, whatever its size. The
    keeper makes the file with the job's first byte: a job that wrote
    nothing has none.

    The worker never writes it: it only reads, and learns of new bytes with
    :meth:`refresh` (on an inotify event of the job's directory,
    :mod:`worker.linux`). A read of the
    tail checks the size again afterwards: bytes the keeper may have
    deallocated meanwhile are dropped from the answer, as the ring of
    :class:`OutputLog` would have overwritten them.
    """

    def __init__(self, directory: Path, head_bytes: int, tail_bytes: int):
        self.directory = directory
        self.path = directory / DATA_NAME
        self.head_bytes = head_bytes
        self.tail_bytes = tail_bytes
        self.total = 0
        self.lock = threading.Lock()
        self._fd: int | None = None  # for reading, while the job runs

    def refresh(self) -> int:
        """Read the size again; how many bytes the output grew by."""
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            size = os.fstat(self._fd).st_size
        except FileNotFoundError:
            return 0
        with self.lock:
            grew = max(0, size - self.total)
            self.total += grew
        return grew

    def recover(self) -> int:
        """The size on disk, for a finished job's record after a restart."""
        try:
            self.total = self.path.stat().st_size
        except FileNotFoundError:
            self.total = 0
        return self.total

    def close(self) -> None:
        with self.lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    @property
    def dropped(self) -> int:
        return max(0, self.total - self.head_bytes - self.tail_bytes)

    def _kept_from(self, total: int) -> int:
        return max(self.head_bytes, total - self.tail_bytes)

    def read(self, pos: int, limit: int, total: int) -> tuple[int, bytes]:
        """Up to ``limit`` bytes from ``pos`` (see :meth:`OutputLog.read`)."""
        try:
            f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed below
        except FileNotFoundError:  # the job wrote nothing (yet)
            return pos, b""
        with f:
            fd = f.fileno()
            while True:
                if pos >= self.head_bytes:
                    pos = max(pos, self._kept_from(total))
                end = min(pos + limit, total)
                if pos < self.head_bytes:
                    end = min(end, self.head_bytes)  # the head never changes
                if end <= pos:
                    return pos, b""
                data = os.pread(fd, end - pos, pos)
                if pos < self.head_bytes:
                    return pos, data
                # What lies below the newest tail now may have been punched
                # while it was read: it reads as zeros, never as output.
                total = max(total, os.fstat(fd).st_size)
                kept = self._kept_from(total)
                if kept <= pos:
                    return pos, data
                if kept < pos + len(data):
                    return kept, data[kept - pos :]
                pos = kept  # all of it may be gone: read from the tail now


def make_job_directory(directory: Path | str) -> None:
    """Make ``directory`` with the keeper's ``exit.tmp``, a block allocated
    for it: the keeper writes the job's end into it in place, which a full
    disk cannot refuse.

    No more: on ext4 without a journal every new inode costs a scan past the
    inodes deleted lately (0.4-0.6 ms of CPU each on the bench host), and the
    output file is the keeper's to make once the job writes (bench scenario
    1, a job that writes nothing: two inodes per start instead of three).
    This is for a keeper the worker executes; one the keeper server forked
    makes the directory itself, only if the job writes or its end must go to
    an exit file (``job_dir()`` in ``keeper.c``), and the worker hears of
    the end on the job's channel: none at all for a job that writes nothing.
    """
    os.mkdir(directory, 0o750)
    fd = os.open(
        os.path.join(directory, EXIT_TMP_NAME),
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
        0o640,
    )
    try:
        os.posix_fallocate(fd, 0, EXIT_RESERVE_BYTES)
    finally:
        os.close(fd)


def prepare_jobs_dir(jobs_dir: Path) -> None:
    """Ready ``jobs_dir`` for kept jobs' directories, before the keeper
    server starts.

    The keepers make jobs' directories (``keeper.c``) in a block group of
    ext4's choosing, away from where inodes are freed
    (:func:`linux.spread_subdirectories` says what it buys). Earlier
    versions of the worker made them ahead of the start, as ``.spare-<pid>``
    (the server's spares) or ``.stock-`` (a thread of the worker): what they
    left is removed here.
    """
    linux.spread_subdirectories(str(jobs_dir))
    for prefix in (".spare-", ".stock-"):
        for old in jobs_dir.glob(prefix + "*"):
            shutil.rmtree(old, ignore_errors=True)


def _pread_ring(fd: int, start: int, n: int, ring: int) -> bytes:
    """``n`` bytes of a ring of ``ring`` bytes from ``start``, wrapping once."""
    data = os.pread(fd, min(n, ring - start), start)
    if len(data) < n:
        data += os.pread(fd, n - len(data), 0)
    return data


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``; a short write (the disk filling up) is retried."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _pwrite_all(fd, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def read_chunks(
    job,
    offset: int,
    chunk: int,
    follow: bool,
    cancelled: Callable[[], bool],
    keepalive_s: float | None,
) -> Iterator[tuple[int, bytes, int]]:
    """``(offset, data, skipped)`` chunks of a job's output from ``offset``,
    at most ``chunk`` bytes each (:meth:`worker.runner.JobRunner.read_output`).

    ``job`` is a :class:`worker.job.Job`: its ``output`` log, and its ``cond``
    that guards ``sealed`` (no more output will come) and is notified as
    output arrives.
    """
    pos = offset
    while True:
        idle = False
        with job.cond:
            while follow and not job.sealed and job.output.total <= pos:
                if cancelled():
                    break
                if not job.cond.wait(keepalive_s) and keepalive_s is not None:
                    idle = True
                    break
            sealed = job.sealed
            available = job.output.total
        if cancelled():
            return
        if pos >= available:
            if sealed or not follow:
                return
            if idle:
                yield pos, b"", 0
            continue
        start, data = job.output.read(pos, chunk, available)
        if not data:
            return  # nothing readable where the record says there is
        yield start, data, start - pos
        pos = start + len(data)
