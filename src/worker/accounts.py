"""Who a job runs as, and the private temporary directory it gets.

``[jobs].user_mode`` (only when the worker runs as root):

* ``dynamic`` (the default): every job runs under a user and group id of
  its own, taken from ``[jobs].uid_min``..``uid_max`` (as systemd's
  ``DynamicUser=`` takes ids from 61184-65519). Jobs are then walled off by
  the kernel's own rules: a job cannot signal, trace or read ``/proc/PID``
  of another job or of the worker, and ``kill -1`` in a job reaches only its
  own processes. An id is held with a lock file in ``[jobs].uid_lock_dir``
  (shared by every worker on the host) and is returned only once the job's
  processes are gone: a clean-up process running as that id sends SIGKILL
  to every process the id still has (``kill -1``) and empties the job's
  temporary directory.
* ``fixed``: every job runs as ``[jobs].user``: for hosts where scripts need
  a known account (to own files, to be named in a sudoers rule). Jobs can
  then signal and read each other, since they are the same user.

A worker that does not run as root runs its jobs as its own user.

Each job also gets a directory of its own, ``$TMPDIR`` (and ``$HOME`` for a
dynamic user, which has no home), mode 0700, under a directory only the
worker can list; it is removed when the job ends.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import grp
import logging
import os
import pwd
import queue
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Collection
from pathlib import Path

from jobgate.errors import ResourceExhausted
from worker import spawn
from worker.config import JobsSection

log = logging.getLogger(__name__)

# Run as the job's user once the job ended: every process left with that id
# is killed (kill -1 spares only the caller), then the temporary directory
# is emptied. Only root may remove the emptied directory itself (its parent
# is root's).
CLEANUP = (
    'if [ "$1" = dynamic ]; then kill -s KILL -- -1 2>/dev/null; fi; '
    'find "$2" -mindepth 1 -delete 2>/dev/null; exit 0'
)
CLEANUP_TIMEOUT_S = 30.0
NSS_RECHECK_S = 600.0
# How long a start waits for the background check of the last free id.
NSS_WAIT_S = 5.0
# The login shell of a dynamic id, as systemd reports its DynamicUser= ids.
# Setting $SHELL also spares the job's bash a lookup of its own id at start
# (bash looks the user up when SHELL is unset): 0.4 ms of CPU per job where
# nsswitch.conf falls through to nss-systemd for ids not in /etc/passwd.
DYNAMIC_SHELL = "/usr/sbin/nologin"
# Dynamic ids checked and locked ahead of the starts that take them. Asking
# the host's account databases whether an id is free costs 0.14 ms and its
# lock file 0.05 ms (this machine, `files systemd` in nsswitch.conf); with a
# stock, the start scenario's job starts pay neither (bench/README.md).
STOCK = 4
# A stocked id's private directory, made ahead: <tmp root>/.uid-<uid>.
READY_PREFIX = ".uid-"
# Queued to the background thread: top the stock up.
_REFILL = object()


@dataclasses.dataclass
class Account:
    """The ids a job runs as (None: the worker's own) and its temporary directory."""

    uid: int | None
    gid: int | None
    name: str
    dynamic: bool = False
    home: str = ""  # a fixed account's home
    shell: str = ""  # its login shell, for $SHELL (empty: the worker's user)
    # Processes of the job may be left: its cgroup could not be emptied and
    # removed. Its id then goes back only after the clean-up process.
    escaped: bool = False
    tmp: str = ""
    # Taken over from the worker's earlier run with a job it adopted: the
    # lock of its id was held by the job's keeper, not by this worker.
    adopted: bool = False
    _lock_fd: int | None = dataclasses.field(default=None, repr=False)

    @property
    def lock_fd(self) -> int | None:
        """The descriptor whose lock holds the id (dynamic ids only)."""
        return self._lock_fd

    def to_json(self) -> dict:
        """What names the account, for :meth:`Accounts.adopt` after a restart."""
        return {
            "uid": self.uid,
            "gid": self.gid,
            "name": self.name,
            "dynamic": self.dynamic,
            "home": self.home,
            "shell": self.shell,
            "tmp": self.tmp,
        }


class Accounts:
    """Hands out accounts and temporary directories, and takes them back."""

    def __init__(
        self,
        cfg: JobsSection,
        instance: str,
        contained: bool = False,
        keep: Collection[str] = (),
    ):
        """``keep``: the ids of the jobs of the worker's earlier run that are
        taken over (adopted, or ended while no worker ran): their temporary
        directories stay for :meth:`adopt` and :meth:`release`."""
        self.cfg = cfg
        # Every process of a job stays in the job's cgroup (worker.isolation):
        # once it is empty, none is left to kill when the id is returned.
        self.contained = contained
        # What the host's accounts and groups say of an id, and when it was
        # asked: a lookup costs up to a millisecond (nss-systemd), so each id
        # is looked up at most once per NSS_RECHECK_S.
        self._known: dict[int, tuple[bool, float]] = {}
        self.root = os.geteuid() == 0
        self.mode = cfg.user_mode if self.root else "worker"
        self._fixed: tuple[int, int, str, str] | None = None
        if self.mode == "fixed":
            self._fixed = _fixed_account(cfg.user)
        self._next = cfg.uid_min
        self._pool_lock = threading.Lock()
        self._held: set[int] = set()
        self._checking: set[int] = set()
        # Notified whenever a check of an id ends (see _take).
        self._checked = threading.Condition(self._pool_lock)
        # Taken and locked, not yet handed out: (account, when it was checked).
        self._stock: collections.deque[tuple[Account, float]] = collections.deque()
        self._closed = False
        if self.mode == "dynamic":
            cfg.uid_lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if cfg.tmp_dir:
            self.tmp_root = Path(cfg.tmp_dir) / f"jobgate-{instance}"
            self.tmp_root.mkdir(mode=0o711, parents=True, exist_ok=True)
            self._sweep(set(keep))
        else:
            self.tmp_root = Path(tempfile.mkdtemp(prefix=f"jobgate-{instance}-"))
        # Others may pass through to their own directory, never list it.
        os.chmod(self.tmp_root, 0o711)  # noqa: S103 - traverse only, no listing
        self.private_tmp = self._can_give_directories()
        self._reclaims: queue.Queue[Account | object | None] = queue.Queue()
        self._reclaimer = threading.Thread(
            target=self._reclaim_loop, name="reclaimer", daemon=True
        )
        self._reclaimer.start()
        if self.mode == "dynamic":
            self._reclaims.put(_REFILL)
        log.info("jobs run %s", self.describe())

    def _sweep(self, keep: set[str]) -> None:
        """Remove what the worker's earlier runs left in ``[jobs].tmp_dir``.

        The default directory is made anew by each run (under systemd, in the
        unit's private /tmp, which goes with it); one set in the config lasts.
        A job's directory in it outlives its job only when the job was lost
        (its keeper killed, the host rebooted): nothing runs there any more.
        The directories of the jobs in ``keep`` stay.
        """
        removed = 0
        for entry in os.scandir(self.tmp_root):
            if entry.name in keep:
                continue
            try:
                _remove_tree(Path(entry.path))
                removed += 1
            except OSError as exc:
                log.warning(
                    "could not remove %s, left by an earlier run of the worker: %s",
                    entry.path,
                    exc,
                )
        if removed:
            log.info(
                "removed %d temporary directories of lost jobs from %s",
                removed,
                self.tmp_root,
            )

    def _can_give_directories(self) -> bool:
        """Whether the worker may make a directory the job's (CAP_CHOWN).

        A dynamic id has no other place of its own: without it the worker
        refuses to start. A fixed account has its home; its jobs then go
        without a private TMPDIR, which the log says.
        """
        if self.mode == "worker":
            return True
        uid, gid = self._fixed[:2] if self._fixed else (self.cfg.uid_min,) * 2
        probe = self.tmp_root / ".probe"
        try:
            probe.mkdir(mode=0o700, exist_ok=True)
            try:
                os.chown(probe, uid, gid)
            finally:
                probe.rmdir()
            return True
        except PermissionError as exc:
            if self.mode == "dynamic":
                raise OSError(
                    '[jobs].user_mode = "dynamic" needs the capability to give '
                    f"each job its directory (CAP_CHOWN): {exc.strerror}; grant "
                    'it, or use user_mode = "fixed"'
                ) from None
            log.warning(
                "jobs run without a private TMPDIR: the worker may not give %s a "
                "directory (no CAP_CHOWN)",
                self.cfg.user,
            )
            return False

    def describe(self) -> str:
        if self.mode == "dynamic":
            return (
                f"each under a user id of its own from {self.cfg.uid_min}-"
                f"{self.cfg.uid_max}"
            )
        if self.mode == "fixed":
            return f"as {self.cfg.user!r}"
        return "as the worker's own user (it is not root)"

    @property
    def held(self) -> int:
        """How many dynamic ids jobs hold (handed out, not yet returned)."""
        with self._pool_lock:
            return len(self._held) - len(self._stock) - len(self._checking)

    # -- taking -------------------------------------------------------------------

    def acquire(self, job_id: str) -> Account:
        """An account and a private directory for a new job.

        Raises ResourceExhausted when every id of the range is taken and
        OSError when the directory cannot be made.
        """
        if self.mode == "dynamic":
            account = self._take()
            self._reclaims.put(_REFILL)
        elif self.mode == "fixed":
            uid, gid, home, shell = self._fixed  # type: ignore[misc]
            account = Account(uid, gid, self.cfg.user, home=home, shell=shell)
        else:
            account = Account(None, None, "")
        if not self.private_tmp:
            return account
        tmp = self.tmp_root / job_id
        try:
            if account.tmp:  # made with the id, ahead of the start (_dynamic)
                os.rename(account.tmp, tmp)
            else:
                _make_private_dir(tmp, account)
            account.tmp = str(tmp)
        except BaseException:
            self._return(account)
            raise
        return account

    def adopt(self, d: dict) -> Account:
        """The account of a job adopted from the worker's earlier run.

        Its id counts as taken from now on; its lock is held by the job's
        keeper until the job ends (see :meth:`_reclaim`).
        """
        account = Account(
            d.get("uid"),
            d.get("gid"),
            str(d.get("name", "")),
            bool(d.get("dynamic")),
            home=str(d.get("home", "")),
            shell=str(d.get("shell", "")),
            tmp=str(d.get("tmp", "")),
            adopted=True,
        )
        if account.dynamic and account.uid is not None:
            with self._pool_lock:
                self._held.add(account.uid)
        return account

    def _from_stock(self) -> Account | None:
        """A stocked id; one checked too long ago is asked about again."""
        while True:
            with self._pool_lock:
                if not self._stock:
                    return None
                account, checked = self._stock.popleft()
            uid: int = account.uid  # type: ignore[assignment]
            if time.monotonic() - checked <= NSS_RECHECK_S:
                return account
            self._known.pop(uid, None)  # ask again, and remember the answer
            if not self._known_to_the_system(uid):
                return account
            self._return(account)  # the host gave this id to an account since

    def _take(self) -> Account:
        """A dynamic id for a start: from the stock, else the next free one.

        An id the background refill is checking counts as taken only until
        the check ends: a start that finds every other id taken waits for
        it (and then takes it from the stock) rather than be refused.
        """
        waited = False
        while True:
            account = self._from_stock()
            if account is not None:
                return account
            try:
                return self._dynamic()
            except ResourceExhausted:
                with self._pool_lock:
                    if waited or (not self._checking and not self._stock):
                        raise
                    waited = True
                    self._checked.wait_for(
                        lambda: not self._checking, timeout=NSS_WAIT_S
                    )

    def _refill(self) -> None:
        """Check and lock ids ahead of the starts that will take them."""
        while not self._closed and len(self._stock) < STOCK:
            try:
                self._dynamic(to_stock=True)
            except ResourceExhausted:
                return  # every id is in use; starts look again themselves

    def _dynamic(self, to_stock: bool = False) -> Account:
        """The next free id of the range, locked; the checks run unlocked.

        An id being checked is reserved in ``_held``, so the background
        refill and a start never take the same one, and neither waits for
        the other's lookup.
        """
        lo, hi = self.cfg.uid_min, self.cfg.uid_max
        for _ in range(hi - lo + 1):
            with self._pool_lock:
                uid = self._next
                self._next = lo if uid >= hi else uid + 1
                if uid in self._held:
                    continue
                self._held.add(uid)
                self._checking.add(uid)
            fd = account = None
            ready = ""
            try:
                if not self._known_to_the_system(uid):
                    fd = _lock(self.cfg.uid_lock_dir / str(uid))
                if fd is not None and to_stock:
                    ready = self._make_ahead(uid)
            finally:
                with self._pool_lock:
                    if fd is not None:
                        account = Account(
                            uid,
                            uid,
                            f"jobgate-{uid}",
                            True,
                            shell=DYNAMIC_SHELL,
                            _lock_fd=fd,
                        )
                        account.tmp = ready
                        if to_stock and self._closed:
                            self._unlock(account)
                        elif to_stock:
                            # In the stock before the check ends, so a start
                            # waiting for the check finds it there.
                            self._stock.append((account, time.monotonic()))
                    else:  # the host's, another worker's, or failed
                        self._held.discard(uid)
                    self._checking.discard(uid)
                    self._checked.notify_all()
            if account is not None:
                return account
        raise ResourceExhausted(
            f"every user id of [jobs].uid_min-uid_max ({lo}-{hi}) is taken by a "
            "running job; retry when one ends"
        )

    def _make_ahead(self, uid: int) -> str:
        """The private directory of a stocked id, made before a start takes
        it: a new directory costs a start 0.2-0.6 ms on ext4 (which is why
        a kept job's keeper makes the job's own only if the job writes), the
        rename that names it after the job a fraction of that. Empty if it
        could not be made (the start makes it)."""
        if not self.private_tmp:
            return ""
        path = self.tmp_root / f"{READY_PREFIX}{uid}"
        try:
            shutil.rmtree(path, ignore_errors=True)
            _make_private_dir(path, Account(uid, uid, ""))
        except OSError as exc:
            log.warning("could not make %s ahead of a start: %s", path, exc)
            return ""
        return str(path)

    def _known_to_the_system(self, uid: int) -> bool:
        now = time.monotonic()
        cached = self._known.get(uid)
        if cached is None or now - cached[1] > NSS_RECHECK_S:
            cached = (_known_to_the_system(uid), now)
            self._known[uid] = cached
        return cached[0]

    # -- giving back --------------------------------------------------------------

    def release(self, account: Account) -> None:
        """Return the account once its job's processes are gone (in the background)."""
        self._reclaims.put(account)

    def _reclaim_loop(self) -> None:
        while True:
            account = self._reclaims.get()
            if account is None:
                return
            if account is _REFILL:
                try:
                    self._refill()
                except Exception:  # noqa: BLE001 - starts then take ids themselves
                    log.exception("taking user ids ahead of starts failed")
                continue
            try:
                self._reclaim(account)  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - go on with the others
                log.exception("returning the account %s failed", account.name)  # type: ignore[union-attr]

    def _reclaim(self, account: Account) -> None:
        """Make sure nothing of the job is left, then return its id.

        A clean-up process running as the job's id is needed only when
        processes of the job may have escaped (a dynamic id without a cgroup
        per job, or with one that could not be emptied), or when the job left
        files in its directory that the worker may not remove itself (under
        systemd it has no CAP_DAC_OVERRIDE). Most jobs need neither, and cost
        no process.
        """
        if account.adopted and account.dynamic and account._lock_fd is None:
            # Its keeper held the lock and has ended: take it before touching
            # anything of the id. Should another worker on the host have
            # taken the id meanwhile, it is that worker's now.
            account._lock_fd = _lock(self.cfg.uid_lock_dir / str(account.uid))
            if account._lock_fd is None:
                log.warning(
                    "%s: its id is in use by another worker now; not cleaned up",
                    account.name,
                )
                with self._pool_lock:
                    self._held.discard(account.uid)
                return
        escaped = account.dynamic and (account.escaped or not self.contained)
        if account.tmp and not escaped:
            try:
                os.rmdir(account.tmp)  # empty, the common case
                account.tmp = ""
            except FileNotFoundError:
                account.tmp = ""
            except OSError:
                shutil.rmtree(account.tmp, ignore_errors=True)
                if not os.path.exists(account.tmp):
                    account.tmp = ""
        if account.uid is not None and (escaped or account.tmp):
            try:
                _run_as(account, CLEANUP_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as exc:
                # The id is kept: processes of it may still run.
                log.error("cleaning up after %s failed: %s", account.name, exc)
                return
        if account.tmp:
            try:
                os.rmdir(account.tmp)
            except OSError as exc:
                log.warning("could not remove %s: %s", account.tmp, exc)
        self._return(account)

    def _return(self, account: Account) -> None:
        with self._pool_lock:
            self._unlock(account)

    def _unlock(self, account: Account) -> None:
        """Give the id back (with the pool lock held)."""
        if os.path.basename(account.tmp).startswith(READY_PREFIX):
            shutil.rmtree(account.tmp, ignore_errors=True)  # never handed out
            account.tmp = ""
        if account._lock_fd is not None:
            fd, account._lock_fd = account._lock_fd, None
            self._held.discard(account.uid)  # type: ignore[arg-type]
            os.close(fd)  # releases the lock

    def close(self, timeout: float = 10.0) -> None:
        """Finish the returns under way, then remove the temporary root."""
        self._reclaims.put(None)
        self._reclaimer.join(timeout)
        with self._pool_lock:
            self._closed = True
            while self._stock:
                self._unlock(self._stock.popleft()[0])
        try:
            self.tmp_root.rmdir()
        except OSError as exc:
            if exc.errno != errno.ENOTEMPTY:  # jobs left running keep theirs
                log.warning("could not remove %s: %s", self.tmp_root, exc)


def _make_private_dir(path: Path, account: Account) -> None:
    """``path``, mode 0700, the account's own (when it has ids)."""
    os.mkdir(path, 0o700)
    try:
        if account.uid is not None:
            os.chown(path, account.uid, account.gid)
    except BaseException:
        os.rmdir(path)
        raise


def _run_as(account: Account, timeout: float) -> None:
    """Run :data:`CLEANUP` as the account and wait for it (vfork where it can)."""
    argv = [
        "/bin/sh",
        "-c",
        CLEANUP,
        "jobgate-cleanup",
        "dynamic" if account.dynamic else "fixed",
        account.tmp or "/nonexistent",
    ]
    env = {"PATH": "/usr/bin:/bin"}
    if spawn.available():
        child = spawn.spawn(
            argv,
            cwd="/",
            env=env,
            user=account.uid,
            group=account.gid,
            cgroup_procs=None,
        )
        child.stdout.close()  # it writes nothing
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(child.pid, signal.SIGKILL)  # as subprocess.run does
            child.wait()
            raise
        return
    subprocess.run(
        argv,
        user=account.uid,
        group=account.gid,
        extra_groups=[],
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )


def _take_over(path: Path) -> bool:
    """Make the directory ``path`` the worker's own, mode 0700; False if it is
    no directory (a link is never followed).

    Under systemd the worker's root has CAP_CHOWN but not CAP_DAC_OVERRIDE:
    it cannot list, nor empty, a directory a job's user made 0700 before it
    has made it its own. Once it is, no process of the job can change what
    is in it any more.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            return False
        # The descriptor's own directory, whatever its name points to now.
        own = f"/proc/self/fd/{fd}"
        os.chown(own, os.geteuid(), os.getegid())
        os.chmod(own, 0o700)
    finally:
        os.close(fd)
    return True


def _remove_tree(top: Path) -> None:
    """Remove ``top`` and everything in it, whoever owns it (see _take_over)."""
    pending = [top]
    while pending:
        path = pending.pop()
        if not _take_over(path):
            continue
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
    if top.is_symlink() or not top.is_dir():
        top.unlink()
    else:
        shutil.rmtree(top)


def _fixed_account(user: str) -> tuple[int, int, str, str]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise OSError(f"[jobs].user: no such account {user!r} on this host") from None
    if pw.pw_uid == 0:
        raise OSError(f"[jobs].user: {user!r} is root; jobs never run as root")
    return pw.pw_uid, pw.pw_gid, pw.pw_dir, pw.pw_shell


def _known_to_the_system(uid: int) -> bool:
    """True if an account or group has this id (it is not free to hand out)."""
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


def _lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd
