"""ComfyUI behind the broker as real ComfyUI behaves (each behaviour pinned in sim/comfyui.py).

The defects found with a real ComfyUI each have a test here: the web UI through the broker
(Host kept, so ComfyUI's Host/Origin check passes), swaps away from a CPU ComfyUI, its queue
counted as in-flight work (hold, maxConcurrency, status, metrics), a hold that cannot outlast
the queue timeout, and OneGPU4All's status shapes.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from browser import CHROMIUM, chromium_page
from gpubroker.config.load import describe_config
from gpubroker.errors import ConfigError
from gpubroker.runtime import Endpoints
from gpubroker.sim import ComfyUIEmulator, GenericEmulator, GiB, OllamaEmulator, SimGPU, running
from gpubroker.sim.comfyui import origin_refused
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

MODEL = "llama3.2:latest"
MODEL_FREE = {  # EmptyImage -> SaveImage: nothing to load, runs on any device
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t", "images": ["1", 0]}},
}


@asynccontextmanager
async def comfy_and_ollama(
    comfy: ComfyUIEmulator, gpu: SimGPU, comfy_extra: dict[str, Any] | None = None, **top: Any
) -> AsyncIterator[tuple[Endpoints, httpx.AsyncClient, str]]:
    """A broker in front of ``comfy`` and an Ollama emulator; yields endpoints, a client, and
    ComfyUI's own URL."""
    ollama = OllamaEmulator(gpu, {MODEL: 6 * GiB})
    async with running(comfy.app) as c, running(ollama.app) as o:
        cfg = make_config(
            {
                "comfyui": {"upstream": c, "unloadStrategy": "comfyui", **(comfy_extra or {})},
                "ollama": {"upstream": o, "unloadStrategy": "ollama"},
            },
            **top,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=20) as client:
            yield ep, client, c


async def generate(client: httpx.AsyncClient, base: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    return await client.post(base + "/api/generate", json=body)


async def queue_prompt(client: httpx.AsyncClient, base: str, **extra: Any) -> httpx.Response:
    return await client.post(base + "/prompt", json={"prompt": MODEL_FREE, **extra})


async def until_done(client: httpx.AsyncClient, base: str, prompt_id: str) -> dict[str, Any]:
    with anyio.fail_after(10):
        while not (entry := (await client.get(f"{base}/history/{prompt_id}")).json()):
            await anyio.sleep(0.02)
    return dict(entry[prompt_id])


# --- the web UI: ComfyUI's Host/Origin check ------------------------------------------------


def test_the_emulator_refuses_exactly_what_comfyuis_origin_check_refuses() -> None:
    # server.py create_origin_only_middleware, case by case
    assert origin_refused("127.0.0.1:8188", "http://127.0.0.1:5002")  # ports differ
    assert origin_refused("localhost:8188", "http://attacker.example")
    assert not origin_refused("127.0.0.1:5002", "http://127.0.0.1:5002")
    assert not origin_refused("127.0.0.1:8188", "http://127.0.0.1")  # no port: names only
    assert not origin_refused("comfy.lan:8188", "http://elsewhere.example")  # not loopback
    assert not origin_refused("127.0.0.1:8188", None) and not origin_refused(None, "http://x")
    assert origin_refused("[::1]:8188", "http://[::1]:5002")


async def test_a_browsers_origin_passes_through_the_broker_to_comfyui() -> None:
    gpu = SimGPU(16 * GiB)
    comfy = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=0.05)
    async with comfy_and_ollama(comfy, gpu) as (ep, client, direct):
        base = ep.proxies["comfyui"]
        origin = {"Origin": base}  # what a page loaded from the broker's port sends
        page = await client.get(base + "/", headers=origin)
        asset = await client.get(base + "/assets/index-emulator.js", headers=origin)
        queued = await queue_prompt(client, base, client_id="ui")
        api = await client.post(base + "/api/prompt", json={"prompt": MODEL_FREE}, headers=origin)
        ws_url = base.replace("http://", "ws://") + "/ws?clientId=ui"
        with anyio.fail_after(10):
            async with connect(ws_url, additional_headers=origin, proxy=None) as ws:
                first = await ws.recv()
        # The same Origin sent to ComfyUI's own port is refused, as real ComfyUI does:
        # the emulator would have caught a proxy that rewrites Host.
        direct_asset = await client.get(direct + "/assets/index-emulator.js", headers=origin)
    assert page.status_code == 200 and "index-emulator.js" in page.text
    assert asset.status_code == 200 and queued.status_code == 200 and api.status_code == 200
    assert json.loads(first)["data"]["sid"] == "ui"
    assert direct_asset.status_code == 403 and direct_asset.content == b""
    assert comfy.origin_refusals == 1


