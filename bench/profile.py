"""Optional profiling of the cluster's processes with py-spy while a scenario runs.

``python -m bench.run --profile DIR`` records every cluster a scenario starts
(the scheduler with its gunicorn processes, and each worker) from the moment
it is up until the scenario stops it, as collapsed stacks in
``DIR/<scenario>-<run>-<process>.txt`` (samples of the thread holding the
interpreter lock, which bounds these servers), and writes the functions that
took the most samples to ``...-top.txt``. py-spy is not a dependency of the
project: ``.venv/bin/pip install py-spy``.

    python -m bench.profile FILE...   # the summary of recorded stacks
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

RATE = 100  # samples per second


def py_spy() -> str:
    exe = Path(sys.executable).with_name("py-spy")
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
    return found


class Recorder:
    """py-spy recording one process (and its descendants) until :meth:`stop`."""

    def __init__(self, pid: int, out: Path, subprocesses: bool = False):
        self.out = out
        argv = [
            py_spy(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",  # never pause the process being measured
            # Only the thread holding the interpreter lock: the servers are
            # bound by it, and threads waiting in gRPC's C core would
            # otherwise count as busy.
            "--gil",
        ]
        if subprocesses:
            argv.append("--subprocesses")
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.out.exists():
            self.out.with_name(self.out.stem + "-top.txt").write_text(summary(self.out))


def _frame(frame: str) -> str:
    """``func (path/to/module.py:123)`` without the line number."""
    head, _, tail = frame.rpartition(":")
    return head + ")" if tail.rstrip(")").isdigit() else frame


def _process(frame: str) -> str:
    """``process 12:"python -m scheduler.http_server ..."`` -> a short name."""
    pid = frame.split()[1].split(":")[0]
    words = frame.split()
    module = words[words.index("-m") + 1] if "-m" in words else words[-1]
    return f"{module} (pid {pid})"


def summary(path: Path, top: int = 25) -> str:
    """The functions with the most samples, by own time and including callees."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    procs: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        # With --subprocesses, stacks start with the chain of processes.
        chain = []
        while frames and frames[0].startswith("process "):
            chain.append(frames.pop(0))
        if chain:
            procs[_process(chain[-1])] += n
        frames = [_frame(f) for f in frames]
        if not frames:
            continue
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{path.name}: no samples\n"
    lines = [f"{path.name}: {total} samples at {RATE}/s holding the GIL", ""]
    if procs:
        lines.append("by process:")
        lines += [f"  {100 * n / total:5.1f}%  {p}" for p, n in procs.most_common()]
        lines.append("")
    lines.append("own time:")
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines += ["", "including callees:"]
    boring = ("_bootstrap", "Thread.run", "_worker (concurrent", "<module>")
    interesting = [(f, n) for f, n in incl.most_common() if not f.startswith(boring)]
    lines += [f"  {100 * n / total:5.1f}%  {f}" for f, n in interesting[:top]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for path in args.files:
        print(summary(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
