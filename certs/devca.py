#!/usr/bin/env python3
"""Development certificate authority for jobgate clusters.

Creates a cluster CA and issues the certificates that the scheduler, the
workers and HTTP clients use. Each certificate carries its role twice:

* a URI SAN, ``spiffe://<cluster>/scheduler``, ``spiffe://<cluster>/worker/<name>``
  or ``spiffe://<cluster>/client/<name>``, which the receiving side checks;
* a DNS SAN, ``scheduler.<cluster>.jobgate`` or ``<name>.worker.<cluster>.jobgate``,
  which the dialling side asks TLS to verify (so a worker's certificate can
  never pass for the scheduler's, nor one worker's for another's).

Production clusters get their CA from the Ansible ``common`` role; this tool
serves ``make run``, the tests and labs::

    devca.py init  --dir DIR --cluster NAME
    devca.py issue --dir DIR --role scheduler
    devca.py issue --dir DIR --role worker --name worker-1 [--days N | --expired]
    devca.py issue --dir DIR --role client --name ops
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ROLES = ("scheduler", "worker", "client")


class DevCAError(Exception):
    """A request the tool cannot carry out; the message says what to fix."""


def check_name(kind: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise DevCAError(
            f"{kind} {value!r} is not valid: use 1-63 lowercase letters, digits "
            "and '-', starting and ending with a letter or digit"
        )
    return value


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def init_ca(directory: Path, cluster: str, days: int = 3650, force: bool = False):
    """Create ``ca.pem``, ``ca.key`` and ``cluster`` in ``directory``."""
    check_name("cluster", cluster)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / "ca.pem"
    if cert_path.exists() and not force:
        raise DevCAError(f"{cert_path} exists; pass --force to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "jobgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"jobgate {cluster} CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca.key", _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "cluster").write_text(cluster + "\n")
    return cert_path


def identity_names(cluster: str, role: str, name: str) -> tuple[str, str]:
    """The (URI SAN, DNS SAN) pair that identifies ``role``/``name``."""
    if role == "scheduler":
        return f"spiffe://{cluster}/scheduler", f"scheduler.{cluster}.jobgate"
    if role == "worker":
        return (
            f"spiffe://{cluster}/worker/{name}",
            f"{name}.worker.{cluster}.jobgate",
        )
    return f"spiffe://{cluster}/client/{name}", f"{name}.client.{cluster}.jobgate"


def issue(
    directory: Path,
    role: str,
    name: str | None = None,
    *,
    days: int = 825,
    expired: bool = False,
    extra_dns: tuple[str, ...] = (),
    extra_ips: tuple[str, ...] = (),
    out: Path | None = None,
) -> tuple[Path, Path]:
    """Issue a certificate for ``role`` signed by the CA in ``directory``.

    Returns the (certificate, key) paths, ``<out>/<file-stem>.pem`` and ``.key``.
    """
    if role not in ROLES:
        raise DevCAError(f"role {role!r} is not one of {', '.join(ROLES)}")
    try:
        cluster = (directory / "cluster").read_text().strip()
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key(
            (directory / "ca.key").read_bytes(), password=None
        )
    except FileNotFoundError as exc:
        raise DevCAError(
            f"no CA in {directory} ({exc.filename} missing); run 'devca.py init' first"
        ) from None
    if role == "scheduler":
        name = name or "scheduler"
    elif not name:
        raise DevCAError(f"--name is required for role {role}")
    check_name("name", name)
    uri, dns = identity_names(cluster, role, name)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    if expired:
        not_before, not_after = now - dt.timedelta(days=30), now - dt.timedelta(days=1)
    else:
        not_before, not_after = (
            now - dt.timedelta(minutes=5),
            now + dt.timedelta(days=days),
        )
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(uri),
        x509.DNSName(dns),
    ]
    sans += [x509.DNSName(d) for d in extra_dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in extra_ips]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role != "client":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"jobgate {cluster}"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = out or directory
    out.mkdir(parents=True, exist_ok=True)
    stem = name if role != "scheduler" else "scheduler"
    if role == "client":
        stem = f"client-{name}"
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    _write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devca.py", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_init = sub.add_parser("init", help="create a cluster CA")
    p_init.add_argument("--dir", type=Path, required=True)
    p_init.add_argument("--cluster", required=True)
    p_init.add_argument("--days", type=int, default=3650)
    p_init.add_argument("--force", action="store_true", help="replace an existing CA")
    p_issue = sub.add_parser("issue", help="issue a certificate signed by the CA")
    p_issue.add_argument("--dir", type=Path, required=True, help="the CA's directory")
    p_issue.add_argument("--role", choices=ROLES, required=True)
    p_issue.add_argument("--name", help="worker or client name")
    p_issue.add_argument("--days", type=int, default=825)
    p_issue.add_argument(
        "--expired", action="store_true", help="issue an already expired certificate"
    )
    p_issue.add_argument("--dns", action="append", default=[], help="extra DNS SAN")
    p_issue.add_argument("--ip", action="append", default=[], help="extra IP SAN")
    p_issue.add_argument("--out", type=Path, help="output directory (default: --dir)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "init":
            print(init_ca(args.dir, args.cluster, args.days, args.force))
        else:
            cert, key = issue(
                args.dir,
                args.role,
                args.name,
                days=args.days,
                expired=args.expired,
                extra_dns=tuple(args.dns),
                extra_ips=tuple(args.ip),
                out=args.out,
            )
            print(cert)
            print(key)
    except DevCAError as exc:
        print(f"devca: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