async def test_rewriting_host_is_what_breaks_the_ui_and_the_opt_in_still_does_it() -> None:
    gpu = SimGPU(16 * GiB)
    comfy = ComfyUIEmulator(gpu, 2 * GiB)
    async with comfy_and_ollama(comfy, gpu, {"hostHeader": "upstream"}) as (ep, client, _):
        base = ep.proxies["comfyui"]
        asset = await client.get(base + "/assets/index-emulator.js", headers={"Origin": base})
        ws_url = base.replace("http://", "ws://") + "/ws"
        with anyio.fail_after(10), pytest.raises(Exception) as refused:
            async with connect(ws_url, additional_headers={"Origin": base}, proxy=None):
                pass
    assert asset.status_code == 403  # the blank page users saw
    assert isinstance(refused.value, InvalidStatus) or "1008" in str(refused.value)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
async def test_the_web_ui_loads_and_queues_a_workflow_in_a_real_browser() -> None:
    gpu = SimGPU(16 * GiB)
    comfy = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=0.05)
    async with comfy_and_ollama(comfy, gpu) as (ep, client, _):
        async with chromium_page(ep.proxies["comfyui"] + "/?queue=1") as page:
            state = await page.wait_for(
                "(e => e && e.dataset.state && e.dataset.state.startsWith('done') && "
                "e.dataset.state)(document.getElementById('vue-app'))"
            )
            last = await page.evaluate("document.getElementById('vue-app')?.dataset.state")
            responses, sockets = page.responses, page.websockets
        status = (await client.get(ep.status_url + "/")).json()
    assert state, f"the page never finished queueing (last state {last!r}, saw {responses})"
    refused = [(code, url) for code, url in responses if code == 403]
    assert refused == [] and comfy.origin_refusals == 0
    assert any(code == 101 for code, _ in sockets)  # the /ws socket opened
    assert status["gpuRequests"]["comfyui"] == 1  # the page's prompt took the lease


# --- swaps away from a ComfyUI that does not report VRAM -------------------------------------


@pytest.mark.parametrize("device", ["cpu", "mps", "privateuseone"])
async def test_a_swap_away_from_a_comfyui_without_vram_readings_does_not_wait_out_the_timeout(
    device: str,
) -> None:
    gpu = SimGPU(16 * GiB)
    comfy = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=0.05, device_type=device)
    async with comfy_and_ollama(comfy, gpu, unloadTimeout="5s") as (ep, client, _):
        first = await queue_prompt(client, ep.proxies["comfyui"])
        await until_done(client, ep.proxies["comfyui"], first.json()["prompt_id"])
        g = await generate(client, ep.proxies["ollama"])
        unload = await client.post(
            ep.status_url + "/api/swap", json={"backend": "comfyui"}
        )  # and back, then free it by hand as `gpubroker unload comfyui` does
        freed = await client.post(ep.status_url + "/api/unload", json={"backend": "comfyui"})
        status = (await client.get(ep.status_url + "/")).json()
    assert g.status_code == 200 and "evicted=comfyui" in g.headers["x-gpubroker-swap"]
    assert unload.status_code == 200 and freed.json()["ok"] is True
    swaps = status["swaps"]
    assert all(not s["failures"] for s in swaps)
    assert all(s["unloadMs"] < 2500 for s in swaps), swaps  # not the 5 s unloadTimeout


# --- ComfyUI's queue is in-flight work ---------------------------------------------------------


