"""The browser demo at ``GET /demo``: the static files that ``make demo``
builds (clients/ts/demo/), served as they are.

The page lives at ``/demo`` itself and names its files relatively
(``demo/app.js``), so it works behind a proxy that mounts the server under
a path prefix; ``/demo/`` redirects to ``/demo`` so those names resolve the
same way. Only the files directly in ``DEMO_DIR`` are served, never a path
below or above it. When the demo has not been built (or ``DEMO_DIR`` is
empty), each of these URLs answers 404 with a sentence saying so.
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".map": "application/json",
    ".svg": "image/svg+xml",
}
# A plain file name of the build: no separator, no leading dot (so no "..").
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")

NOT_BUILT = "The browser demo is not built on this server: run `make demo` (or set DEMO_DIR to its build).\n"


class DemoFiles:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def _file(self, name: str) -> Path | None:
        if self.directory is None or not _NAME.fullmatch(name) or Path(name).suffix not in _TYPES:
            return None
        path = self.directory / name
        return path if path.is_file() else None

    def _answer(self, name: str) -> web.StreamResponse:
        path = self._file(name)
        if path is None:
            built = self.directory is not None and (self.directory / "index.html").is_file()
            text = "Not found.\n" if built else NOT_BUILT
            return web.Response(status=404, text=text)
        # no-cache: revalidated each time, so a rebuilt demo shows at the next reload.
        return web.FileResponse(path, headers={"Content-Type": _TYPES[path.suffix], "Cache-Control": "no-cache"})

    async def index(self, request: web.Request) -> web.StreamResponse:
        return self._answer("index.html")

    async def to_index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("../demo")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        return self._answer(request.match_info["name"])


def add_routes(app: web.Application, directory: Path | None) -> None:
    files = DemoFiles(directory)
    app.router.add_get("/demo", files.index)
    app.router.add_get("/demo/", files.to_index)
    app.router.add_get("/demo/{name}", files.asset)
