"""The web console's files at /ui/: served without a token, from memory only,
with a strict Content-Security-Policy; off with [http].console = false."""

from __future__ import annotations

import falcon.testing
import pytest
import schedulerapp

from scheduler.http import console

RUN_TOKEN = "run-token"
READ_TOKEN = "read-token"
PAGE = b"<!doctype html><title>jobgate</title><script type=module src=app.js></script>"


def make_app(tmp_path, monkeypatch, enabled: bool = True) -> falcon.testing.TestClient:
    files = tmp_path / "console"
    files.mkdir()
    (files / "index.html").write_bytes(PAGE)
    (files / "app.js").write_text("export const x = 1;\n")
    (files / "style.css").write_text("body { margin: 0 }\n")
    (files / "notes.md").write_text("not a console file type\n")
    (files / "sub").mkdir()
    monkeypatch.setattr(console, "DIRECTORY", files)
    cases = schedulerapp.use_cases(
        tmp_path,
        {RUN_TOKEN: ("ops", "run"), READ_TOKEN: ("viewer", "read")},
        http=f"console = {'true' if enabled else 'false'}",
    )
    app = schedulerapp.app(cases)
    return falcon.testing.TestClient(app)


@pytest.fixture
def client(tmp_path, monkeypatch):
    return make_app(tmp_path, monkeypatch)


def test_the_page_and_its_files_need_no_token_and_carry_a_strict_policy(client):
    for path, body, kind in (
        ("/ui/", PAGE, "text/html"),
        ("/ui/index.html", PAGE, "text/html"),
        ("/ui/app.js", b"export const x = 1;\n", "text/javascript"),
        ("/ui/style.css", b"body { margin: 0 }\n", "text/css"),
    ):
        resp = client.simulate_get(path)
        assert resp.status_code == 200, path
        assert resp.content == body
        assert resp.headers["Content-Type"].startswith(kind)
        policy = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy
        assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy
        assert "frame-ancestors 'none'" in policy
        assert "connect-src 'self'" in policy
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "no-referrer"


def test_root_and_ui_without_its_slash_redirect_to_the_page(client):
    for path in ("/", "/ui"):
        resp = client.simulate_get(path)
        assert resp.status_code == 302, path
        assert resp.headers["Location"].endswith("/ui/")


def test_a_name_that_is_not_one_of_the_files_is_a_json_404(client):
    for path in (
        "/ui/missing.js",
        "/ui/notes.md",  # not a type the console serves
        "/ui/sub",
        "/ui/..%2f..%2fetc%2fpasswd",
        "/ui/%2e%2e",
    ):
        resp = client.simulate_get(path)
        assert resp.status_code == 404, path
        assert resp.json["title"]


def test_an_unchanged_file_is_answered_304(client):
    first = client.simulate_get("/ui/app.js")
    again = client.simulate_get(
        "/ui/app.js", headers={"If-None-Match": first.headers["ETag"]}
    )
    assert again.status_code == 304
    assert again.content == b""


def test_the_api_still_needs_a_token(client):
    assert client.simulate_get("/v1/workers").status_code == 401
    assert client.simulate_get("/v1/whoami").status_code == 401


def test_whoami_names_the_token_and_its_scope(client):
    for token, name, scope in (
        (RUN_TOKEN, "ops", "run"),
        (READ_TOKEN, "viewer", "read"),
    ):
        resp = client.simulate_get(
            "/v1/whoami", headers={"Authorization": f"Bearer {token}"}
        )
        assert resp.status_code == 200
        assert resp.json == {"name": name, "scope": scope, "via": "token"}


def test_console_off_serves_nothing_and_opens_nothing(tmp_path, monkeypatch):
    client = make_app(tmp_path, monkeypatch, enabled=False)
    assert client.simulate_get("/ui/").status_code == 401
    assert client.simulate_get("/").status_code == 401
    headers = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert client.simulate_get("/ui/", headers=headers).status_code == 404
    assert client.simulate_get("/ui/app.js", headers=headers).status_code == 404
    assert client.simulate_get("/", headers=headers).status_code == 404


def test_the_packaged_console_has_its_page():
    files = console.load()
    assert "index.html" in files
    assert all(
        name.rsplit(".", 1)[-1] in ("html", "js", "css", "svg", "png", "ico", "txt")
        for name in files
    )