async def test_jobs_in_comfyuis_queue_show_as_in_flight_in_status_and_metrics() -> None:
    gpu = SimGPU(16 * GiB)
    comfy = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=1.0)
    async with comfy_and_ollama(comfy, gpu) as (ep, client, _):
        r = await queue_prompt(client, ep.proxies["comfyui"])
        pid = r.json()["prompt_id"]
        with anyio.fail_after(5):  # the lease ends once the job is seen in ComfyUI's queue
            while True:
                s = (await client.get(ep.status_url + "/")).json()
                if any(r["kind"] == "job" for r in s["liveRequests"]):
                    break
                await anyio.sleep(0.02)
        metrics = (await client.get(ep.status_url + "/metrics")).text
        await until_done(client, ep.proxies["comfyui"], pid)
        with anyio.fail_after(5):
            while (after := (await client.get(ep.status_url + "/")).json())["totals"]["inFlight"]:
                await anyio.sleep(0.02)
    job = s["liveRequests"][0]
    assert job["kind"] == "job" and job["id"] == pid and job["backend"] == "comfyui"
    assert job["state"] in ("running", "pending") and job["url"] == "/prompt"
    assert dt.datetime.fromisoformat(job["startedAt"].replace("Z", "+00:00"))
    assert s["activeRequests"]["comfyui"] == 1 and s["totals"]["jobs"] == 1
    assert s["backends"]["comfyui"]["jobs"][0]["id"] == pid
    assert 'gpubroker_service_jobs{backend="comfyui"} 1.0' in metrics
    assert after["liveRequests"] == [] and after["activeRequests"]["comfyui"] == 0


async def test_a_prompt_inside_the_hold_joins_comfyuis_running_work_without_a_swap() -> None:
    gpu = SimGPU(10 * GiB)  # ComfyUI's 6 GiB and Ollama's 6 GiB never fit together
    comfy = ComfyUIEmulator(gpu, 6 * GiB, job_seconds=1.0, load_seconds=0.05)
    workflow = {  # a checkpoint, so a reload would show in comfy.loads
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "x"}},
        "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t", "images": ["1", 0]}},
    }
    async with comfy_and_ollama(comfy, gpu, holdTime="5s") as (ep, client, _):
        base = ep.proxies["comfyui"]
        first = await client.post(base + "/prompt", json={"prompt": workflow})
        results: dict[str, httpx.Response] = {}

        async def chat() -> None:
            results["ollama"] = await generate(client, ep.proxies["ollama"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(chat)
            with anyio.fail_after(5):  # Ollama is queued behind ComfyUI's running job
                while not (await client.get(ep.status_url + "/")).json()["queueLength"]:
                    await anyio.sleep(0.02)
            await anyio.sleep(0.3)  # well inside holdTime
            second = await client.post(base + "/prompt", json={"prompt": workflow})
            done = await until_done(client, base, second.json()["prompt_id"])
        first_done = await until_done(client, base, first.json()["prompt_id"])
    assert second.status_code == 200
    assert int(second.headers["x-gpubroker-queue-ms"]) < 500  # admitted inside the hold
    assert "x-gpubroker-swap" not in second.headers
    assert done["status"]["completed"] and first_done["status"]["completed"]
    assert comfy.loads == 1  # both jobs ran on one load: no swap cycle between them
    assert "evicted=comfyui" in results["ollama"].headers["x-gpubroker-swap"]
    assert gpu.oom_count == 0


async def test_max_concurrency_holds_back_prompts_while_comfyui_has_one_queued() -> None:
    gpu = SimGPU(16 * GiB)
    comfy = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=0.3)
    async with comfy_and_ollama(comfy, gpu, {"maxConcurrency": 1}) as (ep, client, direct):
        peak = 0
        stop = anyio.Event()

        async def watch_comfy_queue() -> None:  # ComfyUI's own view, not the broker's
            nonlocal peak
            async with httpx.AsyncClient(base_url=direct) as own:
                while not stop.is_set():
                    q = (await own.get("/queue")).json()
                    peak = max(peak, len(q["queue_running"]) + len(q["queue_pending"]))
                    await anyio.sleep(0.01)

        replies: list[httpx.Response] = []

        async def submit() -> None:
            replies.append(await queue_prompt(client, ep.proxies["comfyui"]))

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_comfy_queue)
                async with anyio.create_task_group() as clients:
                    for _ in range(3):
                        clients.start_soon(submit)
                for r in replies:
                    await until_done(client, ep.proxies["comfyui"], r.json()["prompt_id"])
                stop.set()
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert peak == 1  # never two prompts in ComfyUI's queue under maxConcurrency: 1


