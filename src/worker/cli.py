"""``jobgate-worker``: serve, or validate a config."""

from __future__ import annotations

import sys

from jobgate import service_cli
from worker import config


def _serve(cfg, args) -> int:
    from worker.server import serve  # imports grpc: only when serving

    return serve(cfg, args.ready_file)


def main(argv: list[str] | None = None) -> int:
    return service_cli.main("jobgate-worker", config.load, _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
