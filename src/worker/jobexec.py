"""Exec shim for jobs in their own cgroup: join it, drop privileges, exec.

The worker starts ``python -I jobexec.py CGROUP_PROCS STATUS_FD UID GID --
ARGV...`` (by file, so it imports nothing but the standard library).
Joining the cgroup before the job's program runs means no process
of the job, however quickly it forks or calls ``setsid``, can start outside
it. The job's uid and gid are set after joining, since an unprivileged job
could not move itself into the cgroup. If the program cannot be executed, the
errno goes to STATUS_FD (close-on-exec, so a successful exec closes it
silently) and the shim exits with 127.
"""

from __future__ import annotations

import os
import signal
import sys


def main(argv: list[str]) -> int:
    procs, status_fd, uid, gid, sep, *command = argv
    if sep != "--" or not command:
        print(
            "usage: jobexec CGROUP_PROCS STATUS_FD UID GID -- ARGV...", file=sys.stderr
        )
        return 2
    fd = int(status_fd)
    os.set_inheritable(fd, False)
    # Python ignores SIGPIPE and SIGXFSZ; a job must get the defaults, or
    # `yes | head` would print "Broken pipe" instead of ending quietly.
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        if procs != "-":
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        if gid != "-":
            os.setgroups([])
            os.setgid(int(gid))
        if uid != "-":
            os.setuid(int(uid))
        os.execv(command[0], command)  # noqa: S606 - argv list, no shell
    except OSError as exc:
        os.write(fd, f"{exc.errno or 0} {exc.filename or command[0]}".encode())
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
