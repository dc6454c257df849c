"""Who is on the other end of a gRPC call, as proven by its certificate.

Every certificate of a cluster names its holder twice (see ``certs/devca.py``):

* URI SAN ``spiffe://<cluster>/scheduler`` or ``spiffe://<cluster>/worker/<name>``:
  the receiving side reads it from the TLS session to decide what the caller
  may do;
* DNS SAN ``scheduler.<cluster>.jobgate`` or ``<name>.worker.<cluster>.jobgate``:
  the dialling side asks TLS to verify it (``grpc.ssl_target_name_override``),
  so it reaches the peer it meant and not merely some certificate of the CA.

Names are restricted to lowercase letters, digits and ``-`` so neither form can
be forged by choosing a name with dots or slashes in it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import grpc

NAME_PATTERN = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
NAME_RE = re.compile(NAME_PATTERN)
URI_RE = re.compile(
    rf"spiffe://({NAME_PATTERN})/(scheduler|(worker|client)/({NAME_PATTERN}))"
)

SCHEDULER = "scheduler"
WORKER = "worker"
CLIENT = "client"


@dataclass(frozen=True)
class Identity:
    cluster: str
    role: str
    name: str

    def __str__(self) -> str:
        return uri(self.cluster, self.role, self.name)


def uri(cluster: str, role: str, name: str = "") -> str:
    if role == SCHEDULER:
        return f"spiffe://{cluster}/scheduler"
    return f"spiffe://{cluster}/{role}/{name}"


def dns_name(cluster: str, role: str, name: str = "") -> str:
    """The DNS SAN a dialler verifies to be sure it reached ``role``/``name``."""
    if role == SCHEDULER:
        return f"scheduler.{cluster}.jobgate"
    return f"{name}.{role}.{cluster}.jobgate"


@functools.lru_cache(maxsize=4096)
def parse_uri(value: str) -> Identity | None:
    """The identity a SPIFFE URI names, or None if it is not one of ours.

    Asked on every gRPC call with the caller's certificate URI; the few
    distinct URIs a server sees are parsed once.
    """
    m = URI_RE.fullmatch(value)
    if not m:
        return None
    cluster = m.group(1)
    if m.group(3) == "scheduler" or m.group(3) is None:
        return Identity(cluster, SCHEDULER, SCHEDULER)
    return Identity(cluster, m.group(4), m.group(5))


def peer_identity(context: grpc.ServicerContext, cluster: str) -> Identity | None:
    """The caller's identity in ``cluster``, from its verified client certificate.

    Returns None when the caller presented no certificate of this cluster (the
    TLS layer already refused certificates the cluster CA did not sign).
    """
    auth = context.auth_context() or {}
    found = None
    for raw in auth.get("peer_uri", []) + auth.get("peer_spiffe_id", []):
        ident = parse_uri(raw.decode("utf-8", "replace"))
        if ident is None or ident.cluster != cluster:
            continue
        if found is not None and found != ident:
            return None  # a certificate claiming two identities is refused
        found = ident
    return found
