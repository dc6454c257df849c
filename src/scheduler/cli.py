"""``jobgate-scheduler``: serve, validate a config, or hash an API token."""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys

from jobgate import service_cli
from scheduler import config


def _serve(cfg, args) -> int:
    from scheduler.server import serve  # imports grpc: only when serving

    return serve(cfg, args.config, args.ready_file)


def _hash_token(args: argparse.Namespace) -> int:
    from jobgate.tokens import hash_token

    if args.generate:
        token = secrets.token_urlsafe(32)
        print(f"token: {token}", file=sys.stderr)
    elif sys.stdin.isatty():
        token = getpass.getpass("token: ")
    else:
        token = sys.stdin.readline().strip()
    if len(token) < 16:
        print(
            "jobgate-scheduler: a token must be at least 16 characters", file=sys.stderr
        )
        return 2
    print(f"{hash_token(token)} {args.name} {args.scope}")
    return 0


def _extra(sub) -> None:
    p = sub.add_parser(
        "hash-token",
        help="print a tokens-file line for a token read from stdin (or --generate one)",
    )
    p.add_argument("--name", default="api", help="who the token is for (shown in logs)")
    p.add_argument(
        "--scope",
        choices=("read", "run"),
        default="read",
        help="read: workers, status, output; run: also start and stop jobs",
    )
    p.add_argument(
        "--generate",
        action="store_true",
        help="make a random token and print it on stderr",
    )
    p.set_defaults(func=_hash_token)


def main(argv: list[str] | None = None) -> int:
    return service_cli.main("jobgate-scheduler", config.load, _serve, argv, _extra)


if __name__ == "__main__":
    sys.exit(main())
