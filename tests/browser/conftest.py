"""Fixtures of the browser tests: a cluster serving HTTPS, and headless Chromium.

The web console (``src/scheduler/console/``, served at ``/ui/``) is driven
through Debian's Chromium and chromedriver with Selenium. Without them the
browser tests skip, or fail where ``JOBGATE_REQUIRE_BROWSER=1`` (``.ci/run``).
"""

from __future__ import annotations

import os
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Api, cluster_of_its_own, skip_unless_required

from jobgate.dev import browser
from jobgate.dev.cluster import DevCluster
from jobgate.tokens import hash_token

# Generous: the console refreshes by itself every few seconds, and a loaded
# machine may take its time starting a job or a browser.
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def console_cluster(scripts_dir: Path) -> Iterator[DevCluster]:
    """One scheduler (2 HTTP processes) on HTTPS and workers worker-1 and
    worker-2, shared by the tests of a module."""
    with cluster_of_its_own(
        "console",
        scripts_dir,
        workers=("worker-1", "worker-2"),
        https=True,
        http_processes=2,
    ) as c:
        yield c


@pytest.fixture(scope="module")
def console_api(console_cluster: DevCluster) -> Api:
    """The API over HTTPS with the cluster's ``run`` token."""
    return Api(console_cluster)


class Tokens:
    """Adds tokens to the cluster's tokens file and takes them out again, each
    change followed by a SIGHUP of the scheduler (what an operator does)."""

    def __init__(self, cluster: DevCluster):
        self.cluster = cluster
        self.path = cluster.dir / "tokens"
        self.original = self.path.read_text()

    def _changed(self) -> None:
        os.kill(self.cluster.scheduler.pid, signal.SIGHUP)

    def add(self, scope: str, name: str) -> str:
        token = secrets.token_urlsafe(24)
        with self.path.open("a") as f:
            f.write(f"{hash_token(token)} {name} {scope}\n")
        self._changed()
        return token

    def remove(self, name: str) -> None:
        lines = self.path.read_text().splitlines()
        kept = [ln for ln in lines if ln.split()[1:2] != [name]]
        assert len(kept) < len(lines), f"no token named {name!r}"
        self.path.write_text("".join(f"{ln}\n" for ln in kept))
        self._changed()

    def restore(self) -> None:
        if self.path.read_text() != self.original:
            self.path.write_text(self.original)
            self._changed()


@pytest.fixture
def tokens(console_cluster: DevCluster) -> Iterator[Tokens]:
    t = Tokens(console_cluster)
    try:
        yield t
    finally:
        t.restore()


def need_browser() -> None:
    """Skip (or fail, with JOBGATE_REQUIRE_BROWSER=1) without Chromium,
    chromedriver or Selenium."""
    why = browser.missing()
    if why is not None:
        skip_unless_required(
            f"the browser tests need a browser: {why}", "JOBGATE_REQUIRE_BROWSER"
        )


def is_problem(entry: dict) -> bool:
    """A console log entry that fails a test: a CSP violation or an uncaught
    JavaScript error (not the network errors of expected 401s)."""
    message = entry.get("message", "")
    return (
        entry.get("source") == "security"
        or "Content Security Policy" in message
        or (entry.get("source") == "javascript" and entry.get("level") == "SEVERE")
        or "Uncaught" in message
    )


