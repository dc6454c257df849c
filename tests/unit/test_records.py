"""The worker's record file: appends, last line wins, removals, rewrites, damage."""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from worker import records
from worker.records import RecordLog


def rec(job_id: str, state: str = "running", **extra) -> dict:
    return {"job_id": job_id, "state": state, **extra}


def lines(log: RecordLog) -> list[dict]:
    return [json.loads(line) for line in log.path.read_bytes().splitlines()]


def test_the_last_record_of_a_job_wins_in_the_order_first_seen(tmp_path):
    log = RecordLog(tmp_path)
    log.write(rec("a"))
    log.write(rec("b"))
    log.write(rec("a", "succeeded", exit_code=0))
    log.close()
    assert RecordLog(tmp_path).load() == [
        rec("a", "succeeded", exit_code=0),
        rec("b"),
    ]


def test_each_write_is_one_line_appended_at_once(tmp_path):
    log = RecordLog(tmp_path)
    log.write(rec("a"))
    log.write(rec("a", "failed"))
    # Visible to a reader before close: nothing is buffered in the process.
    assert lines(log) == [rec("a"), rec("a", "failed")]
    log.close()


def test_removed_jobs_are_not_loaded_again(tmp_path):
    log = RecordLog(tmp_path)
    for job_id in "abc":
        log.write(rec(job_id, "succeeded"))
    log.remove(["a", "c", "unknown"])
    assert len(log) == 1
    assert lines(log)[-2:] == [
        {"job_id": "a", "removed": True},
        {"job_id": "c", "removed": True},
    ]
    log.close()
    assert RecordLog(tmp_path).load() == [rec("b", "succeeded")]


def test_a_missing_file_is_no_jobs(tmp_path):
    assert RecordLog(tmp_path).load() == []


def test_damaged_lines_are_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / records.FILE_NAME
    good = json.dumps(rec("a"))
    path.write_text(
        "\n".join([good, "{not json", '{"state": "running"}', '{"job_id": 7}', ""])
        + '{"job_id": "b", "sta'  # cut short by a crash
    )
    with caplog.at_level(logging.WARNING):
        assert RecordLog(tmp_path).load() == [rec("a")]
    assert "skipped 4 line(s) that are not job records (line 2, 3, 4, 5)" in (
        caplog.text
    )


def test_reset_leaves_one_line_per_job_and_appends_on_a_line_of_their_own(tmp_path):
    path = tmp_path / records.FILE_NAME
    path.write_text(json.dumps(rec("a")) + '\n{"job_id": "b", "sta')
    log = RecordLog(tmp_path)
    log.reset([rec("a", "lost")])
    log.write(rec("c"))
    assert lines(log) == [rec("a", "lost"), rec("c")]
    log.close()


def test_the_file_is_rewritten_once_it_holds_many_more_lines_than_jobs(tmp_path):
    log = RecordLog(tmp_path, slack_lines=10)
    for i in range(200):
        log.write(rec("a", "running", n=i))
        log.write(rec("b", "running", n=i))
        # Never more than two lines a job plus the slack, plus the one that
        # made the rewrite due.
        assert len(lines(log)) <= 2 * 2 + 10 + 1
    assert not (tmp_path / (records.FILE_NAME + ".tmp")).exists()
    log.close()
    assert RecordLog(tmp_path).load() == [
        rec("a", "running", n=199),
        rec("b", "running", n=199),
    ]


def test_removals_count_towards_the_rewrite(tmp_path):
    log = RecordLog(tmp_path, slack_lines=4)
    for i in range(20):
        log.write(rec(f"j{i}", "succeeded"))
        log.remove([f"j{i}"])
        assert len(lines(log)) <= 4 + 1  # no job is left, only the slack
    log.close()
    assert RecordLog(tmp_path).load() == []


def test_a_write_cut_short_by_a_full_disk_does_not_spoil_the_next(
    tmp_path, monkeypatch
):
    log = RecordLog(tmp_path)
    log.write(rec("a"))
    real_write = os.write
    calls = []

    def half_then_full(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(records.os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        log.write(rec("b", "succeeded", reason="x" * 100))
    monkeypatch.setattr(records.os, "write", real_write)
    log.write(rec("c"))
    log.close()
    # The fragment is skipped; the line after it stands on its own.
    assert RecordLog(tmp_path).load() == [rec("a"), rec("c")]


def test_a_rewrite_that_fails_keeps_the_old_file(tmp_path, monkeypatch, caplog):
    log = RecordLog(tmp_path, slack_lines=0)
    log.write(rec("a"))
    log.write(rec("a", "succeeded"))
    before = log.path.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = os.open
    monkeypatch.setattr(
        records.os,
        "open",
        lambda path, *a, **k: (
            full() if str(path).endswith(".tmp") else real_open(path, *a, **k)
        ),
    )
    # The third line of one job makes a rewrite due; it fails, the line stays.
    with caplog.at_level(logging.ERROR):
        log.write(rec("a", "succeeded", exit_code=0))
    assert "could not rewrite it: [Errno 28]" in caplog.text
    assert log.path.read_bytes() == before + records._line(
        rec("a", "succeeded", exit_code=0)
    )
    log.write(rec("b"))  # appends go on
    log.close()
    assert RecordLog(tmp_path).load() == [
        rec("a", "succeeded", exit_code=0),
        rec("b"),
    ]
