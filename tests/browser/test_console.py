"""The web console at /ui/, driven in headless Chromium against a live cluster.

The selectors are those of the console's DOM contract: ``body[data-view]``
and ``body[data-ready]`` say which view is shown and that its first data is
there; the ids name the forms, tables and fields.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path

CONSOLE_DIR = Path(__file__).resolve().parents[2] / "src" / "scheduler" / "console"
JOB_ROUTE = re.compile(r"#/workers/([^/?]+)/jobs/([^/?]+)$")
GROUP_ROUTE = re.compile(r"#/groups/([^/?]+)$")

# The console's files are served with exactly this policy.
CSP = {
    "default-src": ["'none'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "connect-src": ["'self'"],
    "base-uri": ["'none'"],
    "form-action": ["'none'"],
    "frame-ancestors": ["'none'"],
}


def counted(n: int) -> str:
    """What ``count.sh n INTERVAL`` prints."""
    return "".join(f"{i}\n" for i in range(1, n + 1))


def worker_state(console, name: str) -> str | None:
    text = console.text(f'table#workers tr.worker[data-name="{name}"] td.state')
    return None if text is None else text.strip()


def job_snapshot(console) -> tuple[str, str]:
    """The job view's state and output, read at the same instant."""
    state, output = console.js(
        "const s = document.querySelector('#job-state');"
        "const o = document.querySelector('pre#job-output');"
        "return [s ? s.textContent.trim() : null, o ? o.textContent : null];"
    )
    return state, output


def open_job(console, worker: str, job_id: str) -> None:
    console.go(f"#/workers/{worker}/jobs/{job_id}")
    console.wait_view("job")
    assert console.exists("pre#job-output"), console.describe()


def wait_final(api, worker: str, job_id: str) -> dict:
    """The job's status once it has ended (its output followed to the end)."""
    api.output(worker, job_id)
    status, _, job = api.get(f"/v1/workers/{worker}/jobs/{job_id}")
    assert status == 200, job
    return job


def test_sign_in_refuses_a_bad_token_then_lists_both_workers_online(
    console, console_cluster
):
    console.open()
    console.wait_signin()
    assert console.js("return document.querySelector('input#token').type") == (
        "password"
    )
    assert not (console.text("#signin-error") or "").strip() or not console.shown(
        "#signin-error"
    ), "a sign-in error is shown before any sign-in"

    console.fill("input#token", "not-a-token-of-this-cluster")
    console.click("button#signin-submit")
    console.wait(
        lambda: (
            (console.text("#signin-error") or "").strip()
            and console.shown("#signin-error")
        ),
        "no message in #signin-error for a wrong token",
    )
    assert console.view()[0] == "signin"

    console.fill("input#token", console_cluster.token)
    console.click("button#signin-submit")
    console.wait_view("workers")
    for name in ("worker-1", "worker-2"):
        console.wait(
            lambda name=name: worker_state(console, name) == "online",
            lambda name=name: (
                f"{name} is not listed online in table#workers "
                f"(state cell: {worker_state(console, name)!r})"
            ),
        )
    whoami = console.text("#whoami") or ""
    assert "dev" in whoami and "run" in whoami, whoami
    assert console.exists("#signout")
    console.screenshot("console-workers")
    console.assert_clean_log()


