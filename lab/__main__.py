"""``python -m lab``: the development lab for people (``make lab`` and friends).

    python -m lab up       # boot (or re-provision) the lab, forward the API
    python -m lab up --ha  # the same with two schedulers on a PostgreSQL node
    python -m lab status   # the nodes, their units, the workers the API sees
    python -m lab down     # stop and remove everything
    python -m lab shell worker-1
    python -m lab journal worker-1 -u jobgate-worker -f

All take ``--dir`` (default ``build/lab``), the lab's working directory.
Exit status: 0 done, 1 failed, 2 usage, 3 (status) the lab is not up.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import ssl
import sys
import time
from pathlib import Path

from lab.cluster import (
    DEBS,
    LAB_TOKEN,
    REPO,
    SCRIPTS,
    Cluster,
    missing_requirements,
)
from lab.nodes import CLEAN_ENV, LabError

DEFAULT_DIR = REPO / "build" / "lab"
DEFAULT_PORT = 8443


def say(msg: str) -> None:
    print(f"lab: {msg}", flush=True)


def up(args: argparse.Namespace) -> int:
    cluster = Cluster(args.dir, log=say, topology="ha" if args.ha else None)
    lab = cluster.load()
    if lab is not None and not all(lab.running().values()):
        say(f"the lab in {cluster.dir} is partly down; taking it down first")
        cluster.down()
        lab = None
    if lab is None:
        missing = missing_requirements()
        if missing:
            raise LabError("this machine lacks " + "; ".join(missing))
        cluster.prepare(args.debs, args.scripts)
        lab = cluster.boot(tuple(args.spare))
    else:
        say(f"the lab in {cluster.dir} is up; provisioning it again")
        cluster.prepare(args.debs, args.scripts)
    say("ansible-playbook site.yml")
    res = cluster.playbook(lab, echo=not args.quiet)
    say(f"site.yml took {res.duration:.0f}s (log: {res.log})")
    if res.returncode != 0:
        say(
            f"ansible-playbook failed ({res.returncode}); the nodes stay up for a look"
            " ('python -m lab journal NODE' shows their journals)"
        )
        return 1
    port = cluster.forwarded_port(lab)
    if port is None:
        lab.stop_helper("forward")
        port = cluster.forward(lab, args.port)
    print()
    print(cluster.howto(lab, port), flush=True)
    return 0


def down(args: argparse.Namespace) -> int:
    cluster = Cluster(args.dir, log=say)
    if cluster.down():
        say(f"the lab in {cluster.dir} is down")
    else:
        say(f"no lab is up in {cluster.dir}")
    return 0


def api_workers(port: int, ca_file: Path) -> list[dict]:
    context = ssl.create_default_context(cafile=str(ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        conn.request(
            "GET", "/v1/workers", headers={"Authorization": f"Bearer {LAB_TOKEN}"}
        )
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise OSError(f"GET /v1/workers: {resp.status} {body[:200]!r}")
        return json.loads(body)["workers"]
    finally:
        conn.close()


def status(args: argparse.Namespace) -> int:
    cluster = Cluster(args.dir, log=say)
    lab = cluster.load()
    if lab is None:
        say(f"no lab is up in {cluster.dir}")
        return 3
    running = lab.running()
    healthy = all(running.values())
    units = cluster.topology.units()
    for node in lab.nodes.values():
        if not running[node.name]:
            print(f"{node.name:11} {node.address:14} not running")
            continue
        system = node.run("systemctl", "is-system-running", check=False).stdout.strip()
        shown = []
        if node.name in units:
            state = node.run(
                "systemctl", "is-active", units[node.name], check=False
            ).stdout.strip()
            shown.append(f"{units[node.name]} {state}")
            healthy = healthy and state == "active"
        print(
            f"{node.name:11} {node.address:14} pid {node.leader:<8} system {system:10} "
            + " ".join(shown)
        )
    port = cluster.forwarded_port(lab)
    if port is None:
        print("API        not forwarded ('make lab' starts the forwarder again)")
        healthy = False
    else:
        try:
            workers = api_workers(port, cluster.pki / "ca.pem")
            seen = ", ".join(f"{w['name']} {w['state']}" for w in workers)
            print(f"API        https://127.0.0.1:{port}: workers {seen or 'none'}")
        except (OSError, ssl.SSLError, ValueError) as exc:
            print(f"API        https://127.0.0.1:{port}: {exc}")
            healthy = False
    return 0 if healthy else 1


def on_node(args: argparse.Namespace, *cmd: str) -> int:
    cluster = Cluster(args.dir, log=say)
    lab = cluster.load()
    if lab is None:
        say(f"no lab is up in {cluster.dir}")
        return 3
    argv = cluster.node_command(lab, args.node, *cmd)
    env = dict(CLEAN_ENV, TERM=os.environ.get("TERM", "xterm"))
    sys.stdout.flush()
    os.execvpe(argv[0], argv, env)  # noqa: S606 (argv is a list, no shell)
    return 1  # not reached


def shell(args: argparse.Namespace) -> int:
    return on_node(args, "bash", "-l")


def journal(args: argparse.Namespace) -> int:
    return on_node(args, "journalctl", "--no-pager", *args.args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab",
        description="A jobgate cluster on systemd-nspawn nodes, for people.",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="%(default)s")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="boot the lab or provision it again")
    p.add_argument("--debs", type=Path, help=f"the packages (last run's, else {DEBS})")
    p.add_argument(
        "--scripts", type=Path, help=f"the job scripts (last run's, else {SCRIPTS})"
    )
    p.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port of 127.0.0.1 forwarded to the API (0: any) [%(default)s]",
    )
    p.add_argument(
        "--spare",
        action="append",
        default=[],
        metavar="NAME",
        help="one more node that site.yml leaves alone (repeatable)",
    )
    p.add_argument(
        "--ha",
        action="store_true",
        help="two schedulers on one PostgreSQL node, and two workers "
        "(inventories/lab/ha.ini); a lab that is up keeps the topology it has",
    )
    p.add_argument("--quiet", action="store_true", help="no playbook output")
    p.set_defaults(func=up)
    sub.add_parser("down", help="stop and remove the lab").set_defaults(func=down)
    sub.add_parser("status", help="what runs").set_defaults(func=status)
    p = sub.add_parser("shell", help="a root shell on a node")
    p.add_argument("node")
    p.set_defaults(func=shell)
    p = sub.add_parser("journal", help="journalctl on a node")
    p.add_argument("node")
    p.add_argument("args", nargs=argparse.REMAINDER, help="journalctl's arguments")
    p.set_defaults(func=journal)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    try:
        rc = args.func(args)
    except LabError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 1
    if args.command in ("up", "down"):
        say(f"{args.command} took {time.monotonic() - t0:.0f}s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
