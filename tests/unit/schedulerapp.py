"""The scheduler's use cases and HTTP app on fakes, for unit tests.

A config in a directory of the test's own (placeholder TLS files, a tokens
file), a real state database, and a channel pool that is never dialled:
nothing here reaches a worker unless a test puts a fake in the pool.
"""

from __future__ import annotations

from pathlib import Path

import falcon.asgi

from jobgate import config
from jobgate.tls import Credentials
from scheduler.config import SchedulerConfig
from scheduler.http.app import create_app
from scheduler.http.auth import TokenFile, hash_token
from scheduler.store import SqliteStore
from scheduler.usecases import UseCases
from scheduler.worker_calls import ChannelPool

CONFIG = """
[cluster]
name = "dev"

[http]
bind = "127.0.0.1:0"
scheme = "http"
{http}

[tls]
ca_file = "ca.pem"
cert_file = "cert.pem"
key_file = "key.pem"

[auth]
tokens_file = "tokens"

[state]
path = "state/scheduler.db"

[workers]
{workers}
"""


def use_cases(
    directory: Path,
    tokens: dict[str, tuple[str, str]],
    http: str = "",
    workers: str = "",
) -> UseCases:
    """Use cases whose tokens file holds ``tokens`` (token -> (name, scope));
    ``http`` and ``workers`` are more lines of those tables."""
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (directory / name).write_text("not used\n")
    (directory / "tokens").write_text(
        "".join(
            f"{hash_token(t)} {name} {scope}\n" for t, (name, scope) in tokens.items()
        )
    )
    cfg = config.loads(
        CONFIG.format(http=http, workers=workers), SchedulerConfig, base=directory
    )
    store = SqliteStore(cfg.state.path)
    store.initialize()
    pool = ChannelPool(
        cfg.cluster.name, Credentials(b"ca", b"cert", b"key"), cfg.workers.retry_after_s
    )
    return UseCases(cfg, store, pool)


def app(cases: UseCases) -> falcon.asgi.App:
    """The HTTP app over ``cases``, with the tokens file of their config."""
    return create_app(cases, TokenFile(cases.cfg.auth.tokens_file))
