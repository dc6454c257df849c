"""Identities read from certificates: SPIFFE URIs, DNS names, gRPC peers."""

from __future__ import annotations

import pytest

from jobgate import identity
from jobgate.identity import Identity, dns_name, parse_uri, peer_identity, uri


class FakeContext:
    """Stands in for a grpc.ServicerContext; only auth_context() is used."""

    def __init__(self, auth):
        self._auth = auth

    def auth_context(self):
        return self._auth


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("spiffe://dev/scheduler", Identity("dev", "scheduler", "scheduler")),
        ("spiffe://dev/worker/w1", Identity("dev", "worker", "w1")),
        ("spiffe://dev/worker/worker-1", Identity("dev", "worker", "worker-1")),
        ("spiffe://prod-eu/client/ops", Identity("prod-eu", "client", "ops")),
        ("spiffe://a/worker/b", Identity("a", "worker", "b")),
    ],
)
def test_parse_uri_reads_our_identities(value, expected):
    assert parse_uri(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "spiffe://dev",
        "spiffe://dev/",
        "spiffe://dev/worker",
        "spiffe://dev/worker/",
        "spiffe://dev/worker/w1/extra",
        "spiffe://dev/scheduler/x",
        "spiffe://dev/admin/root",
        "spiffe://Dev/worker/w1",
        "spiffe://dev/worker/W1",
        "spiffe://dev/worker/w.1",
        "spiffe://dev.other/worker/w1",
        "spiffe://dev/worker/-w1",
        "spiffe://dev/worker/w1-",
        "https://dev/worker/w1",
        "spiffe://dev/worker/w1\n",
        " spiffe://dev/worker/w1",
        "spiffe://dev/worker/" + "a" * 64,
    ],
)
def test_parse_uri_refuses_anything_else(value):
    assert parse_uri(value) is None


def test_parse_uri_accepts_63_character_names():
    name = "a" * 63
    assert parse_uri(f"spiffe://dev/worker/{name}") == Identity("dev", "worker", name)


@pytest.mark.parametrize(
    ("role", "name"),
    [("scheduler", ""), ("worker", "w1"), ("client", "ops")],
)
def test_uri_and_parse_uri_round_trip(role, name):
    ident = parse_uri(uri("dev", role, name))
    assert ident is not None
    assert ident.role == role
    assert str(ident) == uri("dev", role, name)


def test_dns_names_differ_per_role_and_name():
    assert dns_name("dev", identity.SCHEDULER) == "scheduler.dev.jobgate"
    assert dns_name("dev", identity.WORKER, "w1") == "w1.worker.dev.jobgate"
    assert dns_name("dev", identity.CLIENT, "ops") == "ops.client.dev.jobgate"
    # A worker named "scheduler" cannot pass for the scheduler.
    assert dns_name("dev", identity.WORKER, "scheduler") != dns_name(
        "dev", identity.SCHEDULER
    )


def test_peer_identity_from_uri_san():
    ctx = FakeContext({"peer_uri": [b"spiffe://dev/worker/w1"]})
    assert peer_identity(ctx, "dev") == Identity("dev", "worker", "w1")


def test_peer_identity_from_spiffe_id():
    ctx = FakeContext({"peer_spiffe_id": [b"spiffe://dev/scheduler"]})
    assert peer_identity(ctx, "dev") == Identity("dev", "scheduler", "scheduler")


def test_peer_identity_accepts_the_same_identity_twice():
    ctx = FakeContext(
        {
            "peer_uri": [b"spiffe://dev/worker/w1"],
            "peer_spiffe_id": [b"spiffe://dev/worker/w1"],
        }
    )
    assert peer_identity(ctx, "dev") == Identity("dev", "worker", "w1")


def test_peer_identity_of_another_cluster_is_none():
    ctx = FakeContext({"peer_uri": [b"spiffe://prod/worker/w1"]})
    assert peer_identity(ctx, "dev") is None


def test_peer_identity_ignores_other_clusters_and_foreign_uris():
    ctx = FakeContext(
        {
            "peer_uri": [
                b"https://example.com/",
                b"spiffe://prod/scheduler",
                b"spiffe://dev/client/ops",
                b"\xff\xfe",
            ]
        }
    )
    assert peer_identity(ctx, "dev") == Identity("dev", "client", "ops")


@pytest.mark.parametrize(
    "uris",
    [
        [b"spiffe://dev/worker/w1", b"spiffe://dev/worker/w2"],
        [b"spiffe://dev/worker/w1", b"spiffe://dev/scheduler"],
        [b"spiffe://dev/client/ops", b"spiffe://dev/worker/ops"],
    ],
)
def test_peer_identity_refuses_a_certificate_with_two_identities(uris):
    assert peer_identity(FakeContext({"peer_uri": uris}), "dev") is None


def test_peer_identity_refuses_two_identities_across_properties():
    ctx = FakeContext(
        {
            "peer_uri": [b"spiffe://dev/worker/w1"],
            "peer_spiffe_id": [b"spiffe://dev/worker/w2"],
        }
    )
    assert peer_identity(ctx, "dev") is None


@pytest.mark.parametrize("auth", [None, {}, {"x509_common_name": [b"w1"]}])
def test_peer_without_a_cluster_certificate_is_none(auth):
    assert peer_identity(FakeContext(auth), "dev") is None
