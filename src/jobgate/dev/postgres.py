"""A throwaway PostgreSQL server for development and tests.

It runs Debian's ``postgresql`` package binaries on a data directory of its
own (``initdb`` + ``pg_ctl``), with no system service: the tests start one
for their session, and a local cluster may run its schedulers on one. The
server listens on a unix socket in its directory, and on 127.0.0.1 only when
asked (``tcp=True``). Connections over the socket are trusted; over TCP they
need the password of the ``jobgate`` role (``password``), so both ways a
client may connect are there to test.

Run as root, the server runs as the ``postgres`` user of the package (or
``nobody``): PostgreSQL refuses to run as root. Its directory must then be
one that user can reach.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

# The port in the socket's name (.s.PGSQL.<port>); over TCP, a free one.
SOCKET_PORT = 5432
ROLE = "jobgate"
# Settings of a server whose data may be lost: it is for tests and
# development. Durability as in production is asked with ``durable=True``.
FAST = {"fsync": "off", "full_page_writes": "off", "synchronous_commit": "off"}


class PostgresError(Exception):
    """The server could not be set up or started; the message says why."""


def find_bindir() -> Path | None:
    """Where ``initdb``, ``pg_ctl`` and ``postgres`` are, or None.

    ``JOBGATE_PG_BINDIR`` first; then Debian's ``/usr/lib/postgresql/<version>/bin``
    (the newest), which the package does not put on ``PATH``; then ``PATH``.
    """
    candidates: list[Path] = []
    if os.environ.get("JOBGATE_PG_BINDIR"):
        candidates.append(Path(os.environ["JOBGATE_PG_BINDIR"]))
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
        reverse=True,
    )
    candidates += versions
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _server_user() -> pwd.struct_passwd | None:
    """The account to run the server as, when this process is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresError("running as root, and neither 'postgres' nor 'nobody' exist")


