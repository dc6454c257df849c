"""The scheduler's state: workers, the job index and fan-out groups.

One interface (:class:`Store`, in :mod:`scheduler.store.base`), two
databases behind it: SQLite (:mod:`scheduler.store.sqlite`), the embedded
default for one scheduler, and PostgreSQL (:mod:`scheduler.store.postgres`),
which several schedulers can share. :func:`open_store` picks one by the
config's ``[state]``; nothing else in the scheduler knows which one runs.
"""

from __future__ import annotations

from scheduler.store.base import (
    MAX_DEGRADED_CHARS,
    OFFLINE,
    ONLINE,
    UNREACHABLE,
    Busy,
    Store,
    WorkerRow,
    timestamp,
)
from scheduler.store.sqlite import SqliteStore

__all__ = [
    "MAX_DEGRADED_CHARS",
    "OFFLINE",
    "ONLINE",
    "UNREACHABLE",
    "Busy",
    "SqliteStore",
    "Store",
    "WorkerRow",
    "open_store",
    "read_password",
    "timestamp",
]


def open_store(state, application_name: str = "jobgate-scheduler") -> Store:
    """The store that ``state`` (the config's ``[state]`` section) names.

    An empty ``url`` is SQLite at ``path``; a ``postgresql://`` URL is
    PostgreSQL, with the password read from ``password_file`` now. The
    store is not initialised: the scheduler's main process does that once
    (:meth:`Store.initialize`), before its HTTP processes open theirs.
    """
    if not state.url:
        return SqliteStore(state.path, state.busy_timeout_s)
    # Imported here: a scheduler on SQLite never loads the driver.
    from scheduler.store.postgres import PostgresStore

    return PostgresStore(
        state.url,
        read_password(state.password_file),
        pool_min=state.pool_min,
        pool_max=state.pool_max,
        pool_timeout_s=state.pool_timeout_s,
        connect_timeout_s=state.connect_timeout_s,
        statement_timeout_s=state.statement_timeout_s,
        network_timeout_s=state.network_timeout_s,
        application_name=application_name,
    )


def read_password(path) -> str | None:
    """The password in the file at ``path`` (its first line), or None."""
    if path is None:
        return None
    try:
        text = path.read_text()
    except OSError as exc:
        raise OSError(f"[state].password_file: cannot read {path}: {exc}") from None
    password = text.split("\n", 1)[0].rstrip("\r")
    if not password:
        raise OSError(f"[state].password_file: {path} holds no password")
    return password
