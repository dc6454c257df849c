"""The ``jobgate`` command against the live cluster, run as a subprocess.

Exit codes are the contract cron and CI rely on, so most tests check them.
Clusters of their own test HTTPS with client certificates and waits longer
than the scheduler's; a small stand-in server gives a 503 on demand.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cluster_of_its_own
from test_https import HttpsCluster

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class Cli:
    """Runs ``python -m jobgate.client.cli`` with a clean environment.

    ``HOME`` is an empty directory, so no config file of the person running
    the tests takes part; ``JOBGATE_URL`` and ``JOBGATE_TOKEN`` point at the
    cluster unless a test overrides or removes them.
    """

    def __init__(self, url: str, token: str, home: Path):
        self.home = home
        self.base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("JOBGATE_") and k != "XDG_CONFIG_HOME"
        }
        self.base.update(HOME=str(home), JOBGATE_URL=url, JOBGATE_TOKEN=token)

    def env(self, **overrides: str | None) -> dict[str, str]:
        env = dict(self.base)
        for key, value in overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "jobgate.client.cli", *args]

    def __call__(
        self, *args: str, timeout: float = 60, **env: str | None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            self.argv(*args),
            env=self.env(**env),
            capture_output=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        proc.out = proc.stdout.decode(errors="replace")  # type: ignore[attr-defined]
        proc.err = proc.stderr.decode(errors="replace")  # type: ignore[attr-defined]
        assert "Traceback" not in proc.err, proc.err
        return proc


@pytest.fixture(scope="module")
def cli(cluster, tmp_path_factory) -> Cli:
    return Cli(cluster.url, cluster.token, tmp_path_factory.mktemp("cli-home"))


def key_values(text: str) -> dict[str, str]:
    """The ``key: value`` lines of human output."""
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def table(text: str) -> list[list[str]]:
    """Rows of a human table (header first), split on runs of spaces."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if line]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- workers ---------------------------------------------------------------------


def test_workers_lists_both_workers_online(cli):
    r = cli("workers")
    assert r.returncode == 0, r.err
    rows = table(r.out)
    assert rows[0][:3] == ["NAME", "STATE", "JOBS"]
    states = {row[0]: row[1] for row in rows[1:]}
    assert states["worker-1"] == "online"
    assert states["worker-2"] == "online"


def test_workers_json_parses(cli):
    r = cli("workers", "--json")
    assert r.returncode == 0, r.err
    workers = {w["name"]: w for w in json.loads(r.out)["workers"]}
    assert workers["worker-1"]["state"] == "online"
    assert UUID_RE.match(workers["worker-2"]["id"])


def test_workers_quiet_prints_only_names(cli):
    r = cli("workers", "-q")
    assert r.returncode == 0, r.err
    assert {"worker-1", "worker-2"} <= set(r.out.split())
    assert "online" not in r.out


def test_worker_shows_one_worker_as_key_values(cli):
    r = cli("worker", "worker-2")
    assert r.returncode == 0, r.err
    fields = key_values(r.out)
    assert fields["name"] == "worker-2"
    assert fields["state"] == "online"
    assert UUID_RE.match(fields["id"])


# -- run: exit codes -------------------------------------------------------------


def test_run_wait_exits_0_when_the_job_succeeds(cli):
    r = cli("run", "worker-1", "hello.sh", "--wait")
    assert r.returncode == 0, r.err
    fields = key_values(r.out)
    assert fields["state"] == "succeeded"
    assert fields["exit_code"] == "0"
    assert r.err == ""  # no progress line when stderr is not a terminal


def test_run_wait_exits_with_the_jobs_exit_code(cli):
    r = cli("run", "worker-1", "mixed.sh", "3", "--wait")
    assert r.returncode == 3
    assert key_values(r.out)["state"] == "failed"
    assert r.err == ""  # a job's code, not an API error


def test_run_wait_json_is_the_final_status(cli):
    r = cli("run", "worker-2", "mixed.sh", "7", "--wait", "--json")
    assert r.returncode == 7
    job = json.loads(r.out)
    assert (job["state"], job["exit_code"], job["reason"]) == (
        "failed",
        7,
        "exited with code 7",
    )


