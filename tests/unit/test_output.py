"""OutputLog alone: the kept head and tail of a job's output, and reads of them.

Every check compares against a model of what must be kept: of everything
written, the first ``head`` bytes and the newest ``tail`` bytes after them.
"""

from __future__ import annotations

import fcntl
import os
import random
import struct

import pytest

from worker import linux
from worker.output import (
    HEAD_NAME,
    TAIL_NAME,
    OutputLog,
    make_job_directory,
    prepare_jobs_dir,
)


def kept(data: bytes, head: int, tail: int) -> tuple[bytes, int, bytes]:
    """The model: (head kept, first offset of the kept tail, tail kept)."""
    tail_from = max(head, len(data) - tail)
    return data[:head], tail_from, data[tail_from:]


def read_all(log: OutputLog, pos: int = 0, limit: int = 7) -> list[tuple[int, bytes]]:
    """Read from ``pos`` to the end in ``limit``-byte reads: (start, data) each."""
    reads = []
    while pos < log.total:
        start, data = log.read(pos, limit, log.total)
        assert data, f"nothing read at {pos} of {log.total}"
        reads.append((start, data))
        pos = start + len(data)
    return reads


def served(log: OutputLog, pos: int = 0, limit: int = 7) -> list[tuple[int, bytes]]:
    """Contiguous runs of what reads return: [(start, bytes), ...]."""
    runs: list[tuple[int, bytes]] = []
    for start, data in read_all(log, pos, limit):
        if runs and runs[-1][0] + len(runs[-1][1]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + data)
        else:
            runs.append((start, data))
    return runs


def expected_runs(data: bytes, head: int, tail: int, pos: int = 0):
    head_kept, tail_from, tail_kept = kept(data, head, tail)
    runs = []
    if pos < len(head_kept):
        runs.append((pos, head_kept[pos:]))
    start = max(pos, tail_from)
    if start < len(data):
        part = data[start:]
        if runs and runs[-1][0] + len(runs[-1][1]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + part)
        else:
            runs.append((start, part))
    return runs


@pytest.fixture
def make_log(tmp_path):
    logs = []

    def make(head: int, tail: int) -> OutputLog:
        log = OutputLog(tmp_path, head, tail)
        log.open_for_append()
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close()


def test_output_within_the_head_is_kept_whole_without_a_tail_file(make_log, tmp_path):
    log = make_log(100, 16)
    log.append(b"hello ")
    log.append(b"world\n")
    assert log.total == 12 and log.dropped == 0
    assert served(log) == [(0, b"hello world\n")]
    assert (tmp_path / HEAD_NAME).read_bytes() == b"hello world\n"
    assert not (tmp_path / TAIL_NAME).exists()


@pytest.mark.parametrize("size", [9, 10, 11, 25, 26, 27, 42])
@pytest.mark.parametrize("chunk", [1, 3, 10, 16, 17, 100])
def test_head_and_tail_boundaries_are_exact(make_log, size, chunk):
    head, tail = 10, 16
    log = make_log(head, tail)
    data = bytes(range(65, 65 + size))
    for i in range(0, size, chunk):
        log.append(data[i : i + chunk])
    assert log.total == size
    assert log.dropped == max(0, size - head - tail)
    assert served(log) == expected_runs(data, head, tail)


@pytest.mark.parametrize("seed", range(20))
def test_ring_wraps_many_times_and_keeps_the_newest_bytes(make_log, seed):
    rng = random.Random(seed)
    head, tail = 10, 16
    log = make_log(head, tail)
    data = b""
    for _ in range(200):
        # Sizes around the ring's: shorter, equal, longer, and empty.
        size = rng.choice([0, 1, 2, 5, 15, 16, 17, 31, 40])
        chunk = bytes(rng.randrange(256) for _ in range(size))
        log.append(chunk)
        data += chunk
        assert log.total == len(data)
        assert log.dropped == max(0, len(data) - head - tail)
        limit = rng.choice([1, 3, 7, 16, 64])
        assert served(log, limit=limit) == expected_runs(data, head, tail)
    assert len(data) > 50 * tail  # wrapped many times


@pytest.mark.parametrize("seed", range(5))
def test_reads_from_any_offset_match_the_model(make_log, seed):
    rng = random.Random(seed)
    head, tail = 10, 16
    log = make_log(head, tail)
    data = bytes(rng.randrange(256) for _ in range(123))
    for i in range(0, len(data), 5):
        log.append(data[i : i + 5])
    for pos in range(len(data) + 3):
        expected = expected_runs(data, head, tail, pos)
        assert served(log, pos, limit=rng.choice([1, 4, 9])) == expected, pos


def test_read_inside_the_gap_resumes_where_the_tail_begins(make_log):
    head, tail = 10, 16
    log = make_log(head, tail)
    data = bytes(range(100))
    log.append(data)
    tail_from = len(data) - tail
    for pos in (head, head + 1, 50, tail_from - 1, tail_from):
        start, got = log.read(pos, 5, log.total)
        assert (start, got) == (tail_from, data[tail_from : tail_from + 5])
    # The skip a reader sees is exactly what was dropped.
    assert tail_from - head == log.dropped


