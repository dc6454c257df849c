"""The benchmark suite runs: every scenario once, at its tiny size.

Timings are not checked here (they do not belong in pass/fail tests); this
only keeps ``make bench`` from rotting: the same command, the same code path,
a report with every figure and values that make sense.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from conftest import need_postgres, skip_unless_required  # noqa: E402

from bench.scenarios import SCENARIOS, TINY  # noqa: E402
from jobgate.dev import browser  # noqa: E402
from jobgate.dev.postgres import find_bindir  # noqa: E402


def run_tiny(out: Path, *args: str, timeout: float) -> dict:
    """``bench.run`` once at the tiny size with ``args``, writing into
    ``out``; its report."""
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "bench.run", "--tiny", "--runs", "1"),
            *("--idle-wait", "0", "--out", out, *args),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "report.json").read_text())


def test_every_scenario_runs_at_tiny_size(tmp_path: Path):
    names = list(SCENARIOS)
    if browser.missing() and os.environ.get("JOBGATE_REQUIRE_BROWSER") != "1":
        names.remove("console")  # needs Chromium: make browser-deps
    if find_bindir() is None and os.environ.get("JOBGATE_REQUIRE_POSTGRES") != "1":
        # Several schedulers share a database: make postgres-deps
        names = [n for n in names if not SCENARIOS[n].postgres]
    scenarios = (arg for name in names for arg in ("--scenario", name))
    report = run_tiny(tmp_path, *scenarios, timeout=420)
    assert report["tiny"] is True and report["runs"] == 1
    assert list(report["scenarios"]) == names
    for name, entry in report["scenarios"].items():
        assert entry["errors"] == [], (name, entry["errors"])
        assert len(entry["runs"]) == 1, name
        med = entry["median"]
        scenario = SCENARIOS[name]
        missing = set(scenario.show) - set(med)
        assert not missing, (name, missing)
        assert set(entry["targets"]) == set(scenario.targets), name
        assert all(t["met"] in (True, False) for t in entry["targets"].values())
        assert "settings" in entry, name
    s = {name: entry["median"] for name, entry in report["scenarios"].items()}

    for route in ("v1_", "legacy_"):
        assert s["start"][f"{route}errors"] == 0
        assert 0 < s["start"][f"{route}p50_ms"] <= s["start"][f"{route}p99_ms"]
        assert s["start"][f"{route}rps"] > 0

    for key, value in s["status"].items():
        if key.endswith("_errors"):
            assert value == 0, key
        elif key.endswith(("_rps", "_p50_ms", "_p99_ms")):
            assert value > 0, key

    assert s["output"]["bytes"] == TINY.output_bytes
    assert s["output"]["mb_per_s"] > 0
    assert s["output"]["scheduler_rss_peak_mb"] > 10
    assert s["output"]["worker_rss_peak_mb"] > 10

    assert s["follow"]["lines"] == TINY.follow_lines - TINY.follow_skip
    assert 0 < s["follow"]["p50_ms"] <= s["follow"]["p99_ms"] < 5000

    f = s["followers"]
    assert f["followers"] == f["correct"] == TINY.followers
    assert f["incorrect"] == 0
    assert f["bytes_each"] == TINY.followers_batches * TINY.followers_lines * 100

    w = s["workers"]
    assert w["registered"] == TINY.sim_workers
    assert w["online"] == TINY.sim_workers + 1  # and worker-1
    assert w["heartbeats_per_s"] > 0
    assert w["p50_ratio"] > 0 and w["p99_ratio"] > 0

    for name in ("jobs", "isolated"):
        j = s[name]
        assert j["running"] == j["jobs"] == TINY.jobs, name
        assert j["jobs_output_kb_per_s"] > 0, name
        assert j["status_rps"] > 0 and j["status_errors"] == 0, name

    a = s["adopt"]
    assert a["jobs"] == TINY.jobs
    assert 0 < a["adopt_s"] and 0 < a["ready_s"] <= a["all_running_s"]
    assert a["jobs_output_kb_per_s"] > 0  # the adopted jobs write on

    if "status-ha" in s:
        for key, value in s["status-ha"].items():
            if key.endswith("_errors"):
                assert value == 0, key
            elif key.endswith(("_rps", "_ratio", "_cpu_machine_pct")):
                assert value > 0, key

    if "failover" in s:
        f = s["failover"]
        assert f["kills"] == TINY.kills
        assert f["not_recovered"] == f["client_errors"] == 0
        assert 0 < f["recover_p50_ms"] <= f["recover_max_ms"]
        assert f["worker_elsewhere"] == f["heartbeats_missed"] == 0
        assert 0 < f["heartbeat_max_s"] <= 2 * f["heartbeat_interval_max_s"]
        assert f["worker_online"] == 1

    if "workers-ha" in s:
        w = s["workers-ha"]
        assert w["registered"] == TINY.sim_workers
        assert w["online"] == TINY.sim_workers + 1
        assert w["heartbeats_per_s"] > 0 and w["loaded_errors"] == 0
        assert w["cpu_http1_pct"] > 0 and w["cpu_http2_pct"] > 0  # both served

    if "console" in s:
        c = s["console"]
        assert c["workers"] == TINY.sim_workers + 1
        assert 0 < c["first_render_ms"] <= c["first_render_max_ms"]
        assert c["output_bytes"] == TINY.output_bytes
        assert c["max_tick_gap_ms"] >= 100  # the probe ticked
        assert c["renderer_rss_peak_mb"] > 0

    table = (tmp_path / "report.md").read_text()
    assert "| Scenario | Figure | Median | Target | Met |" in table
    assert table.count("| yes |") + table.count("| **no** |") == sum(
        len(SCENARIOS[name].targets) for name in names
    )


def test_scheduler_cpus_hold_each_scheduler_to_its_share(tmp_path: Path):
    """``--scheduler-cpus`` caps each scheduler's processes together, and
    leaves no cgroup behind."""
    if os.geteuid() != 0:
        skip_unless_required(
            "CPU quotas are set in cgroups, which only root may make",
            "JOBGATE_REQUIRE_ROOT",
        )
    need_postgres()  # two schedulers share a database
    cpu = Path("/sys/fs/cgroup/cpu")
    before = set(cpu.rglob("jobgate-bench-*")) if cpu.is_dir() else set()
    report = run_tiny(
        tmp_path, "--scenario", "status-ha", "--scheduler-cpus", "0.25", timeout=300
    )
    assert report["scheduler_cpus"] == 0.25
    figures = report["scenarios"]["status-ha"]["median"]
    phases = {
        k.removesuffix("_rps") for k in figures if k.endswith(("_one_rps", "_two_rps"))
    }
    assert phases
    for phase in phases:
        for i in (1, 2):
            used = (
                figures[f"{phase}_cpu_http{i}_pct"]
                + figures[f"{phase}_cpu_grpc{i}_pct"]
            )
            # Percent of one CPU; the quota is counted per 100 ms period.
            assert used <= 25 + 10, (phase, i, used)
        if phase.endswith("_two"):
            assert figures[f"{phase}_cpu_http2_pct"] > 0  # both served
    assert (set(cpu.rglob("jobgate-bench-*")) if cpu.is_dir() else set()) == before
