"""The OpenAPI 3.1 description of the HTTP API, served at ``/openapi.json``."""

from __future__ import annotations


def document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "jobgate", "version": "1"},
        "paths": {},
    }
