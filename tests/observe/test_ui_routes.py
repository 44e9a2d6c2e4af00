"""The dashboard's routes on a real broker: ``/ui/`` and its files, the redirect of ``/`` for
browsers only, and the guard letting the page's own same-origin JSON POSTs through while a
foreign page is still refused. (What the page shows is tests/observe/test_dashboard_browser.py.)
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.observe.dashboard import FILES, ui_files
from gpubroker.runtime import Endpoints
from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

GENERIC = {"unloadStrategy": "generic", "unloadEndpoint": "/unload"}
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@asynccontextmanager
async def broker(**top: Any) -> AsyncIterator[tuple[Endpoints, httpx.AsyncClient]]:
    """A broker with backends a and b that cannot both fit on one simulated GPU."""
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 5 * GiB, owner="a")
    b = GenericEmulator(gpu, 5 * GiB, owner="b")
    with anyio.fail_after(30):
        async with running(a.app) as ua, running(b.app) as ub:
            backends = {"a": {"upstream": ua, **GENERIC}, "b": {"upstream": ub, **GENERIC}}
            cfg = make_config(backends, telemetry="none", **top)
            async with (
                broker_running(cfg) as ep,
                httpx.AsyncClient(base_url=ep.status_url, timeout=10, trust_env=False) as client,
            ):
                yield ep, client


async def test_ui_serves_the_page_and_the_files_it_links() -> None:
    async with broker() as (_, client):
        page = await client.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        links = re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text)
        assert sorted(links) == ["/ui/app.css", "/ui/app.js"]  # nothing from elsewhere
        assert "http://" not in page.text and "https://" not in page.text  # no CDN
        for link, media in (("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
            r = await client.get(link)
            assert r.status_code == 200, link
            assert r.headers["content-type"].split(";")[0] == media
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.content  # not empty
        js = (await client.get("/ui/app.js")).text
        assert '"use strict"' in js
        assert "innerHTML" not in js  # data reaches the DOM as text only
        # /ui without the slash finds the page too
        assert (await client.get("/ui", follow_redirects=True)).url.path == "/ui/"


async def test_ui_serves_only_its_own_files() -> None:
    async with broker() as (_, client):
        for path in ("/ui/dashboard.py", "/ui/..%2Fstatus.py", "/ui/%2e%2e/status.py", "/ui/x.js"):
            r = await client.get(path)
            assert r.status_code == 404, path
        r = await client.post("/ui/", content=b"{}", headers={"content-type": "application/json"})
        assert r.status_code == 405  # the page is read-only


async def test_root_sends_browsers_to_the_dashboard_and_keeps_json_for_tools() -> None:
    async with broker() as (_, client):
        r = await client.get("/", headers={"accept": BROWSER_ACCEPT})
        assert r.status_code == 307
        assert r.headers["location"] == "/ui/"
        assert r.headers["vary"] == "Accept"  # caches keep the page and the JSON apart
        tools = (
            "*/*",  # curl
            "application/json",  # OneGPU4All tools
            None,  # no header
            "application/json, text/html;q=0.1",  # prefers JSON
            "text/html;q=0",  # refuses HTML outright
        )
        for accept in tools:
            headers = {"accept": accept} if accept else {}
            if accept is None:
                client.headers.pop("accept", None)
            r = await client.get("/", headers=headers)
            assert r.status_code == 200, accept
            assert r.headers["content-type"] == "application/json"
            assert r.headers["vary"] == "Accept"
            assert "vramOwner" in r.json()
        # the API's own path stays JSON even for a browser
        r = await client.get("/api/status", headers={"accept": BROWSER_ACCEPT})
        assert r.status_code == 200
        assert "backends" in r.json()


async def test_the_pages_own_origin_may_act_and_a_foreign_one_may_not() -> None:
    async with broker() as (ep, client):
        origin = ep.status_url.rstrip("/")  # what a browser sends for a page from /ui/
        json_body = {"content-type": "application/json", "origin": origin}
        r = await client.post("/api/swap", json={"backend": "a"}, headers=json_body)
        assert r.status_code == 200, r.text
        assert r.json()["owner"] == "a"
        r = await client.post("/api/unload", json={"backend": "a"}, headers=json_body)
        assert r.status_code == 200, r.text
        assert r.json()["unloaded"] == ["a"]
        # the same verb from another page's origin, or as a simple (non-JSON) request
        foreign = {"content-type": "application/json", "origin": "http://attacker.example"}
        r = await client.post("/api/swap", json={"backend": "b"}, headers=foreign)
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden_origin"
        plain = {"content-type": "text/plain", "origin": origin}
        r = await client.post("/api/swap", content=b'{"backend": "b"}', headers=plain)
        assert r.status_code == 415
        assert (await client.get("/")).json()["vramOwner"] is None  # nothing was swapped in


async def test_the_page_sends_the_token_in_a_header_and_is_told_when_it_is_missing() -> None:
    async with broker(adminToken="s3cret") as (ep, client):
        origin = ep.status_url.rstrip("/")
        r = await client.post(
            "/api/swap",
            json={"backend": "a"},
            headers={"content-type": "application/json", "origin": origin},
        )
        assert r.status_code == 401  # the page opens its token dialog on this
        assert "Bearer" in r.json()["message"]
        r = await client.post(
            "/api/swap",
            json={"backend": "a"},
            headers={
                "content-type": "application/json",
                "origin": origin,
                "authorization": "Bearer s3cret",
            },
        )
        assert r.status_code == 200, r.text
        js = (await client.get("/ui/app.js")).text
        assert "sessionStorage" in js and "localStorage" not in js  # kept for the tab only


async def test_a_foreign_host_cannot_read_the_page() -> None:
    async with broker() as (_, client):
        r = await client.get("/ui/", headers={"host": "rebound.example"})
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden_host"


def test_the_files_ship_inside_the_package() -> None:
    folder = ui_files()
    for name in FILES:
        assert folder.joinpath(name).is_file(), name
        assert folder.joinpath(name).read_bytes().strip(), name


def test_the_wheel_takes_the_files() -> None:
    """setuptools ships only the package data pyproject names (sdist, wheel and editable)."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["gpubroker"]
    assert "observe/ui/*" in data
