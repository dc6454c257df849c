"""``jobgate``: the command-line client of the scheduler's HTTP API.

    jobgate workers
    jobgate run worker-1 backup.sh --wait      # exits with the job's exit code
    jobgate logs worker-1 JOB --follow

The scheduler's URL and an API token come from flags, else the environment
(``JOBGATE_URL``, ``JOBGATE_TOKEN``), else ``~/.config/jobgate/client.toml``.
See :data:`EXIT_CODES` for what the exit status means.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TextIO

from jobgate import __version__, model
from jobgate.client import (
    ENV_CONFIG,
    ApiError,
    Client,
    ConnectionFailed,
    Settings,
    SettingsError,
    StreamBroken,
    default_config_path,
    resolve_settings,
)

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

# Options every command takes, before or after the command's name.
SETTING_FLAGS = ("url", "token", "token_file", "ca_file", "cert_file", "key_file")


class UsageError(Exception):
    """A mistake in the command line that argparse cannot see."""


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


# -- output ------------------------------------------------------------------------

JOB_KEYS = model.JOB_COLUMNS
WORKER_KEYS = (
    "name",
    "id",
    "state",
    "address",
    "labels",
    "running_jobs",
    "capacity",
    "version",
    "registered_at",
    "last_seen_at",
)


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return shlex.join(str(v) for v in value) if value else "-"
    return str(value)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def format_object(obj: Mapping[str, Any], order: Sequence[str] = ()) -> str:
    """``key: value`` lines, keys aligned, ``order`` first, then the rest."""
    keys = [k for k in order if k in obj] + [k for k in obj if k not in order]
    width = max((len(k) for k in keys), default=0) + 1
    lines = []
    for key in keys:
        value = obj[key]
        text = _text(value)
        if key == "signal" and isinstance(value, int):
            text = f"{value} ({_signal_name(value)})"
        lines.append(f"{key + ':':<{width}} {text}")
    return "\n".join(lines)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Columns aligned with two spaces; the last column is not padded."""
    cells = [list(headers)] + [[_text(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(
            c if i == len(r) - 1 else f"{c:<{widths[i]}}" for i, c in enumerate(r)
        )
        for r in cells
    )


def _exit_text(job: Mapping[str, Any]) -> str:
    if job.get("exit_code") is not None:
        return str(job["exit_code"])
    if job.get("signal"):
        return _signal_name(int(job["signal"]))
    return "-"


def _script_text(obj: Mapping[str, Any]) -> str:
    return shlex.join(
        [str(obj.get("command") or ""), str(obj.get("path") or "")]
        + [str(a) for a in obj.get("args") or []]
    )


class Output:
    """Where a command writes: human text or JSON on stdout, notes on stderr."""

    def __init__(self, as_json: bool, out: TextIO, err: TextIO):
        self.as_json = as_json
        self.out = out
        self.err = err

    def json(self, data: Any) -> None:
        self.out.write(json.dumps(data, indent=2) + "\n")

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def note(self, text: str) -> None:
        self.err.write(f"{PROG}: {text}\n")
        self.err.flush()


# -- progress on a terminal ------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A line on stderr, rewritten every second while a wait lasts.

    Shown only when the stream is a terminal, so logs and pipes stay clean.
    """

    def __init__(self, label: str, stream: TextIO, interval: float = 1.0):
        self.label = label
        self.stream = stream
        self.interval = interval
        self.enabled = _isatty(stream)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False
        self._start = time.monotonic()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            elapsed = _duration(time.monotonic() - self._start)
            self.stream.write(f"\r\x1b[K{PROG}: {self.label} ({elapsed})")
            self.stream.flush()
            self._shown = True

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if self._shown:
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# -- commands ------------------------------------------------------------------------


def _wait_until_ended(client: Client, worker: str, job_id: str) -> dict:
    """Poll a job until it ended (after the scheduler's own wait gave up)."""
    delay = 0.5
    while True:
        job = client.job(worker, job_id)
        if job["state"] != "running":
            return job
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def _write_output(
    client: Client, worker: str, job_id: str, offset: int, follow: bool
) -> None:
    out = sys.stdout.buffer
    received = 0
    try:
        for chunk in client.output(worker, job_id, offset=offset, follow=follow):
            out.write(chunk)
            out.flush()
            received += len(chunk)
    except StreamBroken as exc:
        out.flush()
        hint = f"{PROG} logs {worker} {job_id} --offset {offset + exc.received}"
        raise ConnectionFailed(
            f"{exc}; the rest is still there: {hint}{' --follow' if follow else ''}"
        ) from None


def cmd_workers(client: Client, args: argparse.Namespace, o: Output) -> int:
    workers = client.workers()
    if o.as_json:
        o.json({"workers": workers})
    elif args.quiet:
        for w in workers:
            o.line(w["name"])
    else:
        o.line(
            format_table(
                ("NAME", "STATE", "JOBS", "LABELS", "ADDRESS", "LAST SEEN", "ID"),
                (
                    (
                        w["name"],
                        w["state"],
                        f"{w.get('running_jobs', 0)}/{w.get('capacity', '?')}",
                        w.get("labels"),
                        w.get("address"),
                        w.get("last_seen_at"),
                        w["id"],
                    )
                    for w in workers
                ),
            )
        )
    return EXIT_OK


def cmd_worker(client: Client, args: argparse.Namespace, o: Output) -> int:
    worker = client.worker(args.worker)
    if o.as_json:
        o.json(worker)
    else:
        o.line(format_object(worker, WORKER_KEYS))
    return EXIT_OK


def _show_job(o: Output, job: Mapping[str, Any]) -> None:
    if o.as_json:
        o.json(job)
    else:
        o.line(format_object(job, JOB_KEYS))


def cmd_run(client: Client, args: argparse.Namespace, o: Output) -> int:
    start = {
        "command": args.command,
        "timeout_s": args.timeout,
        "idempotency_key": args.idempotency_key,
        "limits": _limits(args),
    }
    if args.follow:
        _, job = client.start_job(args.worker, args.script, args.args, **start)
        return _follow_job(client, args.worker, job, o)
    if not args.wait:
        _, job = client.start_job(args.worker, args.script, args.args, **start)
        if o.as_json:
            o.json(job)
        else:
            o.line(job["job_id"])
        return EXIT_OK
    label = f"waiting for {args.script} on {args.worker}"
    with Progress(label, o.err) as progress:
        status, job = client.start_job(
            args.worker, args.script, args.args, wait=True, **start
        )
        if job["state"] == "running":  # 202: the scheduler's wait ran out
            progress.label = f"waiting for job {job['job_id']} on {args.worker}"
            job = _wait_until_ended(client, args.worker, job["job_id"])
    _show_job(o, job)
    return job_exit_status(job)


def _follow_job(client: Client, worker: str, job: dict, o: Output) -> int:
    job_id = job["job_id"]
    try:
        _write_output(client, worker, job_id, 0, follow=True)
        final = client.job(worker, job_id)
        if final["state"] == "running":
            final = _wait_until_ended(client, worker, job_id)
    except KeyboardInterrupt:
        o.note(
            f"interrupted; job {job_id} keeps running on {worker} "
            f"(stop it with: {PROG} stop {worker} {job_id})"
        )
        raise
    if final["state"] != "succeeded":
        o.note(f"job {job_id} on {worker} {final['state']}: {final['reason']}")
    return job_exit_status(final)


def cmd_status(client: Client, args: argparse.Namespace, o: Output) -> int:
    _show_job(o, client.job(args.worker, args.job))
    return EXIT_OK


def cmd_jobs(client: Client, args: argparse.Namespace, o: Output) -> int:
    jobs, stale = client.jobs(args.worker)
    if o.as_json:
        o.json({"jobs": jobs, "stale": stale})
        return EXIT_OK
    if stale:
        o.note(
            f"{args.worker} cannot be asked now; these are the last statuses the "
            "scheduler saw (possibly stale)"
        )
    o.line(
        format_table(
            ("JOB ID", "STATE", "EXIT", "STARTED", "ENDED", "SCRIPT"),
            (
                (
                    j["job_id"],
                    j["state"],
                    _exit_text(j),
                    j.get("started_at"),
                    j.get("ended_at"),
                    _script_text(j),
                )
                for j in jobs
            ),
        )
    )
    return EXIT_OK


def cmd_logs(client: Client, args: argparse.Namespace, o: Output) -> int:
    _write_output(client, args.worker, args.job, args.offset, args.follow)
    return EXIT_OK


def cmd_stop(client: Client, args: argparse.Namespace, o: Output) -> int:
    _show_job(o, client.stop_job(args.worker, args.job))
    return EXIT_OK


def _selector(args: argparse.Namespace) -> dict[str, Any]:
    if args.all:
        return {"all": True}
    if args.workers is not None:
        names = [n.strip() for n in args.workers.split(",") if n.strip()]
        if not names:
            raise UsageError("--workers: give worker names, e.g. --workers web-1,web-2")
        return {"workers": names}
    labels: dict[str, str] = {}
    for item in args.label:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--label: {item!r} is not KEY=VALUE")
        labels[key] = value
    return {"labels": labels}


def _worker_names(client: Client) -> dict[str, str]:
    """Worker id to name, for showing groups; empty if the list is unavailable."""
    try:
        return {w["id"]: w["name"] for w in client.workers()}
    except (ApiError, ConnectionFailed):
        return {}


def _show_errors(o: Output, errors: Sequence[Mapping[str, Any]]) -> None:
    if errors:
        o.line()
        o.line(
            format_table(
                ("WORKER", "ERROR"),
                (
                    (e.get("worker_name") or e.get("worker_id"), e["error"])
                    for e in errors
                ),
            )
        )


def _show_group(client: Client, o: Output, group: Mapping[str, Any]) -> None:
    if o.as_json:
        o.json(group)
        return
    names = _worker_names(client)
    o.line(
        format_object(
            {
                "group": group["group_id"],
                "script": _script_text(group),
                "selector": _selector_text(group.get("selector") or {}),
                "summary": _summary_text(group.get("summary") or {}),
            }
        )
    )
    jobs = group.get("jobs") or []
    if jobs:
        o.line()
        o.line(
            format_table(
                ("WORKER", "STATE", "EXIT", "JOB ID", "REASON"),
                (
                    (
                        names.get(j["worker_id"], j["worker_id"]),
                        j["state"] + ("?" if j.get("stale") else ""),
                        _exit_text(j),
                        j["job_id"],
                        j.get("reason"),
                    )
                    for j in sorted(
                        jobs, key=lambda j: names.get(j["worker_id"], j["worker_id"])
                    )
                ),
            )
        )
    _show_errors(o, group.get("errors") or [])


def _summary_text(summary: Mapping[str, Any]) -> str:
    text = f"{summary.get('jobs', 0)} jobs, {summary.get('errors', 0)} errors"
    states = summary.get("states") or {}
    if states:
        text += ": " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    if summary.get("stale"):
        text += f" ({summary['stale']} possibly stale)"
    return text


def _selector_text(selector: Mapping[str, Any]) -> str:
    if selector.get("all"):
        return "all workers"
    if "workers" in selector:
        return "workers " + ",".join(selector["workers"])
    if "labels" in selector:
        return "labels " + _text(selector["labels"])
    return _text(selector)


def _group_exit_status(group: Mapping[str, Any]) -> int:
    jobs = group.get("jobs") or []
    ok = not group.get("errors") and all(j["state"] == "succeeded" for j in jobs)
    return EXIT_OK if ok else EXIT_NOT_ALL_SUCCEEDED


def _wait_group(client: Client, group_id: str, o: Output) -> dict:
    with Progress(f"waiting for the jobs of group {group_id}", o.err):
        while True:
            group = client.group(group_id, wait=True)
            if (group.get("summary") or {}).get("done"):
                return group
            # Jobs on workers that cannot be asked now: look again later.
            time.sleep(2.0)


def cmd_fanout(client: Client, args: argparse.Namespace, o: Output) -> int:
    result = client.fanout(
        _selector(args),
        args.script,
        args.args,
        command=args.command,
        timeout_s=args.timeout,
        idempotency_key=args.idempotency_key,
        limits=_limits(args),
    )
    if args.wait:
        group = _wait_group(client, result["group_id"], o)
        _show_group(client, o, group)
        return _group_exit_status(group)
    if o.as_json:
        o.json(result)
    else:
        o.line(f"group: {result['group_id']}")
        if result["jobs"]:
            o.line()
            o.line(
                format_table(
                    ("WORKER", "JOB ID"),
                    ((j.get("worker_name"), j["job_id"]) for j in result["jobs"]),
                )
            )
        _show_errors(o, result["errors"])
    return EXIT_NOT_ALL_SUCCEEDED if result["errors"] else EXIT_OK


def cmd_group(client: Client, args: argparse.Namespace, o: Output) -> int:
    if args.wait:
        group = _wait_group(client, args.group, o)
        _show_group(client, o, group)
        return _group_exit_status(group)
    _show_group(client, o, client.group(args.group))
    return EXIT_OK


# -- the command line -------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Options every command takes. ``suppress`` (for a command's own parser)
    keeps one not given after the command's name from overwriting the value
    given before it."""
    title = "connection (flags > JOBGATE_* > config file; before or after COMMAND)"
    g = parser.add_argument_group(title)
    added = [
        g.add_argument(
            "--url", help="scheduler URL, http(s)://host:port [JOBGATE_URL]"
        ),
        g.add_argument(
            "--token",
            help="API token [JOBGATE_TOKEN]; other users can see it in the process "
            "list, so prefer --token-file or the environment",
        ),
        g.add_argument("--token-file", help="file holding the API token"),
        g.add_argument("--ca-file", help="CA certificate(s) to verify an https:// URL"),
        g.add_argument("--cert-file", help="client certificate for https://"),
        g.add_argument("--key-file", help="key of --cert-file"),
        g.add_argument(
            "--config",
            help=f"client config file [{ENV_CONFIG}] "
            "(default: ~/.config/jobgate/client.toml)",
        ),
        g.add_argument(
            "--http-timeout",
            type=float,
            metavar="S",
            help="seconds to wait for an ordinary answer (default 30; waits and "
            "streams are not limited)",
        ),
        parser.add_argument("--json", action="store_true", help="print JSON"),
    ]
    if suppress:
        for action in added:
            action.default = argparse.SUPPRESS
            if action.dest != "json":  # listed once, in 'jobgate --help'
                action.help = argparse.SUPPRESS


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("script", help="script path, relative to the scripts directory")
    p.add_argument(
        "args",
        nargs="*",
        help="arguments of the script (put -- before any that starts with -)",
    )
    p.add_argument(
        "--command",
        default="bash",
        help="interpreter, by its name on the worker (default: bash)",
    )
    p.add_argument(
        "--timeout",
        type=_positive_int,
        metavar="S",
        help="stop the job after S seconds (exit status 124)",
    )
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="start at most one job per KEY; again, it answers for that job",
    )
    p.add_argument(
        "--memory",
        type=_megabytes,
        metavar="SIZE",
        help="memory limit, e.g. 256M or 2G (default: the worker's)",
    )
    p.add_argument(
        "--cpu",
        type=_positive_int,
        metavar="PERCENT",
        help="CPU limit in percent of one CPU, e.g. 50 or 200 (default: the worker's)",
    )
    p.add_argument(
        "--tasks",
        type=_positive_int,
        metavar="N",
        help="most processes and threads at once (default: the worker's)",
    )


def _megabytes(text: str) -> int:
    """``256M``, ``2G`` or a number of MiB, in MiB."""
    units = {"M": 1, "G": 1024, "T": 1024 * 1024}
    number, unit = text[:-1], text[-1:].upper()
    if unit not in units:
        number, unit = text, "M"
    try:
        value = int(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: give MiB, or a number with M, G or T"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _limits(args: argparse.Namespace) -> dict[str, int]:
    found = {"memory_mb": args.memory, "cpu_percent": args.cpu, "tasks": args.tasks}
    return {name: value for name, value in found.items() if value}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run scripts on jobgate workers through the scheduler's HTTP API.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    _common_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[..., int] | None, help_text: str):
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if func is not None:
            _common_options(p, suppress=True)
            p.set_defaults(func=func)
        return p

    p = add("workers", cmd_workers, "list the workers")
    p.add_argument("-q", "--quiet", action="store_true", help="only the names")
    p = add("worker", cmd_worker, "show one worker")
    p.add_argument("worker", help="worker name or id")

    p = add("run", cmd_run, "start a script on a worker")
    p.add_argument("worker", help="worker name or id")
    _job_options(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument(
        "--follow",
        action="store_true",
        help="print the job's output as it runs; exit with the job's status",
    )
    how.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job to end, print its status and exit with it",
    )

    p = add("status", cmd_status, "show a job's status")
    p.add_argument("worker", help="worker name or id")
    p.add_argument("job", help="job id")
    p = add("jobs", cmd_jobs, "list a worker's jobs, newest first")
    p.add_argument("worker", help="worker name or id")
    p = add("logs", cmd_logs, "print a job's output (raw bytes)")
    p.add_argument("worker", help="worker name or id")
    p.add_argument("job", help="job id")
    p.add_argument(
        "-f", "--follow", action="store_true", help="keep printing until the job ends"
    )
    p.add_argument(
        "--offset", type=_positive_int, default=0, metavar="N", help="start at byte N"
    )
    p = add("stop", cmd_stop, "stop a job and show its final status")
    p.add_argument("worker", help="worker name or id")
    p.add_argument("job", help="job id")

    p = add("fanout", cmd_fanout, "start a script on several workers (a group)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--workers", metavar="A,B", help="these workers, by name or id")
    which.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workers with this label (repeat: all of them must match)",
    )
    which.add_argument("--all", action="store_true", help="every online worker")
    _job_options(p)
    p.add_argument(
        "--wait", action="store_true", help="wait for every job and show the group"
    )

    p = add("group", cmd_group, "show a group of jobs started by fanout")
    p.add_argument("group", help="group id")
    p.add_argument("--wait", action="store_true", help="wait until every job ended")

    p = add("completion", None, "print a shell completion script")
    p.add_argument("shell", choices=["bash"])
    return parser


# -- completion --------------------------------------------------------------------


def completion_script(parser: argparse.ArgumentParser, shell: str = "bash") -> str:
    """A bash completion script for ``jobgate`` (source it, or put it in
    ``/etc/bash_completion.d/``). Worker names come from ``jobgate workers -q``."""
    subparsers = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    )
    global_opts = sorted(s for a in parser._actions for s in a.option_strings)
    valued = sorted(
        {
            s
            for p in [parser, *subparsers.choices.values()]
            for a in p._actions
            if a.nargs != 0
            for s in a.option_strings
        }
    )
    files = ["--token-file", "--ca-file", "--cert-file", "--key-file", "--config"]
    cases = []
    for name, p in subparsers.choices.items():
        opts = sorted(s for a in p._actions for s in a.option_strings)
        first = [a.dest for a in p._actions if not a.option_strings]
        takes_worker = bool(first) and first[0] == "worker"
        cases.append(
            f'        {name}) opts="{" ".join(opts)}"; '
            f"worker_first={1 if takes_worker else 0} ;;"
        )
    case_text = "\n".join(cases)
    return f"""# bash completion for {PROG}: source <({PROG} completion bash)
_{PROG}() {{
    local cur prev cmd="" cmd_at=0 i n opts="" worker_first=0
    COMPREPLY=()
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
        {"|".join(files)})
            COMPREPLY=($(compgen -f -- "$cur")); return ;;
        {"|".join(o for o in valued if o not in files)})
            return ;;
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {"|".join(valued)}) ((i++)) ;;
            -*) ;;
            *) cmd="${{COMP_WORDS[i]}}"; cmd_at=$i; break ;;
        esac
    done
    if [[ -z "$cmd" ]]; then
        if [[ "$cur" == -* ]]; then
            COMPREPLY=($(compgen -W "{" ".join(global_opts)}" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "{" ".join(subparsers.choices)}" -- "$cur"))
        fi
        return
    fi
    case "$cmd" in
{case_text}
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    n=0
    for ((i = cmd_at + 1; i < COMP_CWORD; i++)); do
        case "${{COMP_WORDS[i]}}" in
            {"|".join(valued)}) ((i++)) ;;
            -*) ;;
            *) ((n++)) ;;
        esac
    done
    if [[ $worker_first == 1 && $n == 0 ]]; then
        COMPREPLY=($(compgen -W "$("${{COMP_WORDS[0]}}" workers -q 2>/dev/null)" \\
            -- "$cur"))
    fi
}}
complete -o default -F _{PROG} {PROG}
"""


# -- main ------------------------------------------------------------------------


def _config_hint(settings_error: str, config: str | None) -> str:
    path = config or os.environ.get(ENV_CONFIG) or default_config_path(os.environ)
    if settings_error == "no scheduler URL":
        return (
            "no scheduler URL: give --url, set JOBGATE_URL (after 'make run': "
            f"source run/local.env) or set url in {path}"
        )
    if settings_error == "no API token":
        return (
            "no API token: give --token-file, set JOBGATE_TOKEN or set token or "
            f"token_file in {path} (or, over https://, a client certificate with "
            "--cert-file)"
        )
    return settings_error


def _api_error_text(exc: ApiError, settings: Settings) -> str:
    text = f"{exc.status} {exc.title}"
    if exc.description:
        text += f": {exc.description}"
    if exc.status == 401 and "token" in settings.sources:
        text += f" (the token came from {settings.sources['token']})"
    if exc.retry_after and exc.status in UNAVAILABLE_STATUSES | {429}:
        text += f"; retry after {exc.retry_after}s"
    return text


def parse_command_line(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.Namespace:
    """Parse ``argv``; everything after the first ``--`` is the script's.

    argparse alone cannot take script arguments after options
    (``run w s.sh --wait -- -v``), so they are split off first.
    """
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    if extra:
        if not hasattr(args, "args"):
            parser.error(f"{args.cmd}: takes no arguments after --")
        args.args = [*args.args, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the ``jobgate`` command; returns its exit status."""
    parser = build_parser()
    try:
        args = parse_command_line(parser, sys.argv[1:] if argv is None else argv)
    except SystemExit as exc:  # --help, --version or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.cmd == "completion":
        sys.stdout.write(completion_script(parser, args.shell))
        return EXIT_OK
    o = Output(args.json, sys.stdout, sys.stderr)
    if args.cmd == "run" and args.follow and args.json:
        o.note("run: --json and --follow: choose one (--follow prints the output)")
        return EXIT_USAGE
    settings = Settings()
    try:
        flags = {k: getattr(args, k, None) for k in SETTING_FLAGS}
        settings = resolve_settings(flags, os.environ, args.config)
        timeout = args.http_timeout if args.http_timeout else 30.0
        client = settings.client(timeout=timeout)
        return args.func(client, args, o)
    except SettingsError as exc:
        o.note(_config_hint(str(exc), args.config))
        return EXIT_USAGE
    except UsageError as exc:
        o.note(f"{args.cmd}: {exc}")
        return EXIT_USAGE
    except ApiError as exc:
        o.note(_api_error_text(exc, settings))
        return EXIT_UNAVAILABLE if exc.status in UNAVAILABLE_STATUSES else EXIT_API
    except ConnectionFailed as exc:
        o.note(str(exc))
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (| head): stop quietly, like other tools.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