def _free_port() -> int:
    # PostgreSQL cannot bind port 0 and tell which port it got, so a free
    # port is picked here; start() tries another if it is taken meanwhile.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A PostgreSQL server with its data under ``directory``.

    ``directory`` is created if missing; ``data/`` holds the cluster,
    ``socket/`` its unix socket, ``postgres.log`` its log. A server already
    initialised there is started again with its data. With ``tls_cert`` and
    ``tls_key`` (PEM files; the certificate naming 127.0.0.1), connections
    over TCP may use TLS; ``tls_ca``, the CA that signed it, goes into the
    URLs of :meth:`url` with ``tls=True``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tcp: bool = False,
        durable: bool = False,
        settings: dict[str, str] | None = None,
        bindir: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
    ):
        self.dir = Path(directory).resolve()
        self.data = self.dir / "data"
        self.socket_dir = self.dir / "socket"
        self.log = self.dir / "postgres.log"
        self.password_file = self.dir / "password"
        self.tcp = tcp
        self.port = 0  # the TCP port once started, if tcp
        self.settings = {**({} if durable else FAST), **(settings or {})}
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise PostgresError(
                "PostgreSQL's server binaries (initdb, pg_ctl) were not found: "
                "install Debian's postgresql package (make postgres-deps) or set "
                "JOBGATE_PG_BINDIR"
            )
        self.user = _server_user()
        self.started = False
        # TLS on TCP (a unix socket never has it): a PEM certificate and key.
        self.tls = (Path(tls_cert), Path(tls_key)) if tls_cert and tls_key else None
        self.tls_ca = Path(tls_ca) if tls_ca else None  # for url(tls=True)

    # -- running the binaries ---------------------------------------------------

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        tool = str(self.bindir / argv[0])
        kwargs: dict = {}
        if self.user is not None:
            kwargs = {
                "user": self.user.pw_uid,
                "group": self.user.pw_gid,
                "extra_groups": [],
            }
        proc = subprocess.run(
            [tool, *argv[1:]],
            capture_output=True,
            text=True,
            cwd=self.dir,
            env={**_clean_env(), "LC_ALL": "C", "TZ": "UTC"},
            **kwargs,
        )
        if check and proc.returncode != 0:
            raise PostgresError(
                f"{argv[0]} failed (exit status {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    # -- life -----------------------------------------------------------------

    def initialize(self) -> None:
        """``initdb`` the data directory, unless it holds a cluster already."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None and not _reachable_by(self.dir, self.user):
            raise PostgresError(
                f"{self.dir} is not reachable by user {self.user.pw_name!r}, who "
                "runs the server: use a directory every user may traverse"
            )
        if (self.data / "PG_VERSION").exists():
            return
        self.data.mkdir(mode=0o700, exist_ok=True)
        self.socket_dir.mkdir(mode=0o755, exist_ok=True)
        self._own(self.data)
        self._own(self.socket_dir)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n")
        os.chmod(self.password_file, 0o600)
        # initdb reads the superuser's password from a file it can read.
        pwfile = self.dir / "initdb.pw"
        pwfile.write_text(self.password)
        self._own(pwfile)
        try:
            self._run(
                "initdb",
                *("-D", str(self.data), "-U", ROLE, "--pwfile", str(pwfile)),
                *("--auth-local", "trust", "--auth-host", "scram-sha-256"),
                *("-E", "UTF8", "--locale", "C", "--no-sync"),
            )
        finally:
            pwfile.unlink(missing_ok=True)

    @property
    def password(self) -> str:
        """The password of the ``jobgate`` role (needed over TCP)."""
        return self.password_file.read_text().strip()

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections."""
        self.initialize()
        if self._pid() is not None:
            raise PostgresError(f"a server already runs on {self.data}")
        self.log.touch()
        self._own(self.log)
        if self.tls is not None:
            # The server reads them as its user, the key private to it.
            names = ("server.crt", "server.key")
            for name, source in zip(names, self.tls, strict=True):
                target = self.data / name
                shutil.copyfile(source, target)
                os.chmod(target, 0o600)
                self._own(target)
            self.settings = {
                "ssl": "on",
                "ssl_cert_file": "'server.crt'",
                "ssl_key_file": "'server.key'",
                **self.settings,
            }
        for attempt in range(5):
            if self.tcp and not (attempt == 0 and self.port):
                self.port = _free_port()  # a start again keeps its port
            options = {
                "unix_socket_directories": f"'{self.socket_dir}'",
                "listen_addresses": "'127.0.0.1'" if self.tcp else "''",
                "port": str(self.port or SOCKET_PORT),
                **self.settings,
            }
            # The socket is named after the port: over TCP, the port picked.
            opts = " ".join(f"-c {k}={v}" for k, v in options.items())
            proc = self._run(
                *("pg_ctl", "start", "-w", "-t", str(int(timeout))),
                *("-D", str(self.data), "-l", str(self.log), "-o", opts),
                check=False,
            )
            if proc.returncode == 0:
                self.started = True
                return
            if self.tcp and "already in use" in self._log_tail() and attempt < 4:
                continue  # another process took the port meanwhile
            raise PostgresError(
                f"pg_ctl start failed: {proc.stderr.strip()}\n{self._log_tail()}"
            )

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, wait ``down_s``, and start it again on its port."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are closed)."""
        if self._pid() is None:
            self.started = False
            return
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))
        self.started = False

    def _pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        return self._pid()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- databases --------------------------------------------------------------

    @property
    def socket_port(self) -> int:
        return self.port or SOCKET_PORT

    def url(
        self, dbname: str = "postgres", *, tcp: bool = False, tls: bool = False
    ) -> str:
        """A URL of database ``dbname``: over the socket, or over TCP (then
        the password is needed: ``password_file``), with TLS if ``tls``."""
        if tcp or tls:
            if not self.port:
                raise PostgresError("this server does not listen on TCP")
            url = f"postgresql://{ROLE}@127.0.0.1:{self.port}/{dbname}"
            if tls:
                if self.tls is None or self.tls_ca is None:
                    raise PostgresError("this server was given no TLS certificate")
                ca = urllib.parse.quote(str(self.tls_ca), safe="/")
                url += f"?sslmode=verify-full&sslrootcert={ca}"
            return url
        host = urllib.parse.quote(str(self.socket_dir), safe="")
        return f"postgresql://{ROLE}@{host}:{self.socket_port}/{dbname}"

    def psql_args(self, dbname: str = "postgres") -> list[str]:
        """Arguments of ``psql`` (the client) for database ``dbname``."""
        return [
            *("-h", str(self.socket_dir), "-p", str(self.socket_port)),
            *("-U", ROLE, "-d", dbname),
        ]

    def create_database(self, name: str | None = None) -> str:
        """Create a database (a new name unless given); returns its URL."""
        import psycopg

        name = name or f"jobgate_{secrets.token_hex(6)}"
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise PostgresError(f"{name!r} is not a plain database name")
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A new database for as long as the block lasts; yields its URL."""
        url = self.create_database()
        try:
            yield url
        finally:
            self.drop_database(url.rsplit("/", 1)[1])


def _clean_env() -> dict[str, str]:
    # libpq's and the server's environment variables would change what the
    # tools do (PGDATA, PGPORT, PGHOST...): none are passed.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether ``user`` may traverse every directory down to ``path``."""
    for p in [path, *path.parents]:
        st = p.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == user.pw_gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            return False
    return True
