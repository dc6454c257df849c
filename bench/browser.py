"""10. The web console in headless Chromium.

Two figures, each in a real browser driven by Selenium:

* the workers page's first render with thousands of (simulated) workers
  registered: from the start of the page's navigation to the moment the
  console marks the view rendered (``document.body.dataset.ready``), read by
  a probe the browser runs before any of the page's own scripts;
* a job's page following the live output of a job that writes ``output_bytes``
  (1 GiB): the longest gap between the ticks of a 100 ms interval timer in the
  page (a page whose main thread is busy ticks late), and the peak memory of
  the page (its renderer process's RSS, and the JavaScript heap).

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``):
:mod:`jobgate.dev.browser`.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from jobgate.dev import browser

# Runs in every document before the page's own scripts (through the DevTools
# protocol, so the console's Content-Security-Policy does not apply to it).
PROBE = """
(() => {
  const probe = (window.__bench = { readyAt: null, view: null, maxGap: 0, ticks: 0 });
  let last = performance.now();
  setInterval(() => {
    const now = performance.now();
    probe.maxGap = Math.max(probe.maxGap, now - last);
    probe.ticks += 1;
    last = now;
  }, 100);
  const seen = () => {
    const body = document.body;
    if (probe.readyAt === null && body && body.dataset.ready === "1") {
      probe.readyAt = performance.now();
      probe.view = body.dataset.view;
    }
  };
  new MutationObserver(seen).observe(document, {
    subtree: true, attributes: true, childList: true,
    attributeFilter: ["data-ready"],
  });
})();
"""


@contextlib.contextmanager
def chromium() -> Iterator:
    """A new headless Chromium with the probe in every page it loads."""
    with browser.chromium() as driver:
        driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": PROBE}
        )
        driver.execute_cdp_cmd("Performance.enable", {})
        yield driver


def wait_for(driver, condition: str, timeout: float) -> None:
    """Until the JavaScript expression ``condition`` is true in the page."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if driver.execute_script(f"return Boolean({condition});"):
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {condition} in the console")


def sign_in(driver, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/ui/")
    wait_for(driver, "document.getElementById('token')", 20)
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "signin-submit").click()
    wait_for(driver, "document.body.dataset.view === 'workers'", 20)


def first_render_ms(driver, url: str, loads: int) -> list[float]:
    """Milliseconds from navigation to the workers view's first render."""
    times = []
    for _ in range(loads):
        driver.get("about:blank")
        driver.get(f"{url}/ui/#/workers")
        wait_for(
            driver,
            "window.__bench && window.__bench.readyAt !== null "
            "&& window.__bench.view === 'workers'",
            60,
        )
        times.append(driver.execute_script("return window.__bench.readyAt;"))
    return times


def _renderer_rss_mb() -> float:
    """RSS of the largest Chromium renderer process (the benchmark's browser
    is the only one it starts)."""
    best = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"--type=renderer" not in cmdline or b"chromium" not in cmdline:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    best = max(best, int(line.split()[1]))
        except OSError:
            continue
    return best / 1024


def follow_page(driver, url: str, worker: str, job_id: str, timeout: float) -> dict:
    """Open the job's page and keep it until it has followed the output to
    its end."""
    driver.get(f"{url}/ui/#/workers/{worker}/jobs/{job_id}")
    peaks = {"rss": 0.0, "heap": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.25):
            peaks["rss"] = max(peaks["rss"], _renderer_rss_mb())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    try:
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            # The page says "complete" once the stream's end event is in:
            # the job has ended and the page has taken all its output.
            ended = driver.execute_script(
                "const s = document.getElementById('output-status');"
                "return Boolean(s) && s.textContent.trim() === 'complete';"
            )
            metrics = driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
            heap = next(
                (m["value"] for m in metrics if m["name"] == "JSHeapUsedSize"), 0
            )
            peaks["heap"] = max(peaks["heap"], heap / 2**20)
            if ended:
                break
            time.sleep(0.25)
        else:
            raise RuntimeError("the job's page never showed the job's end")
        seconds = time.monotonic() - t0
        gap = driver.execute_script("return window.__bench.maxGap;")
    finally:
        done.set()
        sampler.join()
    return {
        "follow_seconds": round(seconds, 1),
        "max_tick_gap_ms": round(gap, 1),
        "renderer_rss_peak_mb": round(peaks["rss"], 1),
        "js_heap_peak_mb": round(peaks["heap"], 1),
    }


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)
