"""The api port's own answers: errors in each protocol's shape, the body bound, aliases,
discovery with a backend down, and ``/proxy/{backend}/`` (WebSockets too)."""

from __future__ import annotations

import contextlib
import json

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from gpubroker.sim import ComfyUIEmulator, GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.testing import broker_running, make_config
from processes import free_port

pytestmark = pytest.mark.anyio

LLAMA = "llama3.2:latest"


async def test_errors_come_in_each_protocols_shape() -> None:
    gpu = SimGPU(8 * GiB)
    emu = OllamaEmulator(gpu, {LLAMA: 2 * GiB})
    async with running(emu.app) as o:
        cfg = make_config({"ollama": {"upstream": o, "unloadStrategy": "ollama"}}, apiPort=20100)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            api = ep.api_url
            r = await client.post(f"{api}/v1/chat/completions", json={"model": "llama3.3"})
            assert r.status_code == 404
            err = r.json()["error"]
            assert err["code"] == "model_not_found" and err["param"] == "model"
            assert err["type"] == "invalid_request_error" and "llama3.2" in err["message"]
            r = await client.post(f"{api}/api/generate", json={"model": "nope", "prompt": "x"})
            assert r.status_code == 404 and isinstance(r.json()["error"], str)
            r = await client.post(f"{api}/v1/chat/completions", json={"messages": []})
            assert r.status_code == 400 and "model" in r.json()["error"]["message"]
            r = await client.post(f"{api}/v1/embeddings", content=b"{not json")
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
            r = await client.post(f"{api}/api/chat", content=b"[1]")
            assert r.status_code == 400 and "JSON object" in r.json()["error"]
            r = await client.get(f"{api}/v1/chat/completions")
            assert r.status_code == 405
            r = await client.get(f"{api}/v1/nothing")
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_path"
            r = await client.get(f"{api}/v1/models/nope")
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            status = (await client.get(ep.status_url + "/")).json()
            assert status["totals"]["inFlight"] == 0 and status["queueLength"] == 0


async def test_an_oversized_body_is_413_in_the_protocols_shape() -> None:
    gpu = SimGPU(8 * GiB)
    emu = OllamaEmulator(gpu, {LLAMA: 2 * GiB})
    async with running(emu.app) as o:
        cfg = make_config(
            {"ollama": {"upstream": o, "unloadStrategy": "ollama"}},
            apiPort=20100,
            apiBodyLimit="1KiB",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            big = {"model": LLAMA, "prompt": "x" * 4096}
            r = await client.post(f"{ep.api_url}/v1/completions", json=big)
            assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
            r = await client.post(f"{ep.api_url}/api/generate", json=big)
            assert r.status_code == 413 and "apiBodyLimit" in r.json()["error"]
            small = {"model": LLAMA, "prompt": "hi", "stream": False}
            r = await client.post(f"{ep.api_url}/api/generate", json=small)
            assert r.status_code == 200  # the connection and the lease were not left behind


async def test_an_alias_is_rewritten_to_the_upstream_name() -> None:
    gpu = SimGPU(8 * GiB)
    emu = OllamaEmulator(gpu, {LLAMA: 2 * GiB})
    async with running(emu.app) as o:
        models = [{"name": "fast", "aliases": ["quick"], "upstreamModel": LLAMA}]
        ollama = {"upstream": o, "unloadStrategy": "ollama", "models": models}
        cfg = make_config({"ollama": ollama}, apiPort=20100)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            body = {"model": "quick", "prompt": "hi", "stream": False}
            r = await client.post(f"{ep.api_url}/api/generate", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == LLAMA  # what the upstream was asked for
            assert r.headers["x-gpubroker-backend"] == "ollama"
            listed = (await client.get(f"{ep.api_url}/v1/models")).json()["data"]
            assert {m["id"] for m in listed} == {"fast", "quick"}
            assert next(m for m in listed if m["id"] == "quick")["gpubroker"]["aliasOf"] == "fast"


async def test_a_backend_down_keeps_its_last_known_models_and_says_so() -> None:
    gpu = SimGPU(16 * GiB)
    emu_o = OllamaEmulator(gpu, {LLAMA: 2 * GiB})
    emu_v = VLLMEmulator(gpu, "qwen", weights=2 * GiB, kv_cache=1 * GiB)
    never = f"http://127.0.0.1:{free_port()}"  # nothing listens: down from the start
    async with running(emu_o.app) as o, contextlib.AsyncExitStack() as vllm:
        v = await vllm.enter_async_context(running(emu_v.app))
        cfg = make_config(
            {
                "ollama": {"upstream": o, "unloadStrategy": "ollama"},
                "vllm": {"upstream": v, "unloadStrategy": "vllm"},
                "gone": {"upstream": never},
            },
            apiPort=20100,
            modelRefresh="100ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            listed = (await client.get(f"{ep.api_url}/v1/models")).json()["data"]
            assert {m["id"]: m["owned_by"] for m in listed} == {
                LLAMA: "ollama",
                "llama3.2": "ollama",  # Ollama reads a name without a tag as :latest
                "qwen": "vllm",
            }
            assert all(m["gpubroker"]["reachable"] for m in listed)
            await vllm.aclose()  # vLLM goes away
            with anyio.fail_after(5):
                while True:
                    await anyio.sleep(0.1)
                    listed = (await client.get(f"{ep.api_url}/v1/models")).json()["data"]
                    qwen = next(m for m in listed if m["id"] == "qwen")  # still listed
                    if qwen["gpubroker"]["reachable"] is False:
                        break
            r = await client.post(f"{ep.api_url}/v1/completions", json={"model": "qwen"})
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
            assert r.headers["x-gpubroker-backend"] == "vllm"


async def test_proxy_by_name_forwards_anything_including_websockets() -> None:
    gpu = SimGPU(8 * GiB)
    comfy = ComfyUIEmulator(gpu, model_size=2 * GiB, job_seconds=0.05)
    async with running(comfy.app) as c:
        cfg = make_config({"comfyui": {"upstream": c, "unloadStrategy": "comfyui"}}, apiPort=20100)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert ep.api_url is not None
            r = await client.get(f"{ep.api_url}/proxy/comfyui/system_stats")
            assert r.status_code == 200 and r.headers["x-gpubroker-backend"] == "comfyui"
            assert r.json() == (await client.get(c + "/system_stats")).json()
            r = await client.get(f"{ep.api_url}/proxy/nobody/x")
            assert r.status_code == 404 and r.json()["error"] == "unknown_backend"
            ws_url = ep.api_url.replace("http://", "ws://") + "/proxy/comfyui/ws?clientId=abc"
            with anyio.fail_after(10):
                async with connect(ws_url) as ws:
                    first = json.loads(await ws.recv())
                    assert first["type"] == "status"
