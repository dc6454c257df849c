"""Shared pieces of jobgate: config, identities, TLS, errors, logging."""

__version__ = "0.1.0"
