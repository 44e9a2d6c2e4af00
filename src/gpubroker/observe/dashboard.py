"""``/ui/``: the dashboard, a static page in the package (``observe/ui/``) that reads the
status JSON and ``/events`` and calls the admin verbs, all on this port.

No CDN, no build step: three files served as they are, found with :mod:`importlib.resources`
so they work from a wheel, an editable install or a source tree, offline. They sit behind the
status port's guard like every other route: a same-origin ``fetch`` POST with a JSON body passes
it, and a foreign page still cannot act. ``Cache-Control: no-cache`` so an upgraded broker's page
is never mixed with an old script.

A browser asking for ``/`` (its ``Accept`` names ``text/html``) is sent to ``/ui/``; API
clients (curl's ``*/*``, OneGPU4All tools, ``gpubroker status``) keep the JSON there.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

import anyio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from gpubroker.errors import NotFound

UI_PATH = "/ui/"
# what the page is made of: name -> media type (nothing else under /ui/ is served)
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    # the page loads only its own files and talks only to this port (no inline script)
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "referrer-policy": "no-referrer",
}


def ui_files() -> Traversable:
    """The folder holding the page, wherever the package is installed."""
    return files("gpubroker.observe").joinpath("ui")


def wants_html(request: Request) -> bool:
    """A browser navigating here: its ``Accept`` prefers ``text/html`` to JSON (curl's ``*/*``
    names neither; ``application/json, text/html;q=0.1`` prefers JSON; ``q=0`` refuses)."""
    prefs = accepted(request.headers.get("accept", ""))
    html = prefs.get("text/html", 0.0)
    return html > 0 and html >= prefs.get("application/json", 0.0)


def accepted(header: str) -> dict[str, float]:
    """Media type -> quality, from an ``Accept`` header (RFC 9110 §12.5.1); a bad q is 0."""
    out: dict[str, float] = {}
    for item in header.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        media = media.lower()
        out[media] = max(out.get(media, 0.0), q)
    return out


# ``/`` answers a browser and an API client differently: caches must keep them apart.
VARY = {"vary": "Accept"}


def to_ui() -> Response:
    return RedirectResponse(UI_PATH, status_code=307, headers=VARY)


class Dashboard:
    """The ``/ui`` routes."""

    def __init__(self, folder: Traversable | None = None) -> None:
        self.folder = folder if folder is not None else ui_files()

    def routes(self) -> list[Route]:
        return [
            Route("/ui", self.bare, methods=["GET", "HEAD"]),
            Route("/ui/", self.index, methods=["GET", "HEAD"]),
            Route("/ui/{name}", self.file, methods=["GET", "HEAD"]),
        ]

    async def bare(self, request: Request) -> Response:
        return to_ui()

    async def index(self, request: Request) -> Response:
        return await self._serve("index.html")

    async def file(self, request: Request) -> Response:
        return await self._serve(request.path_params["name"])

    async def _serve(self, name: str) -> Response:
        media = FILES.get(name)
        if media is None:
            raise NotFound(f"no dashboard file {name!r} (the page is {', '.join(FILES)})")
        body = await anyio.to_thread.run_sync(self.folder.joinpath(name).read_bytes)
        return Response(body, media_type=media, headers=HEADERS)
