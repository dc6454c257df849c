"""The Falcon application of the scheduler's HTTP API."""

from __future__ import annotations

import falcon.asgi

from scheduler import metrics
from scheduler.fanout import FanOut
from scheduler.http import console, errors, openapi
from scheduler.http import resources as r
from scheduler.http.auth import OPEN_PATHS, Auth, TokenFile
from scheduler.http.middleware import AccessLog, RequestId
from scheduler.http.streams import StreamSlots
from scheduler.usecases import UseCases


def create_app(
    cases: UseCases,
    tokens: TokenFile,
    client_scopes: dict[str, str] | None = None,
) -> falcon.asgi.App:
    """The HTTP API. ``client_scopes`` enables client-certificate auth."""
    cfg = cases.cfg
    files = console.load() if cfg.http.console else {}
    if files:
        # The console's own files need no token (scheduler.http.console).
        auth = Auth(
            tokens,
            cfg.cluster.name,
            client_scopes,
            OPEN_PATHS | {"/", console.PREFIX.rstrip("/")},
            console.PREFIX,
        )
    else:
        auth = Auth(tokens, cfg.cluster.name, client_scopes)
    middleware = [RequestId(), metrics.Middleware(), auth]
    if cfg.http.access_log:
        # After RequestId, so the line carries the request's id.
        middleware.insert(1, AccessLog())
    app = falcon.asgi.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app, cfg.workers.retry_after_s)
    slots = StreamSlots(
        cfg.http.max_followers,
        cfg.http.max_followers_per_caller,
        cfg.workers.retry_after_s,
    )
    args = (cases, cfg.http.max_body_bytes, auth, slots, cfg.http.max_json_depth)
    app.add_route("/openapi.json", r.OpenAPI(openapi.document()))
    app.add_route("/metrics", r.Metrics(cases))
    app.add_route("/healthz", r.Health())
    app.add_route("/readyz", r.Ready(cases, tokens))
    app.add_route("/v1/whoami", r.WhoAmI(*args))
    app.add_route("/v1/workers", r.Workers(*args))
    app.add_route("/v1/workers/{worker}", r.Worker(*args))
    app.add_route("/v1/workers/{worker}/drain", r.WorkerDrain(*args))
    app.add_route("/v1/workers/{worker}/jobs", r.Jobs(*args))
    app.add_route("/v1/workers/{worker}/jobs/{job}", r.Job(*args))
    app.add_route("/v1/workers/{worker}/jobs/{job}/stop", r.JobStop(*args))
    app.add_route("/v1/workers/{worker}/jobs/{job}/output", r.JobOutput(*args))
    fanout = FanOut(cases, cfg.fanout.max_parallel, cfg.fanout.max_workers)
    app.add_route("/v1/jobs", r.FanOutJobs(fanout, *args))
    app.add_route("/v1/groups/{group}", r.Group(fanout, *args))
    app.add_route("/start", r.LegacyStart(*args))
    app.add_route("/stop", r.LegacyStop(*args))
    app.add_route("/query", r.LegacyQuery(*args))
    app.add_route("/stream", r.LegacyStream(*args))
    if files:
        app.add_route("/", console.Root())
        ui = console.Files(files)
        app.add_route(console.PREFIX.rstrip("/"), ui)
        app.add_route(console.PREFIX + "{name}", ui)
    return app
