"""What the worker asks of Linux that the standard library does not offer.

* :class:`Inotify`: notice that a kept job's output file grew. A kept job
  writes its output through its keeper straight into a file
  (:mod:`worker.output`), not through the worker; the worker learns of new
  bytes, to wake the job's followers, from an ``IN_MODIFY`` event on the
  file (the job's directory is watched: it reports the writes of the files
  in it, the output file among them, made only once the job writes). The
  keeper makes the directory only then too: until it is there, its making
  is heard of through the jobs' directory (``IN_CREATE``).
  Events of one file coalesce while unread, so a job writing fast
  costs the worker one event per turn of its reactor, not one per write.
* :func:`spread_subdirectories`: ask ext4 to place the directories made in
  a directory as it places top-level ones (``chattr +T``).
* :func:`start_time` and :func:`boot_id`: with its pid, what names a
  process for good. A pid alone may be reused once its process is gone; a
  process's start time (clock ticks since boot) on this boot is not.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

IN_MODIFY = 0x00000002
IN_CREATE = 0x00000100
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# struct inotify_event: int wd; uint32 mask, cookie, len; char name[len]
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


class Inotify:
    """One inotify instance: watches files for writes (``IN_MODIFY``), or
    directories for what is made in them (``IN_CREATE``)."""

    def __init__(self) -> None:
        self.fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")

    def watch(self, path: str, mask: int = IN_MODIFY) -> int:
        """Start watching ``path``; returns the watch descriptor.
        FileNotFoundError if there is no ``path``."""
        return _check(
            _libc.inotify_add_watch(self.fd, os.fsencode(path), mask),
            f"watching {path}",
        )

    def unwatch(self, wd: int) -> None:
        # EINVAL: the file is gone, and its watch with it.
        if (
            _libc.inotify_rm_watch(self.fd, wd) < 0
            and ctypes.get_errno() != errno.EINVAL
        ):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def read(self) -> dict[int, set[str]]:
        """The watch descriptors with events since the last read, each with
        the names the events were about (a file in a watched directory);
        never blocks."""
        found: dict[int, set[str]] = {}
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, _mask, _cookie, length = _EVENT.unpack_from(data, pos)
                names = found.setdefault(wd, set())
                start = pos + _EVENT.size
                name = data[start : start + length].rstrip(b"\0")
                if name:
                    names.add(os.fsdecode(name))
                pos = start + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# linux/fs.h: the inode flags ioctls (an int through a pointer), and
# FS_TOPDIR_FL, "top of directory hierarchies".
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_TOPDIR_FL = 0x00020000


def spread_subdirectories(path: str) -> bool:
    """Mark ``path`` as a top of directory hierarchies (``chattr +T``).

    ext4 then makes each new directory in it in a block group of its own
    choosing, one with more free inodes than average and few directories,
    rather than in ``path``'s own group; the files made in such a directory
    go into its group. Where inodes are freed often near ``path`` (a busy
    /tmp, or a worker's own retention), ext4 without a journal scans past
    every one freed in the last seconds before it can hand out a new one.
    On the bench host (state in /tmp, shared with other busy programs) making
    kept jobs' directories (then ahead of each start, by a thread of the
    worker's; now by the keepers, for jobs that write) went from 1.0-1.2 ms
    of CPU per directory to 0.3-0.4 ms. False where the filesystem has no
    such flag (it is only a hint: nothing else changes).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        (current,) = struct.unpack_from("i", flags)
        if current & FS_TOPDIR_FL:
            return True
        struct.pack_into("i", flags, 0, current | FS_TOPDIR_FL)
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, flags)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: the fields
    # after it start after its last ')'. The start time is field 22.
    fields = data[data.rindex(b")") + 2 :].split()
    return int(fields[19])


def process_state(pid: int) -> str:
    """The state letter of ``pid`` (``R``, ``S``, ``Z``...); "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    return data[data.rindex(b")") + 2 :].split(maxsplit=1)[0].decode()


def boot_id() -> str:
    """This boot's id: a start time from another boot names another process."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
