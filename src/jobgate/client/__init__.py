"""What a user installs on a laptop: the HTTP API's client library and ``jobgate``.

- :mod:`jobgate.client.api`: :class:`Client`; its settings (flags, the
  ``JOBGATE_*`` environment, ``~/.config/jobgate/client.toml``) in
  :mod:`jobgate.client.settings`, the errors of both in
  :mod:`jobgate.client.errors`;
- :mod:`jobgate.client.cli`: the ``jobgate`` command (its commands in
  :mod:`~jobgate.client.commands`, what it prints in
  :mod:`~jobgate.client.output`, its exit status in :mod:`~jobgate.client.exits`).

This package speaks HTTP only and imports nothing of the services: of the
shared package it uses the job model (:mod:`jobgate.model`), which needs
nothing beyond the standard library (``tests/unit/test_layers.py``).
"""

from jobgate.client.api import Client, make_ssl_context
from jobgate.client.errors import (
    ApiError,
    ClientError,
    ConnectionFailed,
    SettingsError,
    StreamBroken,
)
from jobgate.client.settings import (
    Settings,
    default_config_path,
    environ_settings,
    resolve_settings,
)

__all__ = [
    "ApiError",
    "Client",
    "ClientError",
    "ConnectionFailed",
    "Settings",
    "SettingsError",
    "StreamBroken",
    "default_config_path",
    "environ_settings",
    "make_ssl_context",
    "resolve_settings",
]
