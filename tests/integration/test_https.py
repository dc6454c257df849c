"""HTTPS on the scheduler's API, client certificates, and plain-HTTP guards."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest
from conftest import cluster_of_its_own, devca

from jobgate.config import ConfigError
from jobgate.dev.cluster import DevCluster
from scheduler import config as scheduler_config


class HttpsCluster(DevCluster):
    """A development cluster whose HTTP API serves HTTPS with client certs."""

    def __init__(self, directory, **settings):
        settings.setdefault("https", True)
        settings.setdefault(
            "http_tls_extra",
            'client_ca_file = "pki/ca.pem"\n'
            'client_scopes = { ops = "run", dashboard = "read" }',
        )
        super().__init__(directory, **settings)

    def prepare(self) -> None:
        super().prepare()
        for name in ("ops", "dashboard", "stranger"):
            devca("issue", "--dir", str(self.pki), "--role", "client", "--name", name)

    def https(self, method, path, *, cert=None, token=None, body=None, ca=None):
        ctx = ssl.create_default_context(cafile=str(ca or self.pki / "ca.pem"))
        if cert:
            ctx.load_cert_chain(
                self.pki / f"client-{cert}.pem", self.pki / f"client-{cert}.key"
            )
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.scheduler_info["http_port"], context=ctx, timeout=30
        )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def tls_cluster(scripts_dir):
    with cluster_of_its_own(
        "https", scripts_dir, cluster_class=HttpsCluster, http_processes=1
    ) as c:
        yield c


def test_https_serves_with_token(tls_cluster):
    status, body = tls_cluster.https("GET", "/v1/workers", token=tls_cluster.token)
    assert status == 200
    assert json.loads(body)["workers"][0]["name"] == "worker-1"


def test_plain_http_to_https_port_is_not_served(tls_cluster):
    conn = http.client.HTTPConnection(
        "127.0.0.1", tls_cluster.scheduler_info["http_port"], timeout=5
    )
    try:
        conn.request("GET", "/healthz")
        status = conn.getresponse().status
    except (http.client.HTTPException, OSError):
        status = None  # the TLS server dropped the plain request
    finally:
        conn.close()
    assert status != 200


def test_client_verifying_with_another_ca_refuses_the_server(tls_cluster, tmp_path):
    devca("init", "--dir", str(tmp_path / "other"), "--cluster", "dev")
    with pytest.raises(ssl.SSLError):
        tls_cluster.https("GET", "/healthz", ca=tmp_path / "other" / "ca.pem")


def test_client_certificate_replaces_the_token(tls_cluster):
    status, _ = tls_cluster.https("GET", "/v1/workers")
    assert status == 401  # neither token nor certificate
    status, body = tls_cluster.https("GET", "/v1/workers", cert="ops")
    assert status == 200
    status, body = tls_cluster.https(
        "POST",
        "/v1/workers/worker-1/jobs?wait=true",
        cert="ops",
        body={"command": "bash", "path": "hello.sh"},
    )
    assert status == 201
    assert json.loads(body)["state"] == "succeeded"


def test_client_certificate_scopes(tls_cluster):
    status, _ = tls_cluster.https("GET", "/v1/workers", cert="dashboard")
    assert status == 200
    status, body = tls_cluster.https(
        "POST",
        "/v1/workers/worker-1/jobs",
        cert="dashboard",
        body={"command": "bash", "path": "hello.sh"},
    )
    assert status == 403
    assert "scope" in json.loads(body)["description"]
    status, body = tls_cluster.https("GET", "/v1/workers", cert="stranger")
    assert status == 403
    assert "client_scopes" in json.loads(body)["description"]


def test_client_certificate_of_another_ca_is_refused(tls_cluster, tmp_path):
    other = tmp_path / "other"
    devca("init", "--dir", str(other), "--cluster", "dev")
    devca("issue", "--dir", str(other), "--role", "client", "--name", "ops")
    ctx = ssl.create_default_context(cafile=str(tls_cluster.pki / "ca.pem"))
    ctx.load_cert_chain(other / "client-ops.pem", other / "client-ops.key")
    conn = http.client.HTTPSConnection(
        "127.0.0.1", tls_cluster.scheduler_info["http_port"], context=ctx, timeout=10
    )
    with pytest.raises((ssl.SSLError, ConnectionError)):
        conn.request("GET", "/v1/workers")
        conn.getresponse().read()
    conn.close()


BASE = """
[cluster]
name = "dev"
[tls]
ca_file = "ca.pem"
cert_file = "ca.pem"
key_file = "ca.pem"
[auth]
tokens_file = "ca.pem"
"""


@pytest.mark.parametrize(
    "http,error",
    [
        ('scheme = "http"\nbind = "0.0.0.0:8080"', "allow_plain_http_off_loopback"),
        ('scheme = "http"\nbind = "192.0.2.1:8080"', "in the clear"),
        ('scheme = "https"\nbind = "127.0.0.1:8080"', "[http.tls].cert_file"),
    ],
)
def test_plain_http_off_loopback_and_https_without_cert_are_refused(
    tmp_path, http, error
):
    (tmp_path / "ca.pem").write_text("x")
    path = tmp_path / "scheduler.toml"
    path.write_text(BASE + "[http]\n" + http + "\n")
    with pytest.raises(ConfigError) as exc:
        scheduler_config.load(path)
    assert error in str(exc.value)
    assert str(path) in str(exc.value)


def test_plain_http_off_loopback_allowed_only_explicitly(tmp_path):
    (tmp_path / "ca.pem").write_text("x")
    path = tmp_path / "scheduler.toml"
    path.write_text(
        BASE + '[http]\nscheme = "http"\nbind = "0.0.0.0:8080"\n'
        "allow_plain_http_off_loopback = true\n"
    )
    assert scheduler_config.load(path).http.scheme == "http"
