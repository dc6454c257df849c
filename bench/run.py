"""Run the benchmark suite and write a JSON report and a Markdown table.

    python -m bench.run [--scenario NAME ...] [--tiny] [--runs N] [--out DIR]

Each scenario runs ``--runs`` times (3 by default), each time on a fresh
cluster; the report keeps every run's figures and their medians, and the
table shows the medians next to the targets of issue 7.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from bench import cluster
from bench.cluster import TICKS, cpu_jiffies, machine_busy_pct
from bench.scenarios import FULL, SCENARIOS, TINY, Scenario

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results"
# Busier than this (all CPUs together) before a run: something else is running.
IDLE_BUSY_PCT = 10.0
QUIET_S = 5.0  # ... for this long in a row


def median_figures(runs: list[dict]) -> dict:
    """The median of each numeric figure over the runs that produced it."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run if k not in keys]
    out = {}
    for key in keys:
        values = [r[key] for r in runs if key in r]
        if all(isinstance(v, bool) for v in values):
            out[key] = all(values)
        elif all(isinstance(v, int | float) for v in values):
            m = statistics.median(values)
            out[key] = round(m, 3) if isinstance(m, float) else m
    return out


def met(value, target: tuple[str, float]) -> bool:
    op, limit = target
    return value <= limit if op == "<=" else value >= limit


def _fmt(value) -> str:
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _state(report: dict) -> str:
    state = report.get("state", {})
    if state.get("backend") != "postgresql":
        if any(SCENARIOS[n].postgres for n in report["scenarios"]):
            return "SQLite (PostgreSQL where several schedulers share it)"
        return "SQLite"
    settings = ", ".join(f"{k}={v}" for k, v in state.get("settings", {}).items())
    return f"PostgreSQL ({settings or 'default settings'})"


def markdown(report: dict) -> str:
    lines = [
        "# jobgate benchmarks",
        "",
        f"`{report['command']}` at {report['commit'] or 'an unknown commit'}: "
        f"{report['runs']} run(s) per scenario, medians; "
        f"{report['machine']['cpus']} CPUs; the scheduler's state in "
        f"{_state(report)}.",
        "",
        "Other processes than the benchmark's kept the CPUs at most "
        f"{report['others_busy_pct']}% busy during a run.",
        "",
        "| Scenario | Figure | Median | Target | Met |",
        "|---|---|---:|---|---|",
    ]
    for name, entry in report["scenarios"].items():
        scenario = SCENARIOS[name]
        title = scenario.title
        for error in entry["errors"]:
            short = error if len(error) < 120 else error[:117] + "..."
            short = short.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {title} | failed run | | | {short} |")
            title = ""
        med = entry["median"]
        for key in scenario.show or tuple(med):
            if key not in med:
                continue
            target = scenario.targets.get(key)
            tgt = f"{target[0]} {_fmt(target[1])}" if target else ""
            ok = ("yes" if met(med[key], target) else "**no**") if target else ""
            lines.append(f"| {title} | {key} | {_fmt(med[key])} | {tgt} | {ok} |")
            title = ""
    lines.append("")
    return "\n".join(lines)


