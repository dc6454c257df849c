"""Mutual-TLS credentials for the gRPC servers and channels of a cluster.

There is deliberately no way to build an insecure server or channel here: a
config cannot switch TLS off, and every server requires a client certificate
signed by the cluster CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from jobgate.config import setting


@dataclass(frozen=True)
class TLSConfig:
    ca_file: Path = setting(exists="file", help="PEM file of the cluster CA")
    cert_file: Path = setting(exists="file", help="PEM certificate of this service")
    key_file: Path = setting(exists="file", help="PEM private key of cert_file")


@dataclass(frozen=True)
class Credentials:
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, cfg: TLSConfig) -> Credentials:
        return cls(
            ca=cfg.ca_file.read_bytes(),
            cert=cfg.cert_file.read_bytes(),
            key=cfg.key_file.read_bytes(),
        )

    def server(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.ca,
            require_client_auth=True,
        )

    def channel(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)


# Keepalive keeps long-lived channels honest about dead peers; the values are
# what both sides agree to, so neither answers the other with GOAWAY.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
    ("grpc.so_reuseport", 0),
)


def _channel_options(peer_dns_name: str, options) -> list:
    return [
        *CHANNEL_OPTIONS,
        ("grpc.ssl_target_name_override", peer_dns_name),
        *options,
    ]


def secure_channel(
    target: str, creds: Credentials, peer_dns_name: str, options=()
) -> grpc.Channel:
    """A channel to ``target`` that only talks to the holder of ``peer_dns_name``."""
    opts = _channel_options(peer_dns_name, options)
    return grpc.secure_channel(target, creds.channel(), options=opts)


def secure_aio_channel(
    target: str, creds: Credentials, peer_dns_name: str, options=()
) -> grpc.aio.Channel:
    """:func:`secure_channel` for asyncio code; made inside the running loop."""
    opts = _channel_options(peer_dns_name, options)
    return grpc.aio.secure_channel(target, creds.channel(), options=opts)