def test_run_wait_exits_124_when_the_job_times_out(cli):
    started = time.monotonic()
    r = cli("run", "worker-1", "sleep.sh", "30", "--timeout", "1", "--wait")
    assert r.returncode == 124, (r.out, r.err)
    assert key_values(r.out)["state"] == "timed_out"
    assert time.monotonic() - started < 20


def test_run_wait_exits_128_plus_signal_when_a_signal_killed_the_job(cli):
    r = cli("run", "worker-2", "killself.sh", "KILL", "--wait", "--json")
    assert r.returncode == 128 + 9, (r.out, r.err)
    assert json.loads(r.out)["signal"] == 9


def test_run_wait_exits_125_when_the_job_is_stopped(cli):
    key = f"cli-stop-{uuid.uuid4()}"
    r = cli("run", "worker-1", "sleep.sh", "60", "--idempotency-key", key)
    assert r.returncode == 0, r.err
    job_id = r.out.strip()
    # Waiting on the same key waits on that job rather than starting another.
    waiter = subprocess.Popen(
        cli.argv(
            "run", "worker-1", "sleep.sh", "60", "--idempotency-key", key, "--wait"
        ),
        env=cli.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        stop = cli("stop", "worker-1", job_id)
        assert stop.returncode == 0, stop.err
        assert key_values(stop.out)["state"] == "stopped"
        out, err = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert waiter.returncode == 125, err
    fields = key_values(out.decode())
    assert (fields["job_id"], fields["state"]) == (job_id, "stopped")


def test_run_without_wait_prints_the_job_id_and_exits_0(cli):
    r = cli("run", "worker-2", "mixed.sh", "4")
    assert r.returncode == 0, r.err
    job_id = r.out.strip()
    assert UUID_RE.match(job_id)
    logs = cli("logs", "worker-2", job_id, "--follow")
    assert logs.stdout == b"out 1\nerr 1\nout 2\nerr 2\n"
    status = cli("status", "worker-2", job_id, "--json")
    assert json.loads(status.stdout)["exit_code"] == 4


# -- run --follow ------------------------------------------------------------------


def test_run_follow_prints_the_exact_output(cli):
    r = cli("run", "worker-1", "hello.sh", "a", "b c", "--follow")
    assert r.returncode == 0, r.err
    assert r.stdout == b"hello from worker-1\narg: a\narg: b c\n"
    assert r.err == ""


def test_run_follow_of_a_failing_job_exits_with_its_code_and_says_why(cli):
    r = cli("run", "worker-2", "mixed.sh", "5", "--follow")
    assert r.returncode == 5
    assert r.stdout == b"out 1\nerr 1\nout 2\nerr 2\n"  # nothing added to it
    assert "failed: exited with code 5" in r.err


def test_run_follow_passes_binary_output_byte_exact(cli):
    r = cli("run", "worker-1", "binary.sh", "--follow")
    assert r.returncode == 0, r.err
    assert r.stdout == bytes(range(256)) + b"\xff\xfe\xc3\x28"


def test_run_follow_takes_script_arguments_that_start_with_a_dash(cli):
    r = cli("run", "worker-1", "hello.sh", "--follow", "--", "-n", "--x")
    assert r.returncode == 0, r.err
    assert r.stdout.endswith(b"arg: -n\narg: --x\n")


# -- jobs, status, logs, stop ---------------------------------------------------------


def test_jobs_lists_a_started_job(cli):
    job_id = cli("run", "worker-2", "count.sh", "2", "0.1").out.strip()
    r = cli("jobs", "worker-2")
    assert r.returncode == 0, r.err
    rows = table(r.out)
    assert rows[0][:3] == ["JOB ID", "STATE", "EXIT"]
    assert job_id in [row[0] for row in rows[1:]]
    data = json.loads(cli("jobs", "worker-2", "--json").out)
    assert job_id in [j["job_id"] for j in data["jobs"]]
    assert data["stale"] is False


def test_status_shows_a_running_job(cli):
    job_id = cli("run", "worker-1", "sleep.sh", "60").out.strip()
    try:
        r = cli("status", "worker-1", job_id)
        assert r.returncode == 0, r.err
        fields = key_values(r.out)
        assert (fields["job_id"], fields["state"]) == (job_id, "running")
        assert fields["exit_code"] == "-"
    finally:
        cli("stop", "worker-1", job_id)


def test_logs_offset_and_follow(cli):
    job_id = cli("run", "worker-1", "count.sh", "3", "0.2").out.strip()
    follow = cli("logs", "worker-1", job_id, "--follow")
    assert follow.returncode == 0, follow.err
    assert follow.stdout == b"1\n2\n3\n"
    r = cli("logs", "worker-1", job_id, "--offset", "2")
    assert r.stdout == b"2\n3\n"


def test_stop_prints_the_final_status(cli):
    job_id = cli("run", "worker-2", "sleep.sh", "60").out.strip()
    r = cli("stop", "worker-2", job_id, "--json")
    assert r.returncode == 0, r.err
    job = json.loads(r.out)
    assert (job["state"], job["signal"]) == ("stopped", 15)
    again = cli("stop", "worker-2", job_id)
    assert again.returncode == 0, again.err
    assert key_values(again.out)["state"] == "stopped"


# -- fanout and groups -------------------------------------------------------------


def test_fanout_wait_runs_on_both_workers(cli):
    r = cli("fanout", "--workers", "worker-1,worker-2", "hello.sh", "--wait")
    assert r.returncode == 0, r.err
    head, _, rest = r.out.partition("\n\n")
    assert key_values(head)["summary"] == "2 jobs, 0 errors: 2 succeeded"
    rows = table(rest)
    assert rows[0][:3] == ["WORKER", "STATE", "EXIT"]
    assert sorted((row[0], row[1], row[2]) for row in rows[1:]) == [
        ("worker-1", "succeeded", "0"),
        ("worker-2", "succeeded", "0"),
    ]


def test_fanout_wait_json_is_the_group_status(cli):
    workers = "worker-1,worker-2"
    r = cli("fanout", "--workers", workers, "count.sh", "2", "0.1", "--wait", "--json")
    assert r.returncode == 0, r.err
    group = json.loads(r.out)
    assert group["summary"]["done"] is True
    assert group["summary"]["states"] == {"succeeded": 2}


def test_fanout_exits_1_when_a_job_fails(cli):
    r = cli("fanout", "--workers", "worker-1,worker-2", "mixed.sh", "3", "--wait")
    assert r.returncode == 1, r.err
    assert "2 failed" in r.out


def test_fanout_to_an_unknown_worker_reports_it_and_exits_1(cli):
    r = cli("fanout", "--workers", "worker-1,no-such-worker", "hello.sh", "--json")
    assert r.returncode == 1, r.err
    started = json.loads(r.out)
    assert [j["worker_name"] for j in started["jobs"]] == ["worker-1"]
    assert started["errors"][0]["worker_id"] == "no-such-worker"

    group = cli("group", started["group_id"], "--wait")
    assert group.returncode == 1, group.err
    assert "no-such-worker" in group.out
    assert key_values(group.out)["summary"] == "1 jobs, 1 errors: 1 succeeded"


def test_group_shows_a_group_started_without_waiting(cli):
    r = cli("fanout", "--all", "count.sh", "2", "0.1")
    assert r.returncode == 0, r.err
    group_id = key_values(r.out)["group"]
    assert UUID_RE.match(group_id)
    waited = cli("group", group_id, "--wait", "--json")
    assert waited.returncode == 0, waited.err
    data = json.loads(waited.out)
    assert data["group_id"] == group_id
    assert all(j["state"] == "succeeded" for j in data["jobs"])


def test_unknown_group_exits_3(cli):
    r = cli("group", str(uuid.uuid4()))
    assert r.returncode == 3
    assert "404" in r.err and "no group" in r.err


# -- errors ----------------------------------------------------------------------


def test_unknown_worker_exits_3_with_the_description(cli):
    r = cli("run", "worker-9", "hello.sh", "--wait")
    assert r.returncode == 3
    assert "404 Not found: no worker with id or name 'worker-9'" in r.err
    assert r.out == ""


def test_missing_script_exits_3_with_the_description(cli):
    r = cli("run", "worker-1", "nope.sh")
    assert r.returncode == 3
    assert "no script 'nope.sh' in the scripts directory" in r.err


def test_bad_token_exits_3_with_the_401_description(cli):
    r = cli("workers", JOBGATE_TOKEN="not-the-right-token-at-all")
    assert r.returncode == 3
    assert "401 Unauthorized: the bearer token is not valid" in r.err
    assert "JOBGATE_TOKEN" in r.err  # where the bad token came from


def test_unreachable_url_exits_4(cli):
    r = cli("workers", JOBGATE_URL=f"http://127.0.0.1:{closed_port()}")
    assert r.returncode == 4
    assert "cannot reach the scheduler" in r.err


def test_missing_url_exits_2_with_a_hint(cli):
    r = cli("workers", JOBGATE_URL=None)
    assert r.returncode == 2
    assert "no scheduler URL" in r.err and "JOBGATE_URL" in r.err


def test_follow_and_json_together_is_a_usage_error(cli):
    r = cli("run", "worker-1", "hello.sh", "--follow", "--json")
    assert r.returncode == 2
    assert "--json and --follow" in r.err


# -- where settings come from --------------------------------------------------------


def test_config_file_supplies_url_and_token_file(cli, cluster, tmp_path):
    (tmp_path / "token").write_text(cluster.token + "\n")
    conf = tmp_path / "client.toml"
    conf.write_text(f'url = "{cluster.url}"\ntoken_file = "token"\n')
    r = cli(
        "--config", str(conf), "workers", "-q", JOBGATE_URL=None, JOBGATE_TOKEN=None
    )
    assert r.returncode == 0, r.err
    assert "worker-1" in r.out.split()


def test_default_config_file_is_read_from_home(cli, cluster, tmp_path):
    home = tmp_path / "home"
    (home / ".config" / "jobgate").mkdir(parents=True)
    (home / ".config" / "jobgate" / "client.toml").write_text(
        f'url = "{cluster.url}"\ntoken = "{cluster.token}"\n'
    )
    r = cli("workers", "-q", HOME=str(home), JOBGATE_URL=None, JOBGATE_TOKEN=None)
    assert r.returncode == 0, r.err
    assert "worker-2" in r.out.split()


def test_flags_beat_environment_beat_config_file(cli, cluster, tmp_path):
    dead = f"http://127.0.0.1:{closed_port()}"
    conf = tmp_path / "client.toml"
    conf.write_text(f'url = "{dead}"\ntoken = "not-the-right-token-at-all"\n')
    env = {"JOBGATE_CONFIG": str(conf)}

    # The file alone: its dead URL.
    assert cli("workers", JOBGATE_URL=None, JOBGATE_TOKEN=None, **env).returncode == 4
    # The environment beats the file (good URL and token).
    assert cli("workers", **env).returncode == 0
    # A flag beats the environment: a dead URL wins over the good one.
    assert cli("--url", dead, "workers", **env).returncode == 4
    # ... and a good flag wins over a dead environment.
    r = cli("workers", "--url", cluster.url, JOBGATE_URL=dead, **env)
    assert r.returncode == 0, r.err
    # A token file given as a flag beats the token in the environment.
    (tmp_path / "bad").write_text("still-not-the-right-token\n")
    r = cli("--token-file", str(tmp_path / "bad"), "workers", **env)
    assert r.returncode == 3
    assert "--token-file" in r.err


# -- waits longer than the scheduler's own -----------------------------------------


@pytest.fixture(scope="module")
def impatient(scripts_dir, tmp_path_factory):
    """A cluster whose scheduler stops waiting for a job after one second."""
    with cluster_of_its_own(
        "cli",
        scripts_dir,
        ("worker-w",),
        http_processes=1,
        scheduler_extra="max_wait_s = 1.0",
    ) as c:
        yield Cli(c.url, c.token, tmp_path_factory.mktemp("cli-home"))


def test_run_wait_keeps_waiting_after_the_scheduler_gives_up(impatient):
    r = impatient("run", "worker-w", "lastwords.sh", "25", "0.1", "6", "--wait")
    assert r.returncode == 6, (r.out, r.err)
    fields = key_values(r.out)
    assert (fields["state"], fields["exit_code"]) == ("failed", "6")


def test_group_wait_keeps_waiting_after_the_scheduler_gives_up(impatient):
    r = impatient("fanout", "--all", "sleep.sh", "3", "--wait", "--json")
    assert r.returncode == 0, r.err
    group = json.loads(r.out)
    assert group["summary"]["done"] is True
    assert [j["state"] for j in group["jobs"]] == ["succeeded"]


def test_drain_wait_outwaits_the_scheduler_and_undrain_lets_jobs_start(impatient):
    job_id = impatient("run", "worker-w", "sleep.sh", "3").out.strip()
    assert UUID_RE.match(job_id)
    try:
        # The scheduler answers 202 after a second; the command asks again.
        r = impatient("drain", "worker-w", "--wait")
        assert r.returncode == 0, r.err
        fields = key_values(r.out)
        assert (fields["draining"], fields["running_jobs"]) == ("true", "0")
        assert fields["degraded"].startswith("draining: asked by token dev at ")
        status = key_values(impatient("status", "worker-w", job_id).out)
        assert status["state"] == "succeeded"

        rows = table(impatient("workers").out)
        assert {row[0]: row[1] for row in rows[1:]}["worker-w"] == "online (draining)"
        r = impatient("run", "worker-w", "hello.sh", "--wait")
        assert r.returncode == 4, (r.out, r.err)
        assert "503" in r.err and "is drained" in r.err
    finally:
        r = impatient("undrain", "worker-w", "--json")
    assert r.returncode == 0, r.err
    worker = json.loads(r.out)
    assert (worker["draining"], worker["degraded"]) == (False, None)
    assert impatient("run", "worker-w", "hello.sh", "--wait").returncode == 0


def test_drain_of_an_unknown_worker_exits_3(cli):
    r = cli("drain", "worker-9")
    assert r.returncode == 3
    assert "404" in r.err and "worker-9" in r.err


# -- progress on a terminal ---------------------------------------------------------


def test_wait_shows_a_progress_line_only_on_a_terminal(cli):
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            cli.argv("run", "worker-2", "sleep.sh", "2.5", "--wait"),
            env=cli.env(),
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
        )
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 4096)
                except OSError:  # the terminal closed with the process
                    break
                if not data:
                    break
                seen += data
            elif proc.poll() is not None:
                break
        proc.wait(timeout=30)
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"waiting for sleep.sh on worker-2" in seen
    assert seen.endswith(b"\r\x1b[K")  # the line is cleared when the wait ends
    assert b"state:" in proc.stdout.read()


