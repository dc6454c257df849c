"""The HTTP half of the scheduler: the Falcon ASGI app under gunicorn.

Started by ``scheduler.http_child`` as a child process with an already-bound
listening socket (``--listen-fd``), so port 0 works and the port is known
before gunicorn starts. Each gunicorn worker process serves the app on an
event loop (:class:`scheduler.http_worker.AsyncHttpWorker`). The app is built
in each worker process after the fork, so no gRPC object ever crosses a fork.
On ``--events-fd`` each worker process writes ``up PID`` once it has loaded
the app, and the gunicorn master ``exit PID`` when one has exited: the
scheduler's main process (:mod:`scheduler.http_child`) tells from them
whether the HTTP side serves or keeps failing.

This process dies with the scheduler's main process (``--parent-pid``): the
kernel signals it when its parent goes, even by ``kill -9``, so a restarted
scheduler never finds its port held by an orphan.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys

from gunicorn.app.base import BaseApplication

from jobgate import logs
from scheduler import config
from scheduler.http.connection import Limits
from scheduler.http_worker import AsyncHttpWorker, die_with_parent


class HttpServer(BaseApplication):
    def __init__(
        self,
        cfg: config.SchedulerConfig,
        listen_fd: int,
        events_fd: int,
        grpc_target: str,
    ):
        self.jg_cfg = cfg
        self.listen_fd = listen_fd
        self.events_fd = events_fd
        self.grpc_target = grpc_target
        super().__init__()

    def load_config(self) -> None:
        h = self.jg_cfg.http
        AsyncHttpWorker.limits = Limits(
            request_timeout_s=h.request_timeout_s,
            keepalive_s=h.keepalive_s,
            max_connections=h.max_connections,
            max_request_line_bytes=h.max_request_line_bytes,
            max_head_bytes=h.max_head_bytes,
            max_body_bytes=h.max_body_bytes,
            retry_after_s=self.jg_cfg.workers.retry_after_s,
        )
        events_fd = self.events_fd

        def tell(event: str, pid: int) -> None:
            try:
                # One short write: atomic on a pipe, whoever else writes.
                os.write(events_fd, f"{event} {pid}\n".encode())
            except OSError:
                pass  # the main process is gone; this process follows it

        def post_worker_init(worker) -> None:
            tell("up", worker.pid)

        def child_exit(server, worker) -> None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(worker.pid)
            tell("exit", worker.pid)

        settings = {
            "child_exit": child_exit,
            "bind": [f"fd://{self.listen_fd}"],
            "workers": h.processes,
            "worker_class": "scheduler.http_worker.AsyncHttpWorker",
            "timeout": h.timeout_s,
            "graceful_timeout": h.graceful_timeout_s,
            # The app writes the access log (scheduler.http.middleware); the
            # worker class serves connections itself and never calls
            # gunicorn's.
            "accesslog": None,
            "errorlog": "-",
            "logconfig_dict": logs.gunicorn_logconfig(
                self.jg_cfg.log.level, "jobgate-scheduler"
            ),
            "proc_name": "jobgate-scheduler-http",
            "post_worker_init": post_worker_init,
            "preload_app": False,
            # Newer gunicorn opens a control socket under $HOME; the service
            # has no use for it and must not write there.
            "control_socket_disable": True,
        }
        if h.scheme == "https":
            settings["certfile"] = str(h.tls.cert_file)
            settings["keyfile"] = str(h.tls.key_file)
            if h.tls.client_ca_file is not None:
                # Optional: a client without a certificate may still use a token.
                settings["ca_certs"] = str(h.tls.client_ca_file)
                settings["cert_reqs"] = ssl.CERT_OPTIONAL
        for key, value in settings.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        from jobgate.tls import Credentials
        from scheduler.http.app import create_app
        from scheduler.http.auth import TokenFile
        from scheduler.store import open_store
        from scheduler.usecases import UseCases
        from scheduler.worker_calls import ChannelPool

        cfg = self.jg_cfg
        store = open_store(cfg.state, "jobgate-scheduler-http")
        pool = ChannelPool(
            cfg.cluster.name, Credentials.load(cfg.tls), cfg.workers.retry_after_s
        )
        cases = UseCases(cfg, store, pool, self.grpc_target)
        tls = cfg.http.tls
        client_scopes = dict(tls.client_scopes) if tls.client_ca_file else None
        return create_app(cases, TokenFile(cfg.auth.tokens_file), client_scopes)


def _raise_open_files_limit() -> None:
    """Each client connection is a file descriptor: allow as many as the
    hard limit (systemd's LimitNOFILE=) permits."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobgate-scheduler-http")
    parser.add_argument("config")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--events-fd", type=int, required=True)
    parser.add_argument("--grpc-target", required=True)
    parser.add_argument("--parent-pid", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the parent died before the line above took effect
    _raise_open_files_limit()
    cfg = config.load(args.config)
    HttpServer(cfg, args.listen_fd, args.events_fd, args.grpc_target).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