def test_started_job_shows_its_output_while_it_runs(
    console, console_cluster, console_api
):
    n = 12
    console.sign_in(console_cluster.token)
    console.go("#/start")
    console.wait_view("start")
    assert console.value("input#start-command") == "bash"
    console.select("select#start-worker", "worker-1")
    console.fill("input#start-path", "count.sh")
    console.fill("textarea#start-args", f"{n}\n0.5")
    console.screenshot("console-start")
    console.click("button#start-submit")

    console.wait(
        lambda: console.view()[0] == "job",
        "submitting the start form did not open the job's page",
    )
    route = console.js("return location.hash")
    match = JOB_ROUTE.search(route)
    assert match, route
    job_id = match.group(2)

    # Lines must show up while the job still runs, not all at its end.
    seen = console.wait(
        lambda: (
            (s := job_snapshot(console))[0] == "running"
            and (s[1] or "").startswith("1\n2\n")
            and s
        ),
        "the output did not appear while #job-state said running",
    )
    assert counted(n).startswith(seen[1]), seen
    assert console.shown("button#job-stop")

    console.wait_text("#job-state", "succeeded")
    console.wait(
        lambda: console.text("pre#job-output") == counted(n),
        lambda: (
            f"pre#job-output is not the whole output {counted(n)!r} "
            f"(seen: {console.text('pre#job-output')!r})"
        ),
    )
    assert not (console.text("#output-notice") or "").strip()
    assert not console.exists("button#job-stop")
    assert console.exists("a#job-download")
    console.screenshot("console-job")

    job = wait_final(console_api, "worker-1", job_id)
    assert (job["state"], job["path"], job["args"]) == (
        "succeeded",
        "count.sh",
        [str(n), "0.5"],
    )
    console.assert_clean_log()


def test_stop_button_stops_a_long_job(console, console_cluster, console_api):
    job = console_api.start("worker-2", "sleep.sh", ["300"])
    console.sign_in(console_cluster.token)
    # A run token is offered a start on the worker's page.
    console.go("#/workers/worker-2")
    console.wait_view("worker")
    assert console.attrs("a#start-here", "href")[0].endswith(
        "#/start?worker=worker-2"
    ), console.attrs("a#start-here", "href")
    open_job(console, "worker-2", job["job_id"])
    console.wait_text("#job-state", "running")
    console.wait(
        lambda: console.text("pre#job-output") == "sleeping\n",
        "sleep.sh's first line is not in pre#job-output",
    )

    console.click("button#job-stop")
    console.wait_text("#job-state", "stopped")
    console.wait(
        lambda: not console.exists("button#job-stop"),
        "button#job-stop is still there after the job stopped",
    )
    final = wait_final(console_api, "worker-2", job["job_id"])
    assert (final["state"], final["stopped_by"]) == ("stopped", "token dev")
    console.assert_clean_log()


def test_read_token_browses_without_start_or_stop(console, console_api, tokens):
    reader = tokens.add("read", "auditor")
    job = console_api.start("worker-1", "sleep.sh", ["300"])
    try:
        console.sign_in(reader)
        whoami = console.text("#whoami") or ""
        assert "auditor" in whoami and "read" in whoami, whoami
        for name in ("worker-1", "worker-2"):
            console.wait(
                lambda name=name: worker_state(console, name) == "online",
                f"{name} is not listed online",
            )
        assert not console.shown_count('a[href*="#/start"]'), "a start link for read"

        for name in ("worker-2", "worker-1"):
            console.go(f"#/workers/{name}")
            console.wait_view("worker")
            console.wait_text("#worker-name", name)
            assert not console.exists("a#start-here")
            assert not console.shown_count('a[href*="#/start"]')
        console.wait(
            lambda: console.exists(
                f'table#worker-jobs tr.job[data-job-id="{job["job_id"]}"]'
            ),
            "the running job is not listed on worker-1's page",
        )

        open_job(console, "worker-1", job["job_id"])
        console.wait_text("#job-state", "running")
        assert not console.exists("button#job-stop"), "a stop button for `read`"
        assert not (console.text("#error") or "").strip(), console.describe()

        console.drain_log()
        forbidden = [
            r for r in console.resource_urls() if r["status"] in (401, 403)
        ] + [e for e in console.log if "status of 403" in e["message"]]
        assert not forbidden, forbidden
        console.assert_clean_log()
    finally:
        console_api.post(f"/v1/workers/worker-1/jobs/{job['job_id']}/stop")


