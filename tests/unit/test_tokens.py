"""API tokens: hashing, the tokens file, bearer authentication, ``hash-token``."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import falcon
import falcon.asgi
import falcon.testing
import pytest

from jobgate.tokens import hash_token
from scheduler.http import errors
from scheduler.http.auth import (
    Auth,
    Principal,
    TokenFile,
    TokenFileError,
    load_tokens,
)

READER = "reader-token-0123456789"
RUNNER = "runner-token-0123456789"


def test_hash_token_is_prefixed_sha256_hex():
    assert hash_token("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", hash_token(READER))
    assert hash_token(READER) != hash_token(READER + " ")


def test_hash_token_encodes_utf8():
    expected = hashlib.sha256("naïve-tökén".encode()).hexdigest()
    assert hash_token("naïve-tökén") == f"sha256:{expected}"


# -- the tokens file ------------------------------------------------------------


def write_tokens(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    return path


def test_load_tokens_reads_names_scopes_and_skips_comments(tmp_path):
    a, b, c = hash_token("token-a"), hash_token("token-b"), hash_token("token-c")
    path = write_tokens(
        tmp_path,
        f"# API tokens\n\n{a} ci run\n   {b}   deploy   # rotated in May\n{c}\n",
    )
    assert load_tokens(path) == {
        a: ("ci", "run"),
        b: ("deploy", "read"),
        c: ("line 5", "read"),
    }


@pytest.mark.parametrize(
    "bad",
    [
        "md5:0123456789abcdef0123456789abcdef some-name",
        "sha256:" + "0" * 63 + " short",
        "sha256:" + "0" * 65 + " long",
        "sha256:" + "A" * 64 + " uppercase",
        "sha256:" + "g" * 64 + " not-hex",
        "0" * 64 + " no-prefix",
        READER + " a-plain-token",
    ],
)
def test_load_tokens_names_file_and_line_of_a_malformed_hash(tmp_path, bad):
    path = write_tokens(tmp_path, f"# comment\n{hash_token('ok-token')} ok\n\n{bad}\n")
    with pytest.raises(TokenFileError) as exc:
        load_tokens(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:4: expected 'sha256:<64 hex digits> <name>")
    assert "jobgate-scheduler hash-token" in message
    assert READER not in message  # a misplaced secret is not echoed to the log


def test_load_tokens_refuses_an_unknown_scope(tmp_path):
    path = write_tokens(tmp_path, f"{hash_token(READER)} ci admin\n")
    with pytest.raises(TokenFileError) as exc:
        load_tokens(path)
    assert str(exc.value) == f"{path}:1: scope 'admin' is not one of read, run"


def test_load_tokens_refuses_extra_fields(tmp_path):
    path = write_tokens(tmp_path, f"\n{hash_token(READER)} ci run extra\n")
    with pytest.raises(TokenFileError) as exc:
        load_tokens(path)
    assert str(exc.value) == f"{path}:2: expected at most a name and a scope"


def test_load_tokens_reports_a_missing_file(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(TokenFileError) as exc:
        load_tokens(path)
    assert str(exc.value) == (
        f"{path}: cannot read the tokens file: No such file or directory"
    )


def test_load_tokens_warns_about_a_file_without_tokens(tmp_path, caplog):
    path = write_tokens(tmp_path, "# nothing yet\n\n")
    with caplog.at_level(logging.WARNING):
        assert load_tokens(path) == {}
    assert "holds no tokens" in caplog.text


def test_token_file_refuses_a_missing_file(tmp_path):
    with pytest.raises(TokenFileError, match="cannot be read"):
        TokenFile(tmp_path / "absent")


def rewrite(path: Path, text: str) -> None:
    """Replace the file as an editor would, so the change is always visible."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_token_file_sees_added_and_removed_tokens(tmp_path):
    path = write_tokens(tmp_path, f"{hash_token(READER)} reader\n")
    tokens = TokenFile(path)
    assert tokens.lookup(READER) == Principal(
        "reader", "read", "token", hash_token(READER)
    )
    assert tokens.lookup(RUNNER) is None
    rewrite(path, f"{hash_token(RUNNER)} runner run\n")
    assert tokens.lookup(RUNNER).scope == "run"
    assert tokens.lookup(READER) is None


def test_token_file_fails_closed_when_the_new_file_is_bad(tmp_path, caplog):
    path = write_tokens(tmp_path, f"{hash_token(READER)} reader\n")
    tokens = TokenFile(path)
    with caplog.at_level(logging.ERROR):
        rewrite(path, f"{hash_token(READER)} reader\nnot a token line\n")
        assert tokens.lookup(READER) is None
    assert f"{path}:2: expected" in caplog.text
    assert "no token is valid until it is fixed" in caplog.text
    assert tokens.problem.startswith(f"{path}:2: expected")
    rewrite(path, f"{hash_token(READER)} reader\n")
    assert tokens.lookup(READER) is not None
    assert tokens.problem is None


def test_token_file_fails_closed_when_the_file_is_removed(tmp_path, caplog):
    path = write_tokens(tmp_path, f"{hash_token(READER)} reader\n")
    tokens = TokenFile(path)
    path.unlink()
    with caplog.at_level(logging.ERROR):
        assert tokens.lookup(READER) is None
    assert "missing or cannot be read" in caplog.text
    assert "missing or cannot be read" in tokens.problem
    write_tokens(tmp_path, f"{hash_token(READER)} reader\n")
    assert tokens.lookup(READER) is not None


