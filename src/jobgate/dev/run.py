"""Bring up a local jobgate cluster, run the sample job and follow its output.

``make run`` (and ``make run-ha``, with two schedulers on a PostgreSQL server
of its own) runs this; the cluster is :class:`jobgate.dev.cluster.DevCluster`.

    python -m jobgate.dev.run --dir run [--workers worker-1,worker-2] [--once]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from jobgate.dev.cluster import DevCluster
from jobgate.dev.process import ClusterError


def _follow(cluster: DevCluster, path: str) -> None:
    conn = cluster.connection(timeout=3600)
    conn.request("GET", path, headers={"Authorization": f"Bearer {cluster.token}"})
    resp = conn.getresponse()
    while chunk := resp.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobgate.dev.run", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dir", type=Path, default=Path("run"))
    parser.add_argument("--workers", default="worker-1,worker-2")
    parser.add_argument("--http-port", type=int, default=0)
    parser.add_argument(
        "--schedulers",
        type=int,
        default=1,
        help="schedulers sharing one state (several: workers and clients are "
        "given each one's address)",
    )
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="keep the schedulers' state in a PostgreSQL server of its own "
        "under DIR/postgres (Debian's postgresql package binaries)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="stop after the sample job instead of waiting for Ctrl-C",
    )
    args = parser.parse_args(argv)
    names = tuple(n for n in args.workers.split(",") if n)
    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    server = None
    if args.schedulers < 1:
        parser.error("--schedulers: at least 1")
    try:
        store_url = ""
        if args.postgres:
            from jobgate.dev.postgres import PostgresError, PostgresServer

            try:
                server = PostgresServer(args.dir / "postgres")
                server.start()
                store_url = server.create_database()
            except PostgresError as exc:
                print(f"jobgate: {exc}", file=sys.stderr)
                return 1
            print(f"jobgate: PostgreSQL at {store_url}", flush=True)
        cluster = DevCluster(
            args.dir,
            http_port=args.http_port,
            schedulers=args.schedulers,
            store_url=store_url,
        )
    except BaseException:
        if server is not None:
            server.stop()
        raise
    try:
        print(f"jobgate: starting a local cluster in {args.dir}/ ...", flush=True)
        cluster.start(names)
        env = cluster.write_env()
        schedulers = "\n".join(
            f"jobgate: scheduler at {url} (pid {proc.pid})"
            for url, proc in zip(cluster.urls, cluster.schedulers, strict=True)
        )
        print(
            f"""
{schedulers}
jobgate: workers: {", ".join(names)}
jobgate: logs in {cluster.logs}/, settings in {env}:
    source {env}
    curl -sH "Authorization: Bearer $JOBGATE_TOKEN" ${{JOBGATE_URL%%,*}}/v1/workers
jobgate: web console at {cluster.url}/ui/ (sign in with $JOBGATE_TOKEN)
""",
            flush=True,
        )
        status, _, body = cluster.request(
            "POST",
            f"/v1/workers/{names[0]}/jobs",
            {"command": "bash", "path": "count.sh", "args": ["5", "0.5"]},
        )
        if status != 201:
            print(
                f"jobgate: starting count.sh failed: {status} {body.decode()}",
                file=sys.stderr,
            )
            return 1
        job = json.loads(body)
        print(
            f"jobgate: started count.sh on {names[0]} as job {job['job_id']}; "
            "its output:",
            flush=True,
        )
        _follow(
            cluster, f"/v1/workers/{names[0]}/jobs/{job['job_id']}/output?follow=true"
        )
        _, _, body = cluster.request(
            "GET", f"/v1/workers/{names[0]}/jobs/{job['job_id']}"
        )
        final = json.loads(body)
        print(f"jobgate: job {final['state']} ({final['reason']})", flush=True)
        if args.once:
            return 0 if final["state"] == "succeeded" else 1
        print(
            "jobgate: the cluster keeps running; press Ctrl-C to stop it.", flush=True
        )
        while not stop:
            signal.pause()
    except KeyboardInterrupt:
        pass
    except ClusterError as exc:
        print(f"jobgate: {exc}", file=sys.stderr)
        return 1
    finally:
        print("\njobgate: stopping the cluster ...", flush=True)
        cluster.stop()
        if server is not None:
            server.stop()
        print("jobgate: stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
