"""The development CA: the certificates it issues name their holder correctly."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobgate import identity

DEVCA = Path(__file__).resolve().parents[2] / "certs" / "devca.py"


def devca(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEVCA), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(*args: str) -> list[str]:
    result = devca(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def load_cert(path: Path | str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return (
        ext.get_values_for_type(x509.UniformResourceIdentifier),
        ext.get_values_for_type(x509.DNSName),
    )


def usages(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    assert ok("init", "--dir", str(directory), "--cluster", "dev") == [
        str(directory / "ca.pem")
    ]
    return directory


def test_init_creates_a_ca_for_the_cluster(ca):
    cert = load_cert(ca / "ca.pem")
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is True
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "jobgate dev CA"
    assert (ca / "cluster").read_text() == "dev\n"
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600


def test_init_refuses_to_replace_a_ca_without_force(ca):
    before = (ca / "ca.pem").read_bytes()
    result = devca("init", "--dir", str(ca), "--cluster", "dev")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"devca: {ca / 'ca.pem'} exists; pass --force to replace it"
    )
    assert (ca / "ca.pem").read_bytes() == before
    ok("init", "--dir", str(ca), "--cluster", "dev", "--force")
    assert (ca / "ca.pem").read_bytes() != before


@pytest.mark.parametrize(
    ("role", "name", "stem", "uri", "dns"),
    [
        (
            "worker",
            "worker-1",
            "worker-1",
            "spiffe://dev/worker/worker-1",
            "worker-1.worker.dev.jobgate",
        ),
        (
            "scheduler",
            None,
            "scheduler",
            "spiffe://dev/scheduler",
            "scheduler.dev.jobgate",
        ),
        (
            "client",
            "ops",
            "client-ops",
            "spiffe://dev/client/ops",
            "ops.client.dev.jobgate",
        ),
    ],
)
def test_issued_certificate_names_its_holder(ca, role, name, stem, uri, dns):
    args = ["issue", "--dir", str(ca), "--role", role]
    if name:
        args += ["--name", name]
    assert ok(*args) == [str(ca / f"{stem}.pem"), str(ca / f"{stem}.key")]
    cert = load_cert(ca / f"{stem}.pem")
    assert sans(cert) == ([uri], [dns])
    # What the services derive from the certificate is what devca meant.
    parsed = identity.parse_uri(uri)
    assert parsed is not None and parsed.role == role
    assert identity.dns_name("dev", role, parsed.name) == dns
    cert.verify_directly_issued_by(load_cert(ca / "ca.pem"))
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False
    key_path = ca / f"{stem}.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()


def test_worker_and_scheduler_certificates_serve_and_clients_only_call(ca):
    ok("issue", "--dir", str(ca), "--role", "worker", "--name", "w1")
    ok("issue", "--dir", str(ca), "--role", "scheduler")
    ok("issue", "--dir", str(ca), "--role", "client", "--name", "ops")
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    assert usages(load_cert(ca / "w1.pem")) == both
    assert usages(load_cert(ca / "scheduler.pem")) == both
    assert usages(load_cert(ca / "client-ops.pem")) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_extra_dns_names_ips_and_output_directory(ca, tmp_path):
    out = tmp_path / "out"
    args = ["--dns", "localhost", "--ip", "127.0.0.1", "--out", str(out)]
    ok("issue", "--dir", str(ca), "--role", "scheduler", *args)
    assert not (ca / "scheduler.pem").exists()
    cert = load_cert(out / "scheduler.pem")
    uris, dns = sans(cert)
    assert uris == ["spiffe://dev/scheduler"]
    assert dns == ["scheduler.dev.jobgate", "localhost"]
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ext.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1")
    ]


def test_expired_certificate_ended_in_the_past(ca):
    ok("issue", "--dir", str(ca), "--role", "worker", "--name", "old", "--expired")
    cert = load_cert(ca / "old.pem")
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_after_utc < now
    assert cert.not_valid_before_utc < cert.not_valid_after_utc


def test_days_sets_the_validity(ca):
    ok("issue", "--dir", str(ca), "--role", "worker", "--name", "w1", "--days", "2")
    cert = load_cert(ca / "w1.pem")
    remaining = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(days=1) < remaining <= dt.timedelta(days=2)


@pytest.mark.parametrize(
    "name",
    ["Worker", "w_1", "w.1", "-w1", "w1-", "../w1", "a" * 64, "", "w1\n"],
)
def test_bad_worker_names_are_refused(ca, name):
    before = sorted(p.name for p in ca.iterdir())
    result = devca("issue", "--dir", str(ca), "--role", "worker", f"--name={name}")
    assert result.returncode == 2
    if name:
        assert f"devca: name {name!r} is not valid" in result.stderr
    assert sorted(p.name for p in ca.iterdir()) == before


@pytest.mark.parametrize("cluster", ["Dev", "dev.prod", "dev/x", "dev\n"])
def test_bad_cluster_names_are_refused(tmp_path, cluster):
    directory = tmp_path / "ca"
    result = devca("init", "--dir", str(directory), f"--cluster={cluster}")
    assert result.returncode == 2
    assert f"devca: cluster {cluster!r} is not valid" in result.stderr
    assert not (directory / "ca.pem").exists()


def test_worker_name_is_required(ca):
    result = devca("issue", "--dir", str(ca), "--role", "worker")
    assert result.returncode == 2
    assert result.stderr.strip() == "devca: --name is required for role worker"


def test_issue_without_a_ca_says_to_run_init(tmp_path):
    result = devca("issue", "--dir", str(tmp_path), "--role", "scheduler")
    assert result.returncode == 2
    assert "run 'devca.py init' first" in result.stderr


def test_unknown_role_is_refused(ca):
    result = devca("issue", "--dir", str(ca), "--role", "admin", "--name", "x")
    assert result.returncode == 2
    assert "invalid choice: 'admin'" in result.stderr
