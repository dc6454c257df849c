"""What the ``jobgate`` command's exit status means, and a job's own as one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROG = "jobgate"

EXIT_OK = 0
EXIT_NOT_ALL_SUCCEEDED = 1  # fanout and group: some job did not succeed
EXIT_USAGE = 2
EXIT_API = 3
EXIT_UNAVAILABLE = 4
EXIT_TIMED_OUT = 124  # like timeout(1)
EXIT_STOPPED = 125
EXIT_START_FAILED = 126  # like a shell's "cannot execute"
EXIT_LOST = 127
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

EXIT_CODES = f"""\
exit status:
  run --wait, --follow  the job's exit code; 128+N when signal N killed it;
                        {EXIT_TIMED_OUT} timed out, {EXIT_STOPPED} stopped, \
{EXIT_START_FAILED} could not start, {EXIT_LOST} lost
  fanout, group --wait  0 when every job succeeded (fanout without --wait: when
                        every worker took the job), {EXIT_NOT_ALL_SUCCEEDED} otherwise
  any command           {EXIT_USAGE} usage or config error; {EXIT_API} error \
answer of the API
                        (400, 401, 403, 404 ...); {EXIT_UNAVAILABLE} cannot reach \
the scheduler
                        or the worker (connection failed, 502, 503, 504)
"""

# HTTP statuses that mean "not now" rather than "wrong request".
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})


# -- exit status of a job --------------------------------------------------------


def job_exit_status(job: Mapping[str, Any]) -> int:
    """The exit status ``jobgate run --wait`` gives for a finished job."""
    state = job.get("state")
    if state == "succeeded":
        return EXIT_OK
    if job.get("exit_reason") == "start_failed":
        return EXIT_START_FAILED
    if state == "timed_out":
        return EXIT_TIMED_OUT
    if state == "stopped":
        return EXIT_STOPPED
    if state == "lost":
        return EXIT_LOST
    if job.get("signal"):
        return 128 + int(job["signal"])
    code = job.get("exit_code")
    if isinstance(code, int) and 0 < code < 256:
        return code
    return 1


class UsageError(Exception):
    """A mistake in the command line that argparse cannot see."""
