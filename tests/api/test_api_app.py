"""The api app over fake backends: what each key may see and use (aliases included), what
reaches the backend (the caller, no API key), ``/proxy/`` and the app's own answers."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gpubroker.api.app import ApiApp
from gpubroker.api.catalogue import Catalogue
from gpubroker.api.keys import ApiKeys
from gpubroker.testing import make_config

pytestmark = pytest.mark.anyio

ALL_KEY = "all-key-0123456789abcdef"
LIMITED_KEY = "limited-key-0123456789abcdef"


class FakeProxy:
    """A backend's proxy app that records what it is handed and answers 200."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def http(self, scope: Any, receive: Any, send: Any, **kw: Any) -> None:
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        self.seen.append({"scope": scope, "body": body, **kw})
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("HTTP must go through .http(caller=)")


class Residency:
    def state(self, backend: str) -> Any:
        return None


def _app(keys: bool = True) -> tuple[ApiApp, FakeProxy]:
    backend = {
        "upstream": "http://127.0.0.1:9",
        "unloadStrategy": "generic",
        "models": [
            {"name": "whisper-1", "upstreamModel": "large-v3", "aliases": ["whisper"]},
            {"name": "other-model"},
        ],
    }
    api_keys = [
        {"name": "all", "key": ALL_KEY},
        {"name": "limited", "key": LIMITED_KEY, "models": ["whisper-1"]},
    ]
    cfg = make_config({"gen": backend}, apiPort=20100, **({"apiKeys": api_keys} if keys else {}))
    client = httpx.AsyncClient()
    catalogue = Catalogue(
        cfg.backends, client=client, refresh_every=60, residency=Residency(), costs={}
    )
    proxy = FakeProxy()
    app = ApiApp(
        {"gen": proxy},  # type: ignore[dict-item]
        catalogue,
        ApiKeys(cfg.api_keys),
        body_limit=1 << 20,
        client=client,
    )
    return app, proxy


def _client(app: ApiApp, key: str | None = None) -> httpx.AsyncClient:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", headers=headers)


async def test_proxy_passes_the_caller_and_refuses_a_limited_key() -> None:
    app, proxy = _app()
    async with _client(app, ALL_KEY) as c:
        r = await c.get("/proxy/gen/health")
        assert r.status_code == 200 and r.headers["x-gpubroker-backend"] == "gen"
    assert proxy.seen[0]["caller"] == "all" and proxy.seen[0]["scope"]["path"] == "/health"
    async with _client(app, LIMITED_KEY) as c:
        r = await c.get("/proxy/gen/health")
        assert r.status_code == 403 and r.json()["error"] == "forbidden"
    async with _client(app) as c:
        r = await c.get("/proxy/gen/health")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert len(proxy.seen) == 1


async def test_proxy_with_an_encoded_slash_in_the_name_is_an_unknown_backend() -> None:
    app, proxy = _app(keys=False)
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/proxy/gen/x",
        "raw_path": b"/proxy/gen%2Fx",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 404 and not proxy.seen


async def test_a_limited_key_may_use_its_models_aliases_and_hears_of_no_other() -> None:
    app, proxy = _app()
    async with _client(app, LIMITED_KEY) as c:
        r = await c.post("/v1/chat/completions", json={"model": "whisper"})  # an alias
        assert r.status_code == 200
        r = await c.post("/v1/chat/completions", json={"model": "other-model"})
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["code"] == "model_forbidden" and err["param"] == "model"
        ids = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
        assert ids == {"whisper-1", "whisper"}
        assert (await c.get("/v1/models/other-model")).status_code == 404
        assert (await c.get("/v1/models/whisper")).status_code == 200
        r = await c.post("/v1/chat/completions", json={"model": "other-mode"})
        assert r.status_code == 404 and "other-model" not in r.json()["error"]["message"]
    async with _client(app, ALL_KEY) as c:
        ids = {m["id"] for m in (await c.get("/v1/models")).json()["data"]}
        assert ids == {"whisper-1", "whisper", "other-model"}
    assert proxy.seen[0]["scope"]["headers"]  # what reached the backend
    assert proxy.seen[0]["caller"] == "limited"


async def test_the_api_key_does_not_reach_the_backend() -> None:
    app, proxy = _app()
    async with _client(app, ALL_KEY) as c:
        await c.post("/v1/chat/completions", json={"model": "other-model"})
        await c.get("/proxy/gen/v1/models")
    assert len(proxy.seen) == 2
    for seen in proxy.seen:
        names = {k for k, _ in seen["scope"]["headers"]}
        assert b"authorization" not in names and b"host" in names


async def test_without_keys_the_authorization_header_passes() -> None:
    app, proxy = _app(keys=False)
    async with _client(app, "upstream-own-key") as c:
        await c.post("/v1/chat/completions", json={"model": "other-model"})
    assert (b"authorization", b"Bearer upstream-own-key") in proxy.seen[0]["scope"]["headers"]


async def test_head_sends_no_body_and_lifespan_has_no_path() -> None:
    app, _ = _app(keys=False)
    async with _client(app) as c:
        r = await c.head("/v1/models")
        assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 0
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan"}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def test_an_alias_is_renamed_in_place_leaving_every_other_byte() -> None:
    app, proxy = _app(keys=False)
    raw = b'{ "z": 1e400, "a" : [1.0, 2.50],\n "model" : "whisper", "dup": 1, "dup": 2 }'
    async with _client(app) as c:
        r = await c.post("/v1/chat/completions", content=raw)
        assert r.status_code == 200
    assert proxy.seen[0]["body"] == raw.replace(b'"whisper"', b'"large-v3"')
    lengths = [v for k, v in proxy.seen[0]["scope"]["headers"] if k == b"content-length"]
    assert lengths == [b"%d" % (len(raw) + 1)]
