"""No web page may drive the admin API: the status port's Host allow-list, Origin check, CORS
refusal and JSON-only verbs (``gpubroker.observe.guard``), against a real broker over real sockets.

The attack is what a browser sends for a page's ``fetch(…, {method: "POST", body: "…"})``: a
"simple request" (``text/plain``, no preflight) with the page's ``Origin``, and, once DNS
rebinding points the page's name at 127.0.0.1, the page's own name as ``Host``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from typer.testing import CliRunner
from websockets.asyncio.client import connect

from gpubroker.cli.client import call
from gpubroker.cli.main import app as cli_app
from gpubroker.config.hosts import allowed_host_entry, split_host
from gpubroker.observe.guard import HostPolicy, ListenerGuard
from gpubroker.runtime import Endpoints
from gpubroker.sim import GenericEmulator, GiB, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio
runner = CliRunner()

ATTACKER = "http://attacker.example"
GENERIC = {"unloadStrategy": "generic", "unloadEndpoint": "/unload"}
VERBS = [
    ("/api/swap", {"backend": "b"}),
    ("/api/unload", {"backend": "a"}),
    ("/api/unload", {}),
    ("/api/workers/stop", {"all": True}),
    ("/api/workers/stop", {"pid": 1}),
    ("/api/workers/restart", {"name": "a"}),
    ("/api/workers/start", {"all": True}),
    ("/api/workers/ensure", {"all": True}),
]


@asynccontextmanager
async def two_backends(**top: Any) -> AsyncIterator[tuple[Endpoints, httpx.AsyncClient]]:
    """A broker with backends a and b that cannot both fit on one simulated GPU."""
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 5 * GiB, owner="a")
    b = GenericEmulator(gpu, 5 * GiB, owner="b")
    with anyio.fail_after(30):
        async with running(a.app) as ua, running(b.app) as ub:
            backends = {"a": {"upstream": ua, **GENERIC}, "b": {"upstream": ub, **GENERIC}}
            cfg = make_config(backends, telemetry="none", **top)
            async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
                yield ep, client


def port_of(url: str) -> int:
    port = httpx.URL(url).port
    assert port is not None
    return port


async def raw(port: int, head: bytes) -> bytes:
    """Send one request head as bytes; return the answer's head (or all of it, if shorter)."""
    answer = b""
    with anyio.fail_after(10):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(head + b"\r\n")
            try:
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                pass
    return answer


async def owner(client: httpx.AsyncClient, ep: Endpoints) -> tuple[str | None, int]:
    status = (await client.get(ep.status_url + "/")).json()
    return status["vramOwner"], status["swapCount"]


async def test_a_web_pages_simple_request_changes_nothing() -> None:
    async with two_backends() as (ep, client):
        swapped = await client.post(ep.status_url + "/api/swap", json={"backend": "a"})
        assert swapped.status_code == 200 and swapped.json()["owner"] == "a"
        before = await owner(client, ep)
        here = f"127.0.0.1:{port_of(ep.status_url)}"
        attacks = [  # (headers, status, error code): each layer on its own, then all of them
            ({"host": "attacker.example", "origin": ATTACKER}, 403, "forbidden_host"),
            ({"host": "attacker.example:80"}, 403, "forbidden_host"),
            ({"host": here, "origin": ATTACKER}, 403, "forbidden_origin"),
            ({"host": here, "origin": "null"}, 403, "forbidden_origin"),
            # a page on one of our own proxy ports (say ComfyUI's UI) is another origin too
            ({"host": here, "origin": ep.proxies["a"]}, 403, "forbidden_origin"),
            ({"host": here}, 415, "unsupported_media_type"),
        ]
        for path, body in VERBS:
            for headers, status, code in attacks:
                r = await client.post(
                    ep.status_url + path,
                    content=json.dumps(body).encode(),
                    headers={"content-type": "text/plain;charset=UTF-8", **headers},
                )
                assert (r.status_code, r.json()["error"]) == (status, code), (path, headers)
                assert not any(k.startswith("access-control-") for k in r.headers)
            # with the JSON content type the page may send after a (refused) preflight
            r = await client.post(
                ep.status_url + path, json=body, headers={"host": here, "origin": ATTACKER}
            )
            assert (r.status_code, r.json()["error"]) == (403, "forbidden_origin"), path
        assert await owner(client, ep) == before  # still a, and no swap happened
        assert "forbidden_host" not in (await client.get(ep.status_url + "/")).text


