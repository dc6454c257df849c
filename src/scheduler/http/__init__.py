"""The scheduler's HTTP API (Falcon, served by gunicorn)."""
