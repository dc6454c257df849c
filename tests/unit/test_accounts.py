"""The stock of dynamic user ids that starts take without waiting for checks."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import skip_unless_required

from jobgate.errors import ResourceExhausted
from worker import accounts
from worker.config import JobsSection


@pytest.fixture
def make_accounts(tmp_path):
    if os.geteuid() != 0:
        skip_unless_required("dynamic user ids need root", "JOBGATE_REQUIRE_ROOT")
    made = []

    def make(
        uid_min: int = 64100,
        uid_max: int = 64120,
        max_concurrent: int = 2,
        contained: bool = False,
    ) -> accounts.Accounts:
        scripts = tmp_path / "scripts"
        scripts.mkdir(exist_ok=True)
        cfg = JobsSection(
            scripts_dir=scripts,
            state_dir=tmp_path / "state",
            uid_min=uid_min,
            uid_max=uid_max,
            uid_lock_dir=tmp_path / "locks",
            tmp_dir=str(tmp_path / "tmp"),
            max_concurrent=max_concurrent,
        )
        acc = accounts.Accounts(cfg, f"test-{len(made)}", contained=contained)
        made.append(acc)
        return acc

    yield make
    for acc in made:
        acc.close()


def stocked(acc: accounts.Accounts, count: int = accounts.STOCK) -> list[int]:
    deadline = time.monotonic() + 5
    while len(acc._stock) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(acc._stock) == count
    return [a.uid for a, _ in acc._stock]


def lockable(acc: accounts.Accounts, uid: int) -> bool:
    fd = os.open(acc.cfg.uid_lock_dir / str(uid), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_a_start_takes_an_id_checked_ahead_and_the_stock_is_topped_up(
    make_accounts, monkeypatch
):
    acc = make_accounts()
    ahead = stocked(acc)
    assert ahead == [64100, 64101, 64102, 64103]
    assert not any(lockable(acc, uid) for uid in ahead)  # held for the starts
    assert acc.held == 0  # no job holds one yet

    asked = []
    real = accounts._known_to_the_system
    monkeypatch.setattr(
        accounts, "_known_to_the_system", lambda uid: asked.append(uid) or real(uid)
    )
    account = acc.acquire("job-1")
    assert account.uid == 64100 and 64100 not in asked  # no lookup on the start
    assert os.stat(account.tmp).st_uid == 64100
    assert acc.held == 1
    assert stocked(acc) == [64101, 64102, 64103, 64104]
    assert asked == [64104]  # the refill asked, in the background

    acc.release(account)
    deadline = time.monotonic() + 5
    while acc.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert acc.held == 0 and lockable(acc, 64100)


def test_an_id_checked_long_ago_is_asked_about_again(make_accounts, monkeypatch):
    acc = make_accounts()
    stocked(acc)
    with acc._pool_lock:
        old = time.monotonic() - accounts.NSS_RECHECK_S - 1
        acc._stock = type(acc._stock)((a, old) for a, _ in acc._stock)
    # Meanwhile the host gave 64100 to an account of its own.
    monkeypatch.setattr(accounts, "_known_to_the_system", lambda uid: uid == 64100)
    account = acc.acquire("job-1")
    assert account.uid == 64101
    assert lockable(acc, 64100)  # given back, not handed out


def test_a_range_taken_whole_is_refused_and_close_gives_the_stock_back(
    make_accounts,
):
    acc = make_accounts(uid_min=64200, uid_max=64201)
    assert stocked(acc, 2) == [64200, 64201]
    first, second = acc.acquire("a"), acc.acquire("b")
    assert {first.uid, second.uid} == {64200, 64201}
    with pytest.raises(ResourceExhausted, match=r"\(64200-64201\)"):
        acc.acquire("c")

    other = make_accounts(uid_min=64300, uid_max=64303)
    ahead = stocked(other)
    other.close()
    assert all(lockable(other, uid) for uid in ahead)


def test_a_start_waits_for_the_check_of_the_last_free_id_under_way(
    make_accounts, monkeypatch
):
    checking = threading.Event()

    def slow_lookup(uid: int) -> bool:
        checking.set()
        time.sleep(0.3)  # the host's account databases, slow today
        return False

    monkeypatch.setattr(accounts, "_known_to_the_system", slow_lookup)
    acc = make_accounts(uid_min=64400, uid_max=64400, max_concurrent=1)
    assert checking.wait(5)  # the refill is checking 64400 now
    assert acc.acquire("a").uid == 64400  # once checked; not refused meanwhile
    with pytest.raises(ResourceExhausted):
        acc.acquire("b")


def test_an_id_whose_job_may_have_left_processes_goes_back_only_swept(
    make_accounts, monkeypatch
):
    swept = []
    monkeypatch.setattr(
        accounts, "_run_as", lambda account, timeout: swept.append(account.uid)
    )
    acc = make_accounts(contained=True)  # a cgroup per job: normally no sweep
    clean, left = acc.acquire("clean"), acc.acquire("left")
    left.escaped = True  # its cgroup could not be emptied
    acc.release(clean)
    acc.release(left)
    deadline = time.monotonic() + 5
    while acc.held and time.monotonic() < deadline:
        time.sleep(0.01)
    assert acc.held == 0
    assert swept == [left.uid]


def test_a_lasting_tmp_dir_is_swept_of_lost_jobs_but_not_of_kept_ones(
    make_accounts, tmp_path
):
    acc = make_accounts()
    lost, kept = acc.acquire("lost"), acc.acquire("kept")
    root = acc.tmp_root
    # What a job leaves: its own files and directories, locked against
    # everyone else (the worker has no CAP_DAC_OVERRIDE under systemd), a
    # link out of its directory, which is never followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("not the job's")
    for account in (lost, kept):
        deep = Path(account.tmp) / "a" / "b"
        deep.mkdir(parents=True)
        (deep / "file").write_text("x")
        (Path(account.tmp) / "link").symlink_to(outside)
        for path in (deep / "file", deep, deep.parent, Path(account.tmp)):
            os.lchown(path, account.uid, account.gid)
        os.chmod(deep, 0)
    (root / "stray-file").write_text("")
    # The worker goes away with both jobs running; only "kept" is taken over
    # by its next run ("lost" is lost).
    acc.close()
    again = accounts.Accounts(acc.cfg, "test-0", keep={"kept"})
    try:
        assert sorted(os.listdir(root)) == ["kept"]
        assert (outside / "file").read_text() == "not the job's"
        assert os.stat(kept.tmp).st_uid == kept.uid  # untouched
    finally:
        again.close()


def test_a_lost_jobs_directory_is_removed_with_cap_chown_alone(tmp_path):
    """As under the packaged unit: root, but with no CAP_DAC_OVERRIDE (nor
    CAP_DAC_READ_SEARCH, CAP_FOWNER) to enter a job's 0700 directories."""
    if os.geteuid() != 0:
        skip_unless_required("needs root", "JOBGATE_REQUIRE_ROOT")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        skip_unless_required("needs setpriv (util-linux)", "JOBGATE_REQUIRE_ROOT")
    top = tmp_path / "job"
    deep = top / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "file").write_text("x")
    for path in (deep / "file", deep, deep.parent, top):
        os.chown(path, 64150, 64150)
    os.chmod(deep, 0)
    os.chmod(top, 0o700)
    code = (
        "import sys; from pathlib import Path; from worker import accounts; "
        "accounts._remove_tree(Path(sys.argv[1]))"
    )
    res = subprocess.run(
        [setpriv, "--bounding-set=-all,+chown,+setuid,+setgid,+kill"]
        + [sys.executable, "-c", code, str(top)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert not top.exists()
