"""The ``jobgate`` command's commands: each turns its arguments into API calls."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jobgate.client.api import Client
from jobgate.client.errors import ApiError, ConnectionFailed, StreamBroken
from jobgate.client.exits import (
    EXIT_API,
    EXIT_NOT_ALL_SUCCEEDED,
    EXIT_OK,
    PROG,
    UsageError,
    job_exit_status,
)
from jobgate.client.output import (
    JOB_KEYS,
    WORKER_KEYS,
    Output,
    Progress,
    exit_text,
    format_object,
    format_table,
    script_text,
    value_text,
)

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
    # With several schedulers, a broken stream resumes on the next one where
    # it broke; giving up once each was tried without a byte coming.
    tries = 0
    while True:
        try:
            for chunk in client.output(
                worker, job_id, offset=offset + received, follow=follow
            ):
                out.write(chunk)
                out.flush()
                received += len(chunk)
                tries = 0
            return
        except StreamBroken as exc:
            out.flush()
            tries += 1
            if tries < len(client.endpoints) and client.fail_over():
                continue
            hint = f"{PROG} logs {worker} {job_id} --offset {offset + received}"
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
                        w["state"] + (" (draining)" if w.get("draining") else ""),
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


def _show_worker(o: Output, worker: Mapping[str, Any]) -> None:
    if o.as_json:
        o.json(worker)
    else:
        o.line(format_object(worker, WORKER_KEYS))


def cmd_worker(client: Client, args: argparse.Namespace, o: Output) -> int:
    _show_worker(o, client.worker(args.worker))
    return EXIT_OK


def cmd_drain(client: Client, args: argparse.Namespace, o: Output) -> int:
    if not args.wait:
        _, worker = client.drain(args.worker)
    else:
        with Progress(f"waiting for the jobs on {args.worker} to end", o.err):
            status, worker = client.drain(args.worker, wait=True)
            while status == 202:  # the scheduler's wait ran out: wait again,
                # unless the drain was lifted meanwhile (draining again would
                # undo somebody's undrain)
                if not client.worker(args.worker).get("draining"):
                    o.note(
                        f"drain: the drain of {args.worker} was lifted while "
                        "waiting for its jobs to end; not draining it again"
                    )
                    return EXIT_API
                status, worker = client.drain(args.worker, wait=True)
    _show_worker(o, worker)
    return EXIT_OK


def cmd_undrain(client: Client, args: argparse.Namespace, o: Output) -> int:
    _, worker = client.drain(args.worker, enable=False)
    _show_worker(o, worker)
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
                    exit_text(j),
                    j.get("started_at"),
                    j.get("ended_at"),
                    script_text(j),
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
                "script": script_text(group),
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
                        exit_text(j),
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
        return "labels " + value_text(selector["labels"])
    return value_text(selector)


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


def _limits(args: argparse.Namespace) -> dict[str, int]:
    found = {"memory_mb": args.memory, "cpu_percent": args.cpu, "tasks": args.tasks}
    return {name: value for name, value in found.items() if value}