def test_reloaded_job_page_shows_the_whole_output(
    console, console_cluster, console_api
):
    n = 30
    job = console_api.start("worker-1", "count.sh", [str(n), "0.3"])
    console.sign_in(console_cluster.token)
    open_job(console, "worker-1", job["job_id"])
    console.wait(
        lambda: (
            (s := job_snapshot(console))[0] == "running"
            and (s[1] or "").count("\n") >= 5
        ),
        "five lines of output were not shown while the job ran",
    )

    console.driver.refresh()
    console.wait_view("job")
    # Straight after the reload, while it still runs: the output from its
    # first line, each line once.
    state, output = console.wait(
        lambda: (s := job_snapshot(console))[1] and s,
        "pre#job-output stayed empty after the reload",
    )
    assert counted(n).startswith(output), (state, output)
    assert state == "running", "the job ended before the reloaded page showed it"

    console.wait_text("#job-state", "succeeded")
    status, _, plain = console_api.get(
        f"/v1/workers/worker-1/jobs/{job['job_id']}/output"
    )
    assert status == 200
    assert plain.decode() == counted(n)
    console.wait(
        lambda: console.text("pre#job-output") == plain.decode(),
        lambda: (
            "after the reload pre#job-output is not the job's whole output "
            f"(seen: {console.text('pre#job-output')!r})"
        ),
    )
    console.assert_clean_log()


def test_console_loads_nothing_from_another_origin(
    console, console_cluster, console_api
):
    origin = console_cluster.url + "/"
    job = console_api.start("worker-2", "hello.sh", ["x"])
    wait_final(console_api, "worker-2", job["job_id"])
    console.sign_in(console_cluster.token)
    seen: dict[str, dict] = {}
    for route, view in [
        ("#/workers", "workers"),
        ("#/workers/worker-2", "worker"),
        (f"#/workers/worker-2/jobs/{job['job_id']}", "job"),
        ("#/start", "start"),
        ("#/fanout", "fanout"),
    ]:
        console.go(route)
        console.wait_view(view)
        for entry in console.resource_urls():
            seen[entry["name"]] = entry
        loaded = console.js(
            "return Array.from(document.querySelectorAll("
            "'script[src], link[href], img[src], iframe, object, embed, source'),"
            " e => e.src || e.href || e.data || '');"
        )
        strangers = [u for u in loaded if not (u.startswith(origin))]
        assert not strangers, (route, strangers)

    names = sorted(seen)
    assert f"{console_cluster.url}/ui/app.js" in names, names
    assert any("/v1/" in n for n in names), names
    assert [n for n in names if n.startswith(f"{console_cluster.url}/ui/")]
    strangers = [n for n in names if not n.startswith(origin)]
    assert not strangers, f"resources from another origin: {strangers}"
    assert [e for e in seen.values() if e["type"] == "navigation"], seen
    console.assert_clean_log()


