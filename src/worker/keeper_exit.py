"""What a job's keeper (``keeper.c``) tells once the job has ended: the
``exit`` file in the job's directory (or the same record sent to the worker,
``--channel``), and how it is read."""

from __future__ import annotations

import dataclasses
import os

# The file the keeper writes once the job has ended, in the job's directory.
EXIT_FILE = "exit"


@dataclasses.dataclass(frozen=True)
class KeeperExit:
    """How a kept job ended: the keeper's exit file."""

    status: int  # the raw wait status
    returncode: int  # negative: killed by that signal
    output_bytes: int  # all the job wrote
    output_error: tuple[int, int] | None  # (errno, bytes kept) if a write failed
    drain_cut: bool  # the output was still open when the keeper stopped reading
    # (step, errno) if the job's program never ran: a step of its set-up or
    # its exec failed (then status is exit 127's); start_failure() words it.
    start_error: tuple[int, int] | None = None


def read_exit(job_dir: str) -> KeeperExit | None:
    """The keeper's exit file in ``job_dir``; None if it has not been written.

    The keeper renames it into place whole: a reader never sees a part of it.
    Raises ValueError if it is not what the keeper writes.
    """
    try:
        with open(os.path.join(job_dir, EXIT_FILE), "rb") as f:
            raw = f.read(4096)
    except FileNotFoundError:
        return None
    return parse_exit(raw, EXIT_FILE)


def parse_exit(raw: bytes, what: str = "the exit record") -> KeeperExit:
    """An exit record as the keeper writes it: its exit file, or the message
    it sends the worker instead (``--channel``). ValueError, naming ``what``,
    if it is not one."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not text") from None
    if not text.endswith("\n"):
        raise ValueError(f"{what}: not a whole record")
    fields: dict[str, list[int]] = {}
    for line in text.splitlines():
        key, *values = line.split(" ")
        try:
            numbers = [int(v) for v in values]
        except ValueError:
            raise ValueError(f"{what}: not a number in {line!r}") from None
        if key in fields:
            raise ValueError(f"{what}: {key} twice")
        fields[key] = numbers
    counts = {
        "status": 1,
        "output_bytes": 1,
        "output_error": 2,
        "drain_cut": 1,
        "start_error": 2,
    }
    for key, numbers in fields.items():
        if counts.get(key) != len(numbers):
            raise ValueError(f"{what}: unexpected line {key!r}")
    if "status" not in fields or "output_bytes" not in fields:
        raise ValueError(f"{what}: status or output_bytes missing")
    (status,) = fields["status"]
    error = fields.get("output_error")
    start = fields.get("start_error")
    return KeeperExit(
        status=status,
        returncode=os.waitstatus_to_exitcode(status),  # ValueError if not one
        output_bytes=fields["output_bytes"][0],
        output_error=(error[0], error[1]) if error else None,
        drain_cut=fields.get("drain_cut") == [1],
        start_error=(start[0], start[1]) if start else None,
    )
