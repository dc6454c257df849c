"""The command line the two services share: ``serve`` and ``check-config``.

``jobgate-scheduler`` and ``jobgate-worker`` are built on :func:`main`; the
user's command, ``jobgate``, is :mod:`jobgate.client.cli`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobgate import __version__, logs
from jobgate.config import ConfigError
from jobgate.errors import JobgateError


def main(
    prog: str,
    load: Callable[[Path], Any],
    serve: Callable[[Any, argparse.Namespace], int],
    argv: list[str] | None = None,
    extra: Callable[[argparse._SubParsersAction], None] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the service")
    p_serve.add_argument("config", type=Path, help="TOML config file")
    p_serve.add_argument(
        "--ready-file",
        type=Path,
        help="write the bound ports as JSON to this file once serving",
    )
    p_check = sub.add_parser("check-config", help="validate a config file and exit")
    p_check.add_argument("config", type=Path)
    if extra:
        extra(sub)
    args = parser.parse_args(argv)
    if args.command not in ("serve", "check-config"):
        return args.func(args)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(f"{args.config}: OK")
        return 0
    logs.setup(cfg.log.level, prog)
    try:
        return serve(cfg, args)
    except (OSError, JobgateError) as exc:
        # Start-up failures that the operator must fix (ports, permissions).
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