def parse_csp(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def test_console_files_come_with_the_security_headers(console_cluster):
    served = {".html", ".js", ".css", ".svg", ".png", ".ico", ".txt"}
    files = sorted(
        f.name for f in CONSOLE_DIR.iterdir() if f.is_file() and f.suffix in served
    )
    assert "index.html" in files and "app.js" in files, files
    for path in ["/ui/", *(f"/ui/{name}" for name in files)]:
        status, headers, body = console_cluster.request("GET", path, token="")
        if path == "/ui/index.html" and status in (301, 302, 308):
            # One address for the page: /ui/index.html may send to /ui/.
            assert urllib.parse.urlsplit(headers["Location"]).path == "/ui/"
            continue
        assert status == 200, (path, status, body[:200])
        ctype = headers.get("Content-Type", "")
        if path == "/ui/" or path.endswith(".html"):
            assert ctype.startswith("text/html"), (path, ctype)
        if path.endswith(".js"):
            # Module scripts under nosniff need a JavaScript type.
            assert "javascript" in ctype, (path, ctype)
        assert body
        csp = headers.get("Content-Security-Policy")
        assert csp, (path, dict(headers))
        assert parse_csp(csp) == CSP, (path, csp)
        assert headers.get("X-Content-Type-Options") == "nosniff", path
        assert headers.get("Referrer-Policy") == "no-referrer", path

    status, headers, _ = console_cluster.request("GET", "/", token="")
    assert status in (301, 302, 303, 307, 308), status
    location = urllib.parse.urlsplit(headers.get("Location", ""))
    assert location.path == "/ui/", headers.get("Location")


def test_revoked_token_returns_to_sign_in(console, tokens):
    token = tokens.add("run", "soon-revoked")
    console.sign_in(token)
    console.wait(
        lambda: worker_state(console, "worker-1") == "online",
        "worker-1 is not listed online",
    )
    tokens.remove("soon-revoked")
    # The workers view refreshes by itself; its next call meets the 401.
    console.wait_signin()
    console.wait(
        lambda: (
            (console.text("#signin-error") or "").strip()
            and console.shown("#signin-error")
        ),
        "no message in #signin-error after the token was revoked",
    )
    # The token is gone from the page: kept nowhere, and a reload does not
    # sign in again.
    kept = console.js(
        "return Object.values(sessionStorage).concat(Object.values(localStorage))"
    )
    assert token not in kept
    console.driver.refresh()
    console.wait_signin()
    console.assert_clean_log()


def test_fanout_to_all_workers_shows_the_group(console, console_cluster, console_api):
    console.sign_in(console_cluster.token)
    console.go("#/fanout")
    console.wait_view("fanout")
    console.check("input#fanout-all")
    console.fill("input#fanout-command", "bash")
    console.fill("input#fanout-path", "count.sh")
    console.fill("textarea#fanout-args", "3\n0.2")
    console.click("button#fanout-submit")

    console.wait(
        lambda: console.view()[0] == "group",
        lambda: (
            "no group page after the fan-out (#fanout-error: "
            f"{console.text('#fanout-error')!r})"
        ),
    )
    match = GROUP_ROUTE.search(console.js("return location.hash"))
    assert match, console.describe()
    group_id = match.group(1)
    console.wait_view("group")

    def states():
        return [
            (s or "").strip()
            for s in console.texts("table#group-jobs tr.group-job td.state")
        ]

    console.wait(
        lambda: states() == ["succeeded", "succeeded"],
        lambda: f"table#group-jobs did not list two succeeded jobs ({states()})",
    )
    assert (console.text("#group-summary") or "").strip()
    console.screenshot("console-group")

    status, _, group = console_api.get(f"/v1/groups/{group_id}?wait=true")
    assert status == 200, group
    assert group["summary"]["jobs"] == 2, group
    assert sorted(console.attrs("tr.group-job", "data-job-id")) == sorted(
        j["job_id"] for j in group["jobs"]
    )
    assert group["summary"]["states"] == {"succeeded": 2}, group
    _, _, workers = console_api.get("/v1/workers")
    assert {j["worker_id"] for j in group["jobs"]} == {
        w["id"] for w in workers["workers"]
    }
    console.assert_clean_log()


def test_drain_button_drains_and_undrains_a_worker(console, console_cluster):
    console.sign_in(console_cluster.token)
    console.go("#/workers/worker-2")
    console.wait_view("worker")
    console.wait_text("button#worker-drain", "Drain")
    console.click("button#worker-drain")  # confirm() is accepted
    console.wait_text("button#worker-drain", "Undrain")
    console.wait(
        lambda: "draining" in (console.text("#worker-state") or ""),
        "the worker's state does not say it is draining",
    )
    status, _, body = console_cluster.request(
        "POST",
        "/v1/workers/worker-2/jobs",
        {"command": "bash", "path": "count.sh", "args": ["1"]},
    )
    assert status == 503 and b"drain" in body, (status, body)
    console.click("button#worker-drain")
    console.wait_text("button#worker-drain", "Drain")
    status, _, body = console_cluster.request("GET", "/v1/workers/worker-2")
    assert status == 200 and json.loads(body)["draining"] is False, body
    console.assert_clean_log()


def test_dot_segments_in_a_link_are_refused_not_followed(console, console_cluster):
    # "." and ".." in a name would be resolved by the browser to another
    # route (#/start?worker=.. would post a start to /v1/jobs).
    console.sign_in(console_cluster.token)
    for route in ("#/workers/..", "#/workers/worker-1/jobs/.."):
        console.go(route)
        console.wait(
            lambda: "is not a name or an id" in (console.text("#error") or ""),
            lambda route=route: f"{route}: #error reads {console.text('#error')!r}",
        )
    console.assert_clean_log()