# -- bearer authentication and scopes --------------------------------------------


class Jobs:
    scopes = {"GET": "read", "POST": "run"}

    async def on_get(self, req, resp):
        resp.media = {"who": str(req.context.principal)}

    async def on_post(self, req, resp):
        resp.media = {"who": str(req.context.principal)}

    async def on_delete(self, req, resp):  # not declared: needs run
        resp.media = {"deleted": True}


class Health:
    async def on_get(self, req, resp):
        resp.media = {"ok": True}


@pytest.fixture
def tokens_path(tmp_path) -> Path:
    return write_tokens(
        tmp_path, f"{hash_token(READER)} reader read\n{hash_token(RUNNER)} ci run\n"
    )


@pytest.fixture
def auth(tokens_path) -> Auth:
    return Auth(TokenFile(tokens_path))


@pytest.fixture
def client(auth) -> falcon.testing.TestClient:
    app = falcon.asgi.App(middleware=[auth])
    errors.install(app, retry_after_s=5)
    app.add_route("/v1/jobs", Jobs())
    app.add_route("/healthz", Health())
    return falcon.testing.TestClient(app)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_request_without_token_is_401_with_challenge(client):
    result = client.simulate_get("/v1/jobs")
    assert result.status_code == 401
    assert result.headers["WWW-Authenticate"] == 'Bearer realm="jobgate"'
    assert result.json["description"] == "send 'Authorization: Bearer <token>'"


@pytest.mark.parametrize("header", [f"Basic {READER}", "Bearer", "Bearer   ", READER])
def test_request_with_malformed_authorization_is_401(client, header):
    result = client.simulate_get("/v1/jobs", headers={"Authorization": header})
    assert result.status_code == 401
    assert result.headers["WWW-Authenticate"] == 'Bearer realm="jobgate"'


@pytest.mark.parametrize("token", ["wrong-token-value", READER + "x", READER.upper()])
def test_request_with_unknown_token_is_401(client, token):
    result = client.simulate_get("/v1/jobs", headers=bearer(token))
    assert result.status_code == 401
    assert result.headers["WWW-Authenticate"] == (
        'Bearer realm="jobgate", error="invalid_token"'
    )
    assert result.json["description"] == "the bearer token is not valid"


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_request_with_known_token_passes_and_names_it(client, scheme):
    result = client.simulate_get(
        "/v1/jobs", headers={"Authorization": f"{scheme} {RUNNER}"}
    )
    assert result.status_code == 200
    assert result.json == {"who": "token ci"}


def test_read_token_reads_but_cannot_run(client):
    assert client.simulate_get("/v1/jobs", headers=bearer(READER)).status_code == 200
    result = client.simulate_post("/v1/jobs", headers=bearer(READER))
    assert result.status_code == 403
    assert result.json["description"] == (
        "token reader has scope read; POST /v1/jobs needs scope run"
    )


def test_run_token_may_do_everything(client):
    assert client.simulate_post("/v1/jobs", headers=bearer(RUNNER)).status_code == 200
    assert client.simulate_delete("/v1/jobs", headers=bearer(RUNNER)).status_code == 200


def test_undeclared_method_needs_run_scope(client):
    result = client.simulate_delete("/v1/jobs", headers=bearer(READER))
    assert result.status_code == 403


def test_health_check_needs_no_token(client):
    result = client.simulate_get("/healthz")
    assert result.status_code == 200
    assert result.json == {"ok": True}


def test_removed_token_stops_working_at_once(client, auth, tokens_path):
    principal = auth.tokens.lookup(RUNNER)
    assert auth.still_valid(principal)
    rewrite(tokens_path, f"{hash_token(READER)} reader read\n")
    assert not auth.still_valid(principal)
    assert client.simulate_get("/v1/jobs", headers=bearer(RUNNER)).status_code == 401


def test_narrowed_token_loses_its_scope(auth, tokens_path):
    principal = auth.tokens.lookup(RUNNER)
    rewrite(tokens_path, f"{hash_token(RUNNER)} ci read\n")
    assert not auth.still_valid(principal)


def test_with_no_tokens_every_api_request_is_refused(tmp_path):
    app = falcon.asgi.App(middleware=[Auth(TokenFile(write_tokens(tmp_path, "")))])
    errors.install(app, retry_after_s=5)
    app.add_route("/v1/jobs", Jobs())
    result = falcon.testing.TestClient(app).simulate_get(
        "/v1/jobs", headers=bearer(READER)
    )
    assert result.status_code == 401


# -- jobgate-scheduler hash-token ---------------------------------------------------


def hash_token_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("jobgate-scheduler")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "scheduler.cli"]
    return subprocess.run(
        [*argv, "hash-token", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_hash_token_cli_prints_a_line_the_tokens_file_accepts(tmp_path):
    result = hash_token_cli("--name", "ci", "--scope", "run", stdin=RUNNER + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{hash_token(RUNNER)} ci run\n"
    path = write_tokens(tmp_path, result.stdout)
    assert load_tokens(path) == {hash_token(RUNNER): ("ci", "run")}


def test_hash_token_cli_generates_a_read_token_matching_its_hash():
    result = hash_token_cli("--generate")
    assert result.returncode == 0, result.stderr
    token = result.stderr.strip().removeprefix("token: ")
    assert len(token) >= 16
    assert result.stdout == f"{hash_token(token)} api read\n"


def test_hash_token_cli_refuses_a_short_token():
    result = hash_token_cli(stdin="short\n")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "a token must be at least 16 characters" in result.stderr