def test_read_stops_at_the_given_total(make_log):
    log = make_log(10, 16)
    log.append(b"0123456789abcdef")
    seen_total = log.total
    log.append(b"ghijkl")
    assert log.read(0, 100, seen_total) == (0, b"0123456789")
    assert log.read(10, 100, seen_total) == (10, b"abcdef")
    assert log.read(seen_total, 100, seen_total) == (seen_total, b"")


def test_read_across_the_ring_seam_returns_the_bytes_in_order(make_log):
    head, tail = 4, 16
    log = make_log(head, tail)
    data = bytes(range(200, 256)) + bytes(range(40))  # 96 bytes
    log.append(data[:50])
    log.append(data[50:])
    # The kept tail starts 12 bytes into the ring: it runs to the ring's end
    # and on from the ring's start.
    assert (len(data) - tail - head) % tail == 12
    start, got = log.read(head, tail, log.total)
    assert (start, got) == (len(data) - tail, data[-tail:])


def test_zero_head_keeps_only_the_tail(make_log):
    log = make_log(0, 16)
    data = bytes(range(50))
    for i in range(0, 50, 3):
        log.append(data[i : i + 3])
    assert served(log) == [(34, data[34:])]
    assert log.dropped == 34


def test_finished_log_reopened_serves_the_same(make_log, tmp_path):
    log = make_log(10, 16)
    data = bytes(range(77))
    log.append(data)
    log.close()
    again = OutputLog(tmp_path, 10, 16, total=77)
    assert served(again) == expected_runs(data, 10, 16)


def test_recover_after_a_crash_before_the_tail(make_log, tmp_path):
    log = make_log(10, 16)
    log.append(b"0123456")  # never closed: the writer died
    again = OutputLog(tmp_path, 10, 16)
    assert again.recover() == 7
    assert served(again) == [(0, b"0123456")]


def test_recover_after_a_crash_with_an_unwrapped_tail(make_log, tmp_path):
    log = make_log(10, 16)
    data = bytes(range(20))
    log.append(data)
    again = OutputLog(tmp_path, 10, 16)
    assert again.recover() == 20
    assert served(again) == [(0, data)]


def test_recover_after_a_crash_with_a_wrapped_tail_keeps_the_head(make_log, tmp_path):
    log = make_log(10, 16)
    data = bytes(range(100))
    log.append(data)
    again = OutputLog(tmp_path, 10, 16)
    # Where the ring starts is unknown once it has wrapped: only the head is
    # served, never the ring's bytes out of order.
    assert again.recover() == 10
    assert served(again) == [(0, data[:10])]
    assert not (tmp_path / TAIL_NAME).exists()


def test_recover_with_no_output_at_all(tmp_path):
    log = OutputLog(tmp_path, 10, 16)
    assert log.recover() == 0
    assert read_all(log) == []


def test_reading_a_closed_log_keeps_no_descriptor_open(tmp_path):
    log = OutputLog(tmp_path, 4, 8)
    data = b"0123456789abcdefghij"
    log.append(data)
    log.close()
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        assert b"".join(d for _, d in read_all(log)) == data[:4] + data[-8:]
    assert len(os.listdir("/proc/self/fd")) == fds


def topdir_flag(path) -> bool | None:
    """Whether ``path`` has ext4's FS_TOPDIR_FL; None where it has no flags."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, linux.FS_IOC_GETFLAGS, flags)
    except OSError:
        return None
    finally:
        os.close(fd)
    return bool(struct.unpack_from("i", flags)[0] & linux.FS_TOPDIR_FL)


def test_the_jobs_directory_is_spread_and_cleared_of_unused_spares(tmp_path):
    # Directories spares made but no job took (a killed spare), and an
    # earlier version's stock: removed; the jobs' own directories stay.
    for name in (".spare-12", ".stock-3-1", "job-1"):
        make_job_directory(tmp_path / name)
    prepare_jobs_dir(tmp_path)
    assert os.listdir(tmp_path) == ["job-1"]
    assert sorted(os.listdir(tmp_path / "job-1")) == ["exit.tmp"]
    assert os.stat(tmp_path / "job-1" / "exit.tmp").st_blocks > 0  # reserved
    flag = topdir_flag(tmp_path)
    if flag is None:
        # No inode flags here (tmpfs, say): only a hint, not taken.
        assert not linux.spread_subdirectories(str(tmp_path))
        return
    assert flag
    assert linux.spread_subdirectories(str(tmp_path))  # once is enough


def test_spreading_is_only_a_hint(tmp_path):
    assert not linux.spread_subdirectories(str(tmp_path / "missing"))
    with open(tmp_path / "file", "w"):
        pass
    assert not linux.spread_subdirectories(str(tmp_path / "file"))
