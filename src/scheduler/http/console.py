"""The web console: the files of ``scheduler/console`` at ``/ui/``.

The console is a page of the public API's own making: it holds no data and
can do nothing a token holder could not do with curl, so its files need no
token (the page asks for one and sends it with every API call).

Every file is read once, when the app is made, and served from memory: no
part of a request's path ever reaches the file system, and a name that is not
one of those files is a 404. Each answer carries a Content-Security-Policy
that lets the page run only its own scripts and styles, talk only to its own
origin and be framed by nobody.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import falcon

from jobgate.errors import NotFound

DIRECTORY = Path(__file__).resolve().parent.parent / "console"
PREFIX = "/ui/"
INDEX = "index.html"

TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}

POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # Revalidated each time (an ETag answers 304): a new version of the
    # package shows at the next load, never a mix of old and new modules.
    "Cache-Control": "no-cache",
}


class File:
    __slots__ = ("data", "content_type", "etag")

    def __init__(self, data: bytes, content_type: str):
        self.data = data
        self.content_type = content_type
        self.etag = hashlib.sha256(data).hexdigest()[:32]


def load(directory: Path | None = None) -> dict[str, File]:
    """The console's files by name (of :data:`DIRECTORY` unless given);
    empty if the directory is missing."""
    directory = DIRECTORY if directory is None else directory
    files: dict[str, File] = {}
    if not directory.is_dir():
        return files
    for path in sorted(directory.iterdir()):
        content_type = TYPES.get(path.suffix)
        if content_type is not None and path.is_file():
            files[path.name] = File(path.read_bytes(), content_type)
    return files


class Files:
    """``GET /ui/`` (the page) and ``GET /ui/{name}`` (its scripts, styles)."""

    in_api = False  # not an API operation: absent from /openapi.json

    def __init__(self, files: dict[str, File]):
        self.files = files

    async def on_get(self, req, resp, name: str | None = None):
        if name is None:  # /ui/, or /ui
            if not req.scope.get("path", "").endswith("/"):
                # The page's relative links would resolve against /.
                _redirect(resp, PREFIX)
                return
            name = INDEX
        found = self.files.get(name)
        if found is None:
            raise NotFound(f"the console has no file {name!r}")
        for header, value in HEADERS.items():
            resp.set_header(header, value)
        resp.etag = found.etag
        if found.etag in (req.if_none_match or ()):
            resp.status = falcon.HTTP_304
            return
        resp.content_type = found.content_type
        resp.data = found.data


class Root:
    """``GET /``: to the console."""

    in_api = False

    async def on_get(self, req, resp):
        _redirect(resp, PREFIX)


def _redirect(resp, location: str) -> None:
    resp.status = falcon.HTTP_302
    resp.location = location
    resp.set_header("Cache-Control", "no-cache")