# -- shell completion ----------------------------------------------------------------


def test_bash_completion_completes_commands_and_worker_names(cli, tmp_path):
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to test the completion script")
    script = cli("completion", "bash")
    assert script.returncode == 0
    (tmp_path / "completion.bash").write_text(script.out)
    wrapper = tmp_path / "bin" / "jobgate"
    wrapper.parent.mkdir()
    python = sys.executable
    wrapper.write_text(f'#!/bin/sh\nexec "{python}" -m jobgate.client.cli "$@"\n')
    wrapper.chmod(0o755)
    probe = (
        f"source {tmp_path / 'completion.bash'}\n"
        'COMP_WORDS=(jobgate st); COMP_CWORD=1; _jobgate; echo "${COMPREPLY[*]}"\n'
        "COMP_WORDS=(jobgate logs wor); COMP_CWORD=2; _jobgate; "
        'echo "${COMPREPLY[*]}"\n'
        "COMP_WORDS=(jobgate run worker-1 --fo); COMP_CWORD=3; _jobgate; "
        'echo "${COMPREPLY[*]}"\n'
    )
    env = cli.env(PATH=f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    r = subprocess.run(
        ["bash", "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    commands, workers, options = r.stdout.splitlines()
    assert commands.split() == ["status", "stop"]
    assert {"worker-1", "worker-2"} <= set(workers.split())
    assert options.split() == ["--follow"]


# -- a stand-in server: 503 ----------------------------------------------------------


class StandIn(BaseHTTPRequestHandler):
    """Answers like the scheduler: a worker that is offline."""

    token = "stand-in-token-0123456789"

    def do_GET(self):  # noqa: N802 - the name http.server calls
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.answer(401, {"title": "Unauthorized", "description": "bad token"})
        elif self.path == "/v1/workers":
            self.answer(
                200, {"workers": [{"id": "i", "name": "tls-w", "state": "online"}]}
            )
        elif self.path == "/v1/workers/down":
            self.answer(
                503,
                {
                    "title": "Worker unavailable",
                    "description": "worker 'down' is offline; retry when it is online",
                },
                {"Retry-After": "5"},
            )
        else:
            self.answer(404, {"title": "Not found", "description": "no such route"})

    def answer(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    """A stand-in server on a free port; yields its port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_503_exits_4_with_the_description(cli, stand_in):
    url = f"http://127.0.0.1:{stand_in}"
    r = cli("worker", "down", JOBGATE_URL=url, JOBGATE_TOKEN=StandIn.token)
    assert r.returncode == 4
    assert "503 Worker unavailable: worker 'down' is offline" in r.err
    assert "retry after 5s" in r.err


# -- HTTPS ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(scripts_dir):
    """A scheduler serving HTTPS that also takes client certificates: ops may
    run jobs, dashboard may only read."""
    with cluster_of_its_own(
        "cli-https", scripts_dir, cluster_class=HttpsCluster, http_processes=1
    ) as c:
        yield c


def https_cli(c, tmp_path_factory) -> tuple[Cli, str]:
    url = f"https://localhost:{c.scheduler_info['http_port']}"
    return Cli(url, c.token, tmp_path_factory.mktemp("cli-home")), url


def test_https_with_a_token_and_the_ca_file(tls_cluster, tmp_path_factory):
    cli, _ = https_cli(tls_cluster, tmp_path_factory)
    ca = str(tls_cluster.pki / "ca.pem")
    r = cli("--ca-file", ca, "run", "worker-1", "hello.sh", "--follow")
    assert r.returncode == 0, r.err
    assert r.stdout == b"hello from worker-1\n"

    # Without the CA the scheduler's certificate cannot be verified.
    r = cli("workers")
    assert r.returncode == 4
    assert "cannot verify the certificate" in r.err and "--ca-file" in r.err


def test_https_client_certificate_from_config_file_replaces_the_token(
    tls_cluster, tmp_path_factory, tmp_path
):
    cli, url = https_cli(tls_cluster, tmp_path_factory)
    shutil.copytree(tls_cluster.pki, tmp_path / "pki")
    conf = tmp_path / "client.toml"
    conf.write_text(  # relative paths: relative to the file
        f'url = "{url}"\n'
        'ca_file = "pki/ca.pem"\n'
        'cert_file = "pki/client-ops.pem"\n'
        'key_file = "pki/client-ops.key"\n'
    )
    no_env = {"JOBGATE_URL": None, "JOBGATE_TOKEN": None}
    r = cli(
        "--config", str(conf), "run", "worker-1", "mixed.sh", "2", "--wait", **no_env
    )
    assert r.returncode == 2, r.err  # the job's exit code
    assert key_values(r.out)["state"] == "failed"


def test_https_read_only_certificate_cannot_run_jobs(tls_cluster, tmp_path_factory):
    cli, _ = https_cli(tls_cluster, tmp_path_factory)
    pki = tls_cluster.pki
    tls = ["--ca-file", str(pki / "ca.pem"), "--cert-file"]
    tls += [str(pki / "client-dashboard.pem"), "--key-file"]
    tls += [str(pki / "client-dashboard.key")]
    r = cli(*tls, "workers", "-q", JOBGATE_TOKEN=None)
    assert r.returncode == 0, r.err
    assert r.out.split() == ["worker-1"]
    r = cli(*tls, "run", "worker-1", "hello.sh", JOBGATE_TOKEN=None)
    assert r.returncode == 3
    assert "403" in r.err and "scope" in r.err
