"""Shared pieces of jobgate: config, identities, TLS, errors, logging."""

__version__ = "0.1.0"

# Jobs are spawned with fork+exec from threaded gRPC processes; gRPC's fork
# handlers are for processes that keep using gRPC after fork(), which jobgate
# never does, and they only log noise. Must be set before grpc is imported.
import os as _os

_os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
