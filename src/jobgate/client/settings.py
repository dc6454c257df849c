"""Where the client's settings come from: flags, the environment, a TOML file.

:func:`resolve_settings` finds the scheduler's URL, the API token and the TLS
files the way the ``jobgate`` command does: flags, then the ``JOBGATE_*``
environment, then ``~/.config/jobgate/client.toml`` (or the file
``JOBGATE_CONFIG`` names). The :class:`Settings` it returns make a
:class:`~jobgate.client.api.Client` (:meth:`Settings.client`);
:func:`environ_settings` is the same without flags, for library users.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobgate.client.api import DEFAULT_TIMEOUT_S, Client
from jobgate.client.errors import SettingsError

SETTING_KEYS = ("url", "token", "token_file", "ca_file", "cert_file", "key_file")
ENV_PREFIX = "JOBGATE_"
ENV_CONFIG = "JOBGATE_CONFIG"


def default_config_path(environ: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/jobgate/client.toml``, else ``~/.config/jobgate/...``."""
    base = environ.get("XDG_CONFIG_HOME")
    if base:
        return Path(base) / "jobgate" / "client.toml"
    home = environ.get("HOME")
    root = Path(home) if home else Path.home()
    return root / ".config" / "jobgate" / "client.toml"


@dataclass(frozen=True)
class Settings:
    """Where the scheduler is and how to authenticate to it.

    ``sources`` names where each value came from (``--url``, ``JOBGATE_URL``
    or the config file), for error messages.
    """

    url: str | None = None
    token: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def client(self, timeout: float = DEFAULT_TIMEOUT_S) -> Client:
        """A :class:`Client` for these settings; SettingsError if one is missing.

        A client certificate over HTTPS may stand in for the token.
        """
        if not self.url:
            raise SettingsError("no scheduler URL")
        if not self.token and not (self.cert_file and self.url.startswith("https:")):
            raise SettingsError("no API token")
        return Client(
            self.url,
            self.token,
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            timeout=timeout,
        )


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such config file") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None
    for key, value in data.items():
        if key not in SETTING_KEYS:
            raise SettingsError(
                f"{path}: {key}: unknown key (known: {', '.join(SETTING_KEYS)})"
            )
        if not isinstance(value, str) or not value:
            raise SettingsError(f"{path}: {key}: must be a non-empty string")
    return data


@dataclass(frozen=True)
class _TokenFile:
    path: Path

    def read(self, where: str) -> str:
        try:
            token = self.path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            text = getattr(exc, "strerror", None) or str(exc)
            raise SettingsError(f"{where}: cannot read {self.path}: {text}") from None
        if not token:
            raise SettingsError(f"{where}: {self.path} is empty")
        return token


def _layer_values(
    layer: Mapping[str, str | None], base: Path | None, where: str
) -> dict[str, tuple[Any, str]]:
    """One layer's settings as ``{key: (value, source)}``; paths made absolute.

    ``token`` and ``token_file`` are one setting, the token: a layer gives
    one or the other. A token file is read only if its layer wins.
    """
    out: dict[str, tuple[Any, str]] = {}

    def source(key: str) -> str:
        if where == "flags":
            return "--" + key.replace("_", "-")
        if where == "env":
            return ENV_PREFIX + key.upper()
        return f"{where}: {key}"

    def path(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() or base is None else base / p

    if layer.get("token") and layer.get("token_file"):
        raise SettingsError(
            f"{source('token')} and {source('token_file')}: give one or the other"
        )
    for key in ("url", "ca_file", "cert_file", "key_file"):
        value = layer.get(key)
        if value:
            out[key] = (path(value) if key != "url" else value, source(key))
    if layer.get("token"):
        out["token"] = (str(layer["token"]).strip(), source("token"))
    elif layer.get("token_file"):
        token_path = path(str(layer["token_file"]))
        out["token"] = (_TokenFile(token_path), source("token_file"))
    return out


def resolve_settings(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    config: str | Path | None = None,
) -> Settings:
    """Settings from flags, then ``JOBGATE_*`` variables, then the config file.

    Each setting is taken from the first layer that gives it. ``flags`` maps
    the keys of :data:`SETTING_KEYS` to values (None when not given). The
    config file is ``config`` if given, else ``$JOBGATE_CONFIG``, else the
    default path, which may be missing; a file named explicitly must exist.
    Relative paths in the file are relative to the file's directory.
    """
    explicit = config or environ.get(ENV_CONFIG) or None
    path = Path(explicit).expanduser() if explicit else default_config_path(environ)
    file_values: dict[str, Any] = {}
    if explicit or path.is_file():
        file_values = _read_config_file(path)
    env_values = {k: environ.get(ENV_PREFIX + k.upper()) for k in SETTING_KEYS}
    layers = [
        _layer_values(file_values, path.parent, str(path)),
        _layer_values(env_values, None, "env"),
        _layer_values(flags, None, "flags"),
    ]
    merged: dict[str, tuple[Any, str]] = {}
    for layer in layers:  # lowest precedence first; later layers win
        merged.update(layer)
    if "token" in merged and isinstance(merged["token"][0], _TokenFile):
        token_file, where = merged["token"]
        merged["token"] = (token_file.read(where), f"{where} ({token_file.path})")
    values = {k: v for k, (v, _) in merged.items()}
    return Settings(**values, sources={k: s for k, (_, s) in merged.items()})


def environ_settings() -> Settings:
    """Settings from ``JOBGATE_*`` and the config file, for library users."""
    return resolve_settings({}, os.environ)
