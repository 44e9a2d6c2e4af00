"""``apiKeys`` on the api port: every route needs a key, a key may be limited to some models,
and what a request did is shown under the key's name, never the key."""

from __future__ import annotations

import httpx
import openai
import pytest
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gpubroker.sim import GiB, OllamaEmulator, SimGPU, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

LLAMA = "llama3.2:latest"
QWEN = "qwen2.5:0.5b"
CI_KEY = "ci-key-0123456789abcdef"
NIGHTLY_KEY = "nightly-key-0123456789abcdef"


async def test_keys_open_the_port_limit_models_and_name_the_caller() -> None:
    gpu = SimGPU(8 * GiB)
    emu = OllamaEmulator(gpu, {LLAMA: 2 * GiB, QWEN: 1 * GiB})
    async with running(emu.app) as o:
        keys = [
            {"name": "ci", "key": CI_KEY},
            {"name": "nightly", "key": NIGHTLY_KEY, "models": [QWEN]},
        ]
        cfg = make_config(
            {"ollama": {"upstream": o, "unloadStrategy": "ollama"}}, apiPort=20100, apiKeys=keys
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            api = ep.api_url
            chat = {"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]}
            r = await client.post(f"{api}/v1/chat/completions", json=chat)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"].lower().startswith("bearer")
            wrong = {"authorization": "Bearer not-a-key-at-all-000000"}
            r = await client.post(f"{api}/api/chat", json=chat, headers=wrong)
            assert r.status_code == 401 and isinstance(r.json()["error"], str)
            for path in ("/v1/models", "/api/tags", "/proxy/ollama/api/tags"):
                r = await client.get(api + path)
                assert r.status_code == 401, path
            with pytest.raises(InvalidStatus):  # a WebSocket through /proxy/ needs one too
                async with connect(api.replace("http", "ws") + "/proxy/ollama/ws"):
                    pass

            sdk = openai.AsyncOpenAI(base_url=f"{api}/v1", api_key=CI_KEY, max_retries=0)
            reply = await sdk.chat.completions.create(
                model=LLAMA, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
            limited = openai.AsyncOpenAI(base_url=f"{api}/v1", api_key=NIGHTLY_KEY, max_retries=0)
            with pytest.raises(openai.PermissionDeniedError):
                await limited.chat.completions.create(
                    model=LLAMA, messages=[{"role": "user", "content": "hi"}]
                )
            reply = await limited.chat.completions.create(
                model=QWEN, messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
            await sdk.close()
            await limited.close()

            metrics = (await client.get(ep.status_url + "/metrics")).text
            status = (await client.get(ep.status_url + "/")).text
    lines = [m for m in metrics.splitlines() if m.startswith("gpubroker_api_requests_total{")]
    assert any('caller="ci"' in m and f'model="{LLAMA}"' in m and m.endswith(" 1.0") for m in lines)
    assert any('caller="nightly"' in m and f'model="{QWEN}"' in m for m in lines)
    for text in (metrics, status):
        assert CI_KEY not in text and NIGHTLY_KEY not in text


async def test_web_pages_are_kept_off_the_api_port() -> None:
    gpu = SimGPU(8 * GiB)
    emu = OllamaEmulator(gpu, {LLAMA: 2 * GiB})
    async with running(emu.app) as o:
        cfg = make_config({"ollama": {"upstream": o, "unloadStrategy": "ollama"}}, apiPort=20100)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            chat = {"model": LLAMA, "messages": [{"role": "user", "content": "hi"}]}
            url = f"{ep.api_url}/v1/chat/completions"
            rebound = await client.post(url, json=chat, headers={"host": "attacker.example"})
            assert rebound.status_code == 403  # DNS rebinding: a name this port does not answer to
            page = {"origin": "https://attacker.example", "content-type": "text/plain"}
            r = await client.post(url, content=b'{"model": "llama3.2:latest"}', headers=page)
            assert r.status_code == 403  # a page's "simple request" starts no GPU work
            r = await client.options(
                url,
                headers={"origin": "https://x.example", "access-control-request-method": "POST"},
            )
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
            assert (await client.post(url, json=chat)).status_code == 200  # a script is served
            status = (await client.get(ep.status_url + "/")).json()
    assert status["gpuRequests"]["ollama"] == 1


async def test_the_api_key_never_reaches_the_backend() -> None:
    seen: list[list[tuple[bytes, bytes]]] = []

    async def service(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        seen.append(list(scope["headers"]))
        body = b'{"data": [0.5]}'
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async with running(service) as url:
        backend = {"upstream": url, "unloadStrategy": "generic", "models": ["embedder"]}
        keys = [{"name": "ci", "key": CI_KEY}]
        cfg = make_config({"embed": backend}, apiPort=20100, apiKeys=keys)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            auth = {"authorization": f"Bearer {CI_KEY}"}
            body = {"model": "embedder", "input": "x"}
            r = await client.post(f"{ep.api_url}/v1/embeddings", json=body, headers=auth)
            assert r.status_code == 200
            r = await client.get(f"{ep.api_url}/proxy/embed/anything", headers=auth)
            assert r.status_code == 200
    assert len(seen) >= 2  # the embedding and the /proxy/ GET (and any health probes)
    for headers in seen:
        assert all(k != b"authorization" for k, _ in headers)
        assert all(CI_KEY.encode() not in v for _, v in headers)