def _commit() -> str:
    """The commit measured, with ``+`` when the tree has changes of its own."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+" if dirty else "")


def _own_cpu() -> float:
    """CPU time of this process, of every descendant it has waited for, of
    the PostgreSQL server and of the processes it killed (see
    :data:`bench.cluster.UNREAPED_CPU_S`)."""
    t = os.times()
    own = t.user + t.system + t.children_user + t.children_system
    server = cluster.SERVER
    pid = server.pid if server is not None else None
    server_cpu = cluster.tree_cpu_s(pid) if pid else 0.0
    return own + server_cpu + cluster.UNREAPED_CPU_S


def wait_idle(limit_s: float, quiet_s: float = QUIET_S) -> float:
    """Wait (up to ``limit_s``) until the machine has been idle for ``quiet_s``.

    The figures are only meaningful when nothing else competes for the CPUs.
    Returns how long it waited beyond ``quiet_s``.
    """
    t0 = time.monotonic()
    deadline = t0 + limit_s
    quiet = 0.0
    while quiet < quiet_s and time.monotonic() < deadline:
        busy = machine_busy_pct(1.0)
        quiet = quiet + 1.0 if busy <= IDLE_BUSY_PCT else 0.0
        if not quiet:
            print(f"bench: the machine is {busy}% busy; waiting", flush=True)
    return max(0.0, time.monotonic() - t0 - quiet_s)


def measure(scenario: Scenario, sizes) -> tuple[dict, dict]:
    """One run of ``scenario``, with how busy other processes kept the CPUs."""
    busy0, cpu0 = cpu_jiffies(), _own_cpu()
    figures, settings = scenario.run(sizes)
    busy1, cpu1 = cpu_jiffies(), _own_cpu()
    # Every process a scenario starts has been waited for when it returns,
    # so its CPU time is in ours: the rest of the machine's busy time is other
    # processes', which competed with what was measured.
    busy = (busy1[0] - busy0[0]) / TICKS
    capacity = (busy1[1] - busy0[1]) / TICKS
    others = max(0.0, busy - (cpu1 - cpu0))
    figures["others_busy_pct"] = round(100 * others / max(capacity, 1e-9), 1)
    return figures, settings


def run_scenario(
    scenario: Scenario, sizes, runs: int, idle_wait_s: float, retries: int
) -> dict:
    """``runs`` runs of ``scenario``; a run that other processes disturbed
    (see :func:`measure`) is set aside and done again, up to ``retries`` times.
    """
    entry: dict = {
        "title": scenario.title,
        "runs": [],
        "errors": [],
        "disturbed": [],
        "waited_s": 0.0,
    }
    attempts = 0
    while len(entry["runs"]) < runs and attempts < runs + retries:
        attempts += 1
        i = len(entry["runs"]) + 1
        print(f"bench: {scenario.name} run {i}/{runs} ...", flush=True)
        if idle_wait_s > 0:
            entry["waited_s"] += round(wait_idle(idle_wait_s), 1)
        cluster.PROFILE_TAG = f"{scenario.name}-{attempts}"
        t0 = time.monotonic()
        try:
            figures, settings = measure(scenario, sizes)
        except Exception as exc:  # one failed run must not lose the others
            traceback.print_exc()
            entry["errors"].append(f"{type(exc).__name__}: {exc}")
            continue
        shown = {k: figures[k] for k in scenario.show if k in figures}
        print(
            f"bench: {scenario.name} run {i} took {time.monotonic() - t0:.1f}s "
            f"(others kept the CPUs {figures['others_busy_pct']}% busy): "
            f"{json.dumps(shown)}",
            flush=True,
        )
        if idle_wait_s > 0 and figures["others_busy_pct"] > IDLE_BUSY_PCT:
            print(f"bench: {scenario.name} run {i} was disturbed; again", flush=True)
            entry["disturbed"].append(figures)
            continue
        entry["settings"] = settings
        entry["runs"].append(figures)
    missing = runs - len(entry["runs"])
    if missing > 0 and entry["disturbed"]:
        # Out of retries: the least disturbed runs are better than none (the
        # report and the table show how busy others kept the machine).
        entry["disturbed"].sort(key=lambda f: f["others_busy_pct"])
        entry["runs"] += entry["disturbed"][:missing]
        del entry["disturbed"][:missing]
    entry["median"] = median_figures(entry["runs"])
    entry["targets"] = {
        key: {
            "target": f"{op} {limit}",
            "met": met(entry["median"][key], (op, limit))
            if key in entry["median"]
            else None,
        }
        for key, (op, limit) in scenario.targets.items()
    }
    return entry


def _setting(parser: argparse.ArgumentParser, text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or "." not in key or not value:
        parser.error(f"{text!r}: expected SECTION.KEY=VALUE")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable; default: all)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="shrink every scenario (a smoke test)"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="default bench/results"
    )
    parser.add_argument(
        "--idle-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for the machine to be idle "
        f"(at most {IDLE_BUSY_PCT:.0f}%% busy for {QUIET_S:.0f}s), and run again "
        "a run that other processes disturbed; 0: neither",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="disturbed runs done again per scenario, at most (default 3)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the scheduler and workers with py-spy into DIR "
        "(this slows them down: figures of such runs are not comparable)",
    )
    for side, example in (
        ("scheduler", "http.processes=4"),
        ("worker", "jobs.read_chunk_bytes=262144"),
    ):
        parser.add_argument(
            f"--{side}-setting",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help=f"set this in every {side} config (a TOML value, e.g. "
            f"{example}); repeatable",
        )
    parser.add_argument(
        "--scheduler-cpus",
        type=float,
        metavar="CPUS",
        help="hold each scheduler (its main and HTTP processes together) to "
        "this many CPUs, as if each ran on a host of its own (a cgroup CPU "
        "quota; e.g. 0.5 on 2 cores, to see two schedulers scale beside "
        "their clients)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="keep each scheduler's state in PostgreSQL (a server started for "
        "the run from Debian's binaries, a new database per cluster) instead "
        "of SQLite",
    )
    parser.add_argument(
        "--postgres-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of that server (e.g. synchronous_commit=off); repeatable",
    )
    args = parser.parse_args(argv)
    with _postgres(parser, args) as server:
        cluster.SERVER = server
        cluster.POSTGRES = server if args.postgres else None
        return _run(parser, args, argv, server)


@contextlib.contextmanager
def _postgres(parser: argparse.ArgumentParser, args) -> Iterator[object | None]:
    """The PostgreSQL server of ``--postgres``, or of the scenarios that need
    one (several schedulers); stopped and removed after."""
    names = args.scenario or list(SCENARIOS)
    if not args.postgres and not any(SCENARIOS[n].postgres for n in names):
        if args.postgres_setting:
            parser.error("--postgres-setting needs --postgres")
        yield None
        return
    from jobgate.dev.postgres import PostgresServer

    settings = {}
    for text in args.postgres_setting:
        name, sep, value = text.partition("=")
        if not sep or not name or not value:
            parser.error(f"{text!r}: expected NAME=VALUE")
        settings[name] = value
    directory = cluster.public_dir("jobgate-bench-postgres-")
    # As durable as in production (fsync on), unless a setting says otherwise.
    server = PostgresServer(directory, durable=True, settings=settings)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def _run(parser, args, argv, server) -> int:
    for dotted in args.scheduler_setting:
        cluster.EXTRA_SCHEDULER.update([_setting(parser, dotted)])
    for dotted in args.worker_setting:
        cluster.EXTRA_WORKER.update([_setting(parser, dotted)])
    if args.scheduler_cpus is not None:
        if not 0.01 <= args.scheduler_cpus <= (os.cpu_count() or 1):
            parser.error(
                f"--scheduler-cpus {args.scheduler_cpus}: give 0.01 to "
                f"{os.cpu_count()} (the CPUs of this machine)"
            )
        cluster.SCHEDULER_CPUS = args.scheduler_cpus
    if args.profile:
        from bench.profile import py_spy

        py_spy()  # fail now, not after the first scenario
        cluster.PROFILE_DIR = args.profile.resolve()
    names = args.scenario or list(SCENARIOS)
    sizes = TINY if args.tiny else FULL
    command = "python -m bench.run " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    t0 = time.monotonic()
    report = {
        "command": command.strip(),
        "commit": _commit(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "tiny": args.tiny,
        "profiled": bool(args.profile),
        "extra_settings": {
            "scheduler": cluster.EXTRA_SCHEDULER,
            "worker": cluster.EXTRA_WORKER,
        },
        "scheduler_cpus": cluster.SCHEDULER_CPUS,
        "state": (
            {"backend": "postgresql", "settings": server.settings}
            if args.postgres
            else {"backend": "sqlite"}
        ),
        "runs": args.runs,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
        },
        "sizes": sizes.__dict__,
        "scenarios": {},
    }
    for name in names:
        report["scenarios"][name] = run_scenario(
            SCENARIOS[name], sizes, args.runs, args.idle_wait, args.retries
        )
    report["seconds"] = round(time.monotonic() - t0, 1)
    # Time spent waiting for other processes to leave the machine alone.
    report["waited_s"] = round(
        sum(e["waited_s"] for e in report["scenarios"].values()), 1
    )
    report["others_busy_pct"] = max(
        (
            run["others_busy_pct"]
            for entry in report["scenarios"].values()
            for run in entry["runs"]
        ),
        default=0.0,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))
    print(
        f"bench: wrote {args.out}/report.json and report.md in "
        f"{report['seconds']}s ({report['waited_s']}s of it waiting for quiet)"
    )
    failed = [n for n, e in report["scenarios"].items() if e["errors"]]
    if failed:
        print(f"bench: failed runs in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