async def test_a_rebinding_page_cannot_read_status() -> None:
    async with two_backends() as (ep, client):
        for path in ("/", "/health", "/metrics", "/api/status", "/api/workers", "/events"):
            r = await client.get(
                ep.status_url + path, headers={"host": "attacker.example:5102", "origin": ATTACKER}
            )
            assert r.status_code == 403, path
            assert r.json()["error"] == "forbidden_host"
            assert "allowedHosts" in r.json()["message"]


async def test_status_reads_stay_open_to_any_origin_with_a_good_host() -> None:
    async with two_backends() as (ep, client):
        for path in ("/", "/health", "/metrics", "/api/status", "/api/workers"):
            r = await client.get(ep.status_url + path, headers={"origin": ATTACKER})
            assert r.status_code == 200, path
            assert "access-control-allow-origin" not in r.headers
        for host in ("localhost", f"localhost:{port_of(ep.status_url)}", "dash.localhost"):
            r = await client.get(ep.status_url + "/", headers={"host": host})
            assert r.status_code == 200, host
        refused = await client.get(ep.status_url + "/", headers={"host": "gpu.lan"})
        assert refused.status_code == 403


async def test_cors_preflight_is_refused_and_grants_nothing() -> None:
    async with two_backends() as (ep, client):
        preflight = {
            "origin": ATTACKER,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        }
        for path in ("/api/swap", "/api/unload", "/api/workers/stop", "/"):
            r = await client.options(ep.status_url + path, headers=preflight)
            assert r.status_code == 403, path
            assert r.json()["error"] == "cors_refused"
            assert not any(k.startswith("access-control-") for k in r.headers), path
        rebound = await client.options(
            ep.status_url + "/api/swap", headers={**preflight, "host": "attacker.example"}
        )
        assert rebound.status_code == 403 and rebound.json()["error"] == "forbidden_host"


async def test_lower_case_bearer_scheme_is_accepted_and_only_the_header_counts() -> None:
    async with two_backends(adminToken="s3cret") as (ep, client):
        url = ep.status_url + "/api/swap"
        for scheme in ("bearer", "BEARER", "Bearer"):
            r = await client.post(
                url, json={"backend": "a"}, headers={"authorization": f"{scheme} s3cret"}
            )
            assert r.status_code == 200, (scheme, r.text)
        refused = [
            {"authorization": "bearer s3cre"},
            {"authorization": "basic s3cret"},
            {"authorization": "bearers3cret"},
            {"x-forwarded-for": "127.0.0.1"},
        ]
        for headers in refused:
            r = await client.post(url, json={"backend": "b"}, headers=headers)
            assert r.status_code == 401, headers
        r = await client.post(url + "?token=s3cret", json={"backend": "b"})
        assert r.status_code == 401
        assert await owner(client, ep) == ("a", 1)


async def test_allowed_hosts_lets_a_configured_name_in() -> None:
    async with two_backends(allowedHosts=["GPU.lan", "*.corp.example"]) as (ep, client):
        port = port_of(ep.status_url)
        for host in ("gpu.lan", f"gpu.lan:{port}", "box.corp.example", f"GPU.LAN.:{port}"):
            r = await client.get(ep.status_url + "/", headers={"host": host})
            assert r.status_code == 200, host
        for host in ("other.lan", "corp.example", "gpu.lan.evil.example", "10.1.2.3"):
            r = await client.get(ep.status_url + "/", headers={"host": host})
            assert (r.status_code, r.json()["error"]) == (403, "forbidden_host"), host
        # a page served under that name on this very port is this port's own origin
        same = {"host": f"gpu.lan:{port}", "origin": f"http://gpu.lan:{port}"}
        r = await client.post(ep.status_url + "/api/swap", json={"backend": "b"}, headers=same)
        assert r.status_code == 200 and r.json()["owner"] == "b"
        other_port = {"host": f"gpu.lan:{port}", "origin": "http://gpu.lan:8188"}
        r = await client.post(ep.status_url + "/api/unload", json={}, headers=other_port)
        assert r.status_code == 403
        assert await owner(client, ep) == ("b", 1)


