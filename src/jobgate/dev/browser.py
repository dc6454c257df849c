"""Headless Chromium for the web console's tests and benchmark.

Debian's ``chromium`` and ``chromium-driver`` (``make browser-deps``), driven
through Selenium (the ``dev`` extra). Each browser gets a profile of its own,
removed when it quits, and flags that keep it off every network but the
local cluster's: no background requests, no component or sync updates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # as root, Chromium refuses to start with its sandbox
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


def missing() -> str | None:
    """Why a browser cannot be started here, or None."""
    absent = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if absent:
        return f"{', '.join(absent)} missing (make browser-deps)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra: make venv)"
    return None


@contextlib.contextmanager
def chromium(configure: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """A Selenium driver of a new headless Chromium; ``configure`` may add to
    its options. The development CA is not one the browser knows, so
    certificates are not checked (the clusters are local)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="jobgate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.accept_insecure_certs = True
    if configure is not None:
        configure(options)
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except BaseException:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