# --- no starvation by configuration --------------------------------------------------------


def test_a_hold_as_long_as_the_queue_timeout_is_refused_and_the_default_is_capped() -> None:
    # the capped hold end to end: test_broker_e2e's steady-owner-traffic test
    backends = {"a": {"upstream": "http://127.0.0.1:9"}}
    with pytest.raises(ConfigError) as refused:
        make_config(backends, queueTimeout="3s", holdTime="10s")
    assert refused.value.keypath == "holdTime" and "queueTimeout" in str(refused.value)
    capped = make_config(backends, queueTimeout="3s")  # holdTime left at its 10 s default
    assert capped.effective_hold_time == 1.5
    assert "capped at 1.5s" in describe_config(capped)


# --- OneGPU4All's status contract ----------------------------------------------------------


async def test_status_keeps_onegpu4alls_shapes_for_its_live_monitor() -> None:
    gpu = SimGPU(16 * GiB)
    a = GenericEmulator(gpu, 2 * GiB, owner="a", token_interval=0.05, tokens=30)
    async with running(a.app) as ua:
        cfg = make_config({"a": {"upstream": ua}, "b": {"upstream": ua}})
        async with (
            broker_running(cfg) as ep,
            httpx.AsyncClient(timeout=10) as client,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(partial(client.post, ep.proxies["a"] + "/generate?x=1", json={}))
            with anyio.fail_after(5):
                while not (s := (await client.get(ep.status_url + "/")).json())["liveRequests"]:
                    await anyio.sleep(0.01)
            await client.get(ep.proxies["b"] + "/health")
            after = (await client.get(ep.status_url + "/")).json()
    # onegpu4all-status reads Object.keys(activeRequests), gpuRequests[name],
    # passthroughRequests[name], and each live request's method, url and startedAt.
    assert s["activeRequests"] == {"a": 1, "b": 0}
    assert s["gpuRequests"] == {"a": 1, "b": 0}
    assert after["passthroughRequests"] == {"a": 0, "b": 1}
    live = s["liveRequests"][0]
    # the path without its query, as OneGPU4All's proxy records req.url.split("?")[0]
    assert live["method"] == "POST" and live["url"] == "/generate" and live["backend"] == "a"
    assert dt.datetime.fromisoformat(live["startedAt"].replace("Z", "+00:00"))
    assert isinstance(s["uptime"], int)
    assert isinstance(s["queueLength"], int) and isinstance(s["queuedBackends"], list)
    assert s["totals"]["inFlight"] == 1 and s["totals"]["gpuRequests"] == 1


async def test_jobs_of_a_comfyui_that_went_away_stop_holding_the_gpu() -> None:
    """A queue nobody can read any more is counted as empty after unloadTimeout: its jobs died
    with the service and must not keep the backend busy (or the other backend waiting)."""
    gpu = SimGPU(16 * GiB)
    comfy = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=30.0)
    async with AsyncExitStack() as service:
        c = await service.enter_async_context(running(comfy.app))
        cfg = make_config({"comfyui": {"upstream": c, "unloadStrategy": "comfyui"}},
                          unloadTimeout="1s", telemetry="none")  # fmt: skip
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            await queue_prompt(client, ep.proxies["comfyui"])
            with anyio.fail_after(5):
                while not (await client.get(ep.status_url + "/")).json()["totals"]["jobs"]:
                    await anyio.sleep(0.02)
            await service.aclose()  # ComfyUI stops with its job in the queue
            with anyio.fail_after(10):
                while (s := (await client.get(ep.status_url + "/")).json())["totals"]["jobs"]:
                    await anyio.sleep(0.05)
    assert s["activeRequests"] == {"comfyui": 0} and s["liveRequests"] == []