async def test_malformed_or_repeated_host_is_a_bad_request() -> None:
    async with two_backends() as (ep, _):
        port = port_of(ep.status_url)
        for host in (
            b"Host: 127.0.0.1\r\nHost: attacker.example\r\n",
            b"Host: attacker.example/x\r\n",
            b"Host: 127.0.0.1:99999\r\n",
        ):
            answer = await raw(port, b"GET / HTTP/1.1\r\n" + host)
            assert answer.startswith(b"HTTP/1.1 400"), (host, answer[:200])
        good = await raw(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert good.startswith(b"HTTP/1.1 200"), good[:200]


async def test_the_cli_still_drives_the_broker() -> None:
    async with two_backends() as (ep, client):
        base = ep.status_url

        async def cli(*args: str) -> Any:
            return await anyio.to_thread.run_sync(lambda: runner.invoke(cli_app, list(args)))

        swapped = await cli("swap", "a", "--url", base)
        assert swapped.exit_code == 0, swapped.output
        assert await owner(client, ep) == ("a", 1)
        unloaded = await cli("unload", "a", "--url", base)
        assert unloaded.exit_code == 0, unloaded.output
        assert (await owner(client, ep))[0] is None
        # a verb without a body still goes as JSON, which is all the port accepts now
        again = await anyio.to_thread.run_sync(lambda: call("POST", base, "/api/unload"))
        assert again["ok"] is True
        bare = await client.post(base + "/api/unload")
        assert (bare.status_code, bare.json()["error"]) == (415, "unsupported_media_type")


async def test_a_guarded_websocket_refuses_foreign_hosts_and_origins(loopback: Any) -> None:
    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        await ws.send_text("hello")
        await ws.close()

    app = ListenerGuard(Starlette(routes=[WebSocketRoute("/ws", echo)]), HostPolicy("127.0.0.1"))
    with anyio.fail_after(20):
        async with loopback(app) as listener:
            url = f"ws://127.0.0.1:{listener.port}/ws"
            async with connect(url) as ws:  # no Origin: a script
                assert await ws.recv() == "hello"
            async with connect(url, origin=f"http://127.0.0.1:{listener.port}") as ws:
                assert await ws.recv() == "hello"
            handshake = (
                b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            )
            for extra in (
                f"Host: 127.0.0.1:{listener.port}\r\nOrigin: {ATTACKER}\r\n",
                "Host: attacker.example\r\n",
            ):
                answer = await raw(listener.port, handshake + extra.encode())
                assert answer.startswith(b"HTTP/1.1 403"), (extra, answer[:200])


def test_host_policy_beyond_loopback_accepts_this_machine_and_ip_literals() -> None:
    wide = HostPolicy("0.0.0.0", hostname="GpuBox")
    narrow = HostPolicy("127.0.0.1", hostname="GpuBox")
    mine = socket.gethostname().lower()
    assert HostPolicy("::").allows(mine) and not HostPolicy("::1").allows(mine)
    for name in ("gpubox", "gpubox.local", "192.168.1.5", "2001:db8::1", "localhost", "::1"):
        assert wide.allows(name), name
    for name in ("attacker.example", "gpubox.attacker.example", "local"):
        assert not wide.allows(name), name
    for name in ("gpubox", "192.168.1.5", "attacker.example", "0.0.0.0"):
        assert not narrow.allows(name), name
    assert HostPolicy("192.168.1.5").allows("192.168.1.5")
    assert not narrow.same_origin("http://gpubox:5102", ("127.0.0.1", 5102), 5102)
    assert wide.same_origin("http://gpubox:5102", ("127.0.0.1", 5102), 5102)
    # an IP literal is this listener's origin only as the very address the request went to
    assert wide.same_origin("http://10.0.0.5:5102", ("10.0.0.5", 5102), 5102)
    assert not wide.same_origin("http://10.0.0.6:5102", ("10.0.0.5", 5102), 5102)
    # behind a TLS proxy: no port in Host, the scheme's default in Origin
    assert wide.same_origin("https://gpubox", ("gpubox", None), 5102)
    assert not wide.same_origin("https://gpubox:8443", ("gpubox", None), 5102)
    for origin in ("null", "file://", "http://u@gpubox:5102", "chrome-extension://abc"):
        assert not wide.same_origin(origin, ("gpubox", 5102), 5102), origin


def test_host_parsing_and_allowed_hosts_entries() -> None:
    assert split_host("LocalHost.:5102") == ("localhost", 5102)
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("[::1]") == ("::1", None)
    for bad in ("a b", "x/y", "[::1", "[nothost]:1", "h:0", "h:abc", ":80", "a@b"):
        assert split_host(bad) is None, bad
    assert allowed_host_entry(" GPU.Lan ") == "gpu.lan"
    assert allowed_host_entry("*.Lan") == "*.lan"
    for bad in ("http://gpu.lan", "gpu.lan:5102", "gpu.lan/x", "*", ""):
        with pytest.raises(ValueError, match="no scheme, port or path"):
            allowed_host_entry(bad)
