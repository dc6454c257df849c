"""How an API token is kept: never itself, only its hash.

The scheduler's tokens file holds one ``sha256:<hex> <name> [<scope>]`` line
per token (``scheduler.http.auth`` reads it); ``jobgate-scheduler
hash-token``, the Ansible role and the development cluster write such lines
with :func:`hash_token`.
"""

from __future__ import annotations

import hashlib

PREFIX = "sha256:"


def hash_token(token: str) -> str:
    """The form a token is written in a tokens file."""
    return PREFIX + hashlib.sha256(token.encode()).hexdigest()
