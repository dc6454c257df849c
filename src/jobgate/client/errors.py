"""The errors the client library raises: settings, connection, the API's answers.

:class:`ClientError` is the base of them all. :class:`SettingsError` says the
client's settings are missing or unusable; :class:`ConnectionFailed` (and
:class:`StreamBroken`) that the scheduler could not be reached or an answer
ended early; :class:`ApiError` is an error answer of the API, which
:func:`api_error` makes of the response.
"""

from __future__ import annotations

import json


class ClientError(Exception):
    """Base of the errors the client library raises (:mod:`jobgate.client.api`,
    :mod:`jobgate.client.settings`)."""


class SettingsError(ClientError):
    """The client's settings (flags, environment, its TOML file) are missing or
    unusable; the message says which. The services' config files have their
    own error, :class:`jobgate.config.ConfigError`."""


class ConnectionFailed(ClientError):
    """The scheduler could not be reached, or a response ended early.

    ``sent``: the request may have reached the scheduler (it broke after it
    was sent), so repeating it is safe only if it is idempotent.
    """

    def __init__(self, message: str, sent: bool = False):
        super().__init__(message)
        self.sent = sent


class StreamBroken(ConnectionFailed):
    """An output stream ended before the scheduler finished it.

    ``received`` is how many bytes arrived before the break.
    """

    def __init__(self, message: str, received: int):
        super().__init__(message)
        self.received = received


class ApiError(ClientError):
    """An error answer of the API: ``status``, ``title`` and ``description``."""

    def __init__(
        self,
        status: int,
        title: str,
        description: str,
        retry_after: str | None = None,
    ):
        super().__init__(f"{status} {title}: {description}")
        self.status = status
        self.title = title
        self.description = description
        self.retry_after = retry_after


def api_error(status: int, reason: str, headers, raw: bytes) -> ApiError:
    title, description = reason or "Error", ""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict):
        title = str(data.get("title") or title)
        description = str(data.get("description") or "")
    elif raw:
        # Not the API's JSON (a proxy in front of it, say): show the start.
        description = raw[:300].decode(errors="replace").strip()
    return ApiError(status, title, description, headers.get("Retry-After"))