class ConsolePage:
    """The console in one headless Chromium, addressed by the contract's CSS
    selectors. Reads go through JavaScript so that a view re-rendering under
    the test never leaves it holding a stale element."""

    def __init__(self, driver, origin: str):
        self.driver = driver
        self.origin = origin
        self.log: list[dict] = []

    # -- navigation and waiting ---------------------------------------------

    def open(self, route: str = "") -> None:
        """Load the console afresh, e.g. ``open("#/start")``."""
        self.driver.get(f"{self.origin}/ui/{route}")

    def go(self, route: str) -> None:
        """Follow a route within the loaded page, as a link would."""
        self.js("location.hash = arguments[0]", route)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(
        self,
        condition: Callable[[], object],
        message: str | Callable[[], str],
        timeout=TIMEOUT,
    ):
        """What ``condition`` returns once it is true; fails after ``timeout``
        with ``message`` (a callable is asked then) and what the page showed."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1).until(
                lambda _: condition()
            )
        except TimeoutException:
            text = message() if callable(message) else message
            pytest.fail(f"after {timeout:.0f} s: {text}; {self.describe()}")

    def describe(self) -> str:
        try:
            state = self.js(
                "const t = s => { const e = document.querySelector(s);"
                "  return e ? e.textContent.trim().slice(0, 300) : null; };"
                "return {url: location.href, view: document.body.dataset.view,"
                "  ready: document.body.dataset.ready, error: t('#error'),"
                "  signin_error: t('#signin-error')};"
            )
        except Exception as exc:  # noqa: BLE001 - a description, not a check
            return f"the page could not be read: {exc}"
        return f"the page: {state}"

    def view(self) -> tuple[str | None, str | None]:
        return tuple(
            self.js("return [document.body.dataset.view, document.body.dataset.ready]")
        )

    def wait_view(self, name: str, timeout=TIMEOUT) -> None:
        """Until the view ``name`` has rendered its first data."""
        self.wait(
            lambda: self.view() == (name, "1"),
            f"the {name} view was not shown with data-ready=1",
            timeout,
        )

    def wait_signin(self, timeout=TIMEOUT) -> None:
        """Until the sign-in view is shown."""
        self.wait(
            lambda: self.view()[0] == "signin" and self.shown("form#signin"),
            "the sign-in view was not shown",
            timeout,
        )

    # -- reading ----------------------------------------------------------------

    def text(self, css: str) -> str | None:
        """An element's textContent, or None when there is none."""
        return self.js(
            "const e = document.querySelector(arguments[0]);"
            "return e ? e.textContent : null;",
            css,
        )

    def texts(self, css: str) -> list[str]:
        return self.js(
            "return Array.from(document.querySelectorAll(arguments[0]),"
            " e => e.textContent);",
            css,
        )

    def attrs(self, css: str, name: str) -> list[str | None]:
        return self.js(
            "return Array.from(document.querySelectorAll(arguments[0]),"
            " e => e.getAttribute(arguments[1]));",
            css,
            name,
        )

    def shown(self, css: str) -> bool:
        """The element exists and takes up room on the page."""
        return bool(
            self.js(
                "const e = document.querySelector(arguments[0]);"
                "return !!e && e.getClientRects().length > 0"
                " && getComputedStyle(e).visibility !== 'hidden';",
                css,
            )
        )

    def shown_count(self, css: str) -> int:
        """How many elements matching ``css`` take up room on the page."""
        return self.js(
            "return Array.from(document.querySelectorAll(arguments[0])).filter("
            " e => e.getClientRects().length > 0"
            " && getComputedStyle(e).visibility !== 'hidden').length;",
            css,
        )

    def exists(self, css: str) -> bool:
        return bool(self.js("return !!document.querySelector(arguments[0])", css))

    def value(self, css: str) -> str | None:
        return self.js(
            "const e = document.querySelector(arguments[0]);return e ? e.value : null;",
            css,
        )

    def wait_text(self, css: str, expected: str, timeout=TIMEOUT) -> None:
        """Until ``css``'s text, stripped, is ``expected``."""
        self.wait(
            lambda: (self.text(css) or "").strip() == expected,
            lambda: f"{css} never read {expected!r} (last: {self.text(css)!r})",
            timeout,
        )

    # -- acting -------------------------------------------------------------------

    def element(self, css: str):
        """The element once it can be clicked or typed into."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        return self.wait(
            lambda: ec.element_to_be_clickable((By.CSS_SELECTOR, css))(self.driver),
            f"{css} was not there to use",
        )

    def click(self, css: str) -> None:
        self.element(css).click()

    def fill(self, css: str, value: str) -> None:
        """Type ``value`` into an input or textarea, replacing what it held."""
        el = self.element(css)
        el.clear()
        if value:
            el.send_keys(value)
        assert el.get_attribute("value") == value, css

    def select(self, css: str, value: str) -> None:
        """Choose the option whose value or text is ``value``, once it is there."""
        from selenium.webdriver.support.ui import Select

        def chosen():
            el = self.element(css)
            for option in Select(el).options:
                if value in (option.get_attribute("value"), option.text.strip()):
                    option.click()
                    return option.is_selected()
            return False

        self.wait(chosen, f"{css} offered no option {value!r}")

    def check(self, css: str, on: bool = True) -> None:
        el = self.element(css)
        if el.is_selected() != on:
            el.click()
        assert el.is_selected() == on, css

    def sign_in(self, token: str) -> None:
        """Sign in with ``token`` on a freshly opened console; lands on workers."""
        self.open()
        self.wait_signin()
        self.fill("input#token", token)
        self.click("button#signin-submit")
        self.wait_view("workers")

    # -- evidence -------------------------------------------------------------------

    def resource_urls(self) -> list[dict]:
        """The page's navigation and resource timing entries: name, status."""
        return self.js(
            "return performance.getEntriesByType('navigation')"
            ".concat(performance.getEntriesByType('resource'))"
            ".map(e => ({name: e.name, type: e.entryType,"
            " status: e.responseStatus}));"
        )

    def drain_log(self) -> list[dict]:
        """The browser's console log since the last call (kept in ``log``)."""
        new = self.driver.get_log("browser")
        self.log.extend(new)
        return new

    def assert_clean_log(self) -> None:
        """No CSP violation and no uncaught error in the console log so far."""
        self.drain_log()
        problems = [e for e in self.log if is_problem(e)]
        assert not problems, "the browser's console log shows:\n" + "\n".join(
            f"{e.get('source')} {e.get('level')}: {e.get('message')}" for e in problems
        )

    def screenshot(self, name: str) -> None:
        """Save the page as ``<name>.png`` where JOBGATE_SCREENSHOTS names a
        directory (docs/ keeps the ones of the documentation)."""
        directory = os.environ.get("JOBGATE_SCREENSHOTS")
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            assert self.driver.save_screenshot(str(Path(directory) / f"{name}.png"))


@pytest.fixture
def console(console_cluster: DevCluster) -> Iterator[ConsolePage]:
    """A fresh headless Chromium (a profile of its own) on the cluster's origin.

    After the test, its console log must show no CSP violation and no
    uncaught error.
    """
    need_browser()

    def configure(options) -> None:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        # A confirm() before a stop is the console's business, not the test's.
        options.unhandled_prompt_behavior = "accept"

    with browser.chromium(configure) as driver:
        page = ConsolePage(driver, console_cluster.url)
        yield page
        page.assert_clean_log()
