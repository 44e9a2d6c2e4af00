"""ComfyUIEmulator over real HTTP and WebSocket (BACKENDS.md, section 2)."""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from gpubroker.sim import ComfyUIEmulator, GiB, SimGPU, running, simple_workflow

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def comfy(
    gpu: SimGPU | None = None, **kwargs: Any
) -> AsyncIterator[tuple[ComfyUIEmulator, httpx.AsyncClient]]:
    emu = ComfyUIEmulator(gpu or SimGPU(16 * GiB), 6 * GiB, **kwargs)
    with anyio.fail_after(10):
        async with running(emu.app) as url, httpx.AsyncClient(base_url=url, trust_env=False) as c:
            yield emu, c


@asynccontextmanager
async def websocket(client: httpx.AsyncClient, client_id: str) -> AsyncIterator[ClientConnection]:
    url = str(client.base_url).replace("http://", "ws://").rstrip("/")
    async with connect(f"{url}/ws?clientId={client_id}", proxy=None) as ws:
        yield ws


async def until(predicate: Callable[[], bool]) -> None:
    with anyio.fail_after(5):
        while not predicate():
            await anyio.sleep(0.005)


async def submit(client: httpx.AsyncClient, client_id: str = "tester", **extra: Any) -> str:
    reply = await client.post(
        "/prompt", json={"prompt": simple_workflow(), "client_id": client_id, **extra}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["node_errors"] == {}
    return body["prompt_id"]


async def history(client: httpx.AsyncClient, prompt_id: str) -> dict[str, Any]:
    return (await client.get(f"/history/{prompt_id}")).json()


async def wait_done(client: httpx.AsyncClient, prompt_id: str) -> dict[str, Any]:
    with anyio.fail_after(5):
        while not (entry := await history(client, prompt_id)):
            await anyio.sleep(0.01)
    return entry[prompt_id]


async def test_prompt_only_enqueues_and_queue_shows_it_running() -> None:
    async with comfy(job_seconds=0.3) as (emu, client):
        with anyio.fail_after(0.2):
            prompt_id = await submit(client)
        assert await history(client, prompt_id) == {}
        await until(lambda: emu.gpu.used > 0)  # the worker picked it up and loaded
        queue = (await client.get("/queue")).json()
        assert [item[1] for item in queue["queue_running"]] == [prompt_id]
        number, _id, prompt, extra, outputs = queue["queue_running"][0]
        assert prompt == simple_workflow() and extra["client_id"] == "tester"
        assert outputs == ["9"] and number == 0
        assert (await client.get("/prompt")).json() == {"exec_info": {"queue_remaining": 1}}
        entry = await wait_done(client, prompt_id)
        assert entry["status"]["status_str"] == "success"
        assert entry["status"]["completed"] is True
        assert entry["outputs"]["9"]["images"][0]["filename"].endswith(".png")
        assert (await client.get("/prompt")).json()["exec_info"]["queue_remaining"] == 0
        # The checkpoint stays resident after the job, as in ComfyUI.
        assert emu.gpu.held("comfyui") == 6 * GiB


async def test_jobs_run_one_at_a_time_in_order() -> None:
    async with comfy(job_seconds=0.1) as (_emu, client):
        first, second = await submit(client), await submit(client)
        queue = (await client.get("/api/queue")).json()  # mirrored under /api
        assert [i[1] for i in queue["queue_running"] + queue["queue_pending"]] == [first, second]
        assert (await client.get("/api/prompt")).json()["exec_info"]["queue_remaining"] == 2
        await wait_done(client, second)
        assert await history(client, first)


async def test_websocket_events_go_to_the_prompts_client_only() -> None:
    async with (
        comfy() as (_emu, client),
        websocket(client, "alice") as alice,
        websocket(client, "bob") as bob,
    ):
        hello = json.loads(await alice.recv())
        assert hello == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "alice"},
        }
        assert json.loads(await bob.recv())["data"]["sid"] == "bob"
        prompt_id = await submit(client, "alice")
        events: list[dict[str, Any]] = []
        previews: list[bytes] = []
        with anyio.fail_after(5):
            while True:
                frame = await alice.recv()
                if isinstance(frame, bytes):
                    previews.append(frame)
                    continue
                event = json.loads(frame)
                events.append(event)
                if event["type"] == "executing" and event["data"]["node"] is None:
                    break
        kinds = [e["type"] for e in events]
        for kind in ("execution_start", "executing", "progress", "executed", "execution_success"):
            assert kind in kinds
        assert kinds.index("execution_start") < kinds.index("execution_success")
        assert events[-1]["data"] == {"node": None, "prompt_id": prompt_id}
        progress = [e["data"] for e in events if e["type"] == "progress"]
        assert progress[-1]["value"] == progress[-1]["max"] == 4
        assert previews and struct.unpack(">II", previews[0][:8]) == (1, 2)
        # Bob only saw queue status broadcasts.
        with anyio.move_on_after(0.1):
            while True:
                assert json.loads(await bob.recv())["type"] == "status"
        # History is written before the final "executing: null".
        assert (await history(client, prompt_id))[prompt_id]["status"]["status_str"] == "success"


async def test_free_waits_for_the_current_job_and_queued_jobs_reload() -> None:
    async with comfy(job_seconds=0.2) as (emu, client):
        first = await submit(client)
        second = await submit(client)
        await until(lambda: emu.gpu.used > 0)
        with anyio.fail_after(0.2):
            reply = await client.post("/free", json={"unload_models": True, "free_memory": True})
        assert (reply.status_code, reply.content) == (200, b"")
        await anyio.sleep(0.05)
        assert emu.gpu.held("comfyui") == 6 * GiB  # never interrupts the running job
        assert (await wait_done(client, first))["status"]["status_str"] == "success"
        assert (await wait_done(client, second))["status"]["status_str"] == "success"
        assert emu.loads == 2  # unloaded between the jobs, loaded again by the second
        assert emu.gpu.held("comfyui") == 6 * GiB


async def test_free_when_idle_applies_at_once() -> None:
    async with comfy() as (emu, client):
        await wait_done(client, await submit(client))
        assert emu.gpu.used == 6 * GiB
        await client.post("/api/free", json={"free_memory": True})
        await until(lambda: emu.gpu.used == 0)
        stats = (await client.get("/system_stats")).json()
        assert stats["devices"][0]["vram_free"] == 16 * GiB


async def test_interrupt_ends_the_running_job_with_an_error_status() -> None:
    async with comfy(job_seconds=1.0) as (emu, client), websocket(client, "alice") as alice:
        prompt_id = await submit(client, "alice")
        await until(lambda: emu.gpu.used > 0)
        reply = await client.post("/interrupt", json={"prompt_id": "someone-else"})
        assert reply.status_code == 200  # ignored: not the running prompt
        await anyio.sleep(0.05)
        assert await history(client, prompt_id) == {}
        reply = await client.post("/interrupt")
        assert (reply.status_code, reply.content) == (200, b"")
        entry = await wait_done(client, prompt_id)
        assert entry["status"]["status_str"] == "error"
        assert entry["status"]["completed"] is False
        assert "execution_interrupted" in [m[0] for m in entry["status"]["messages"]]
        kinds = []
        with anyio.fail_after(2):
            while "execution_interrupted" not in kinds:
                frame = await alice.recv()
                if isinstance(frame, str):
                    kinds.append(json.loads(frame)["type"])


async def test_oom_is_an_execution_error() -> None:
    gpu = SimGPU(8 * GiB)
    gpu.allocate("ollama", 4 * GiB)
    async with comfy(gpu) as (_emu, client):
        entry = await wait_done(client, await submit(client))
        assert entry["status"]["status_str"] == "error"
        event, data = entry["status"]["messages"][-1]
        assert event == "execution_error"
        assert data["node_type"] == "CheckpointLoaderSimple"
        assert "CUDA out of memory" in data["exception_message"]
        assert gpu.oom_count == 1 and gpu.by_owner() == {"ollama": 4 * GiB}


async def test_invalid_requests() -> None:
    async with comfy() as (_emu, client):
        reply = await client.post("/prompt", json={"client_id": "x"})
        assert reply.status_code == 400
        assert reply.json() == {
            "error": {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            },
            "node_errors": {},
        }
        reply = await client.post("/prompt", json={"prompt": {"1": {"inputs": {}}}})
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_prompt"
        reply = await client.post(
            "/prompt", json={"prompt": {"1": {"class_type": "KSampler", "inputs": {}}}}
        )
        assert reply.json()["error"]["type"] == "prompt_no_outputs"
        assert (await client.post("/free", content=b"not json")).status_code == 400
        assert (await client.get("/prompt")).json()["exec_info"]["queue_remaining"] == 0


async def test_queue_clear_and_delete_touch_pending_items_only() -> None:
    async with comfy(job_seconds=0.3) as (emu, client):
        running_id = await submit(client)
        await until(lambda: emu.gpu.used > 0)
        doomed, kept, cleared = await submit(client), await submit(client), await submit(client)
        reply = await client.post("/queue", json={"delete": [doomed]})
        assert (reply.status_code, reply.content) == (200, b"")
        pending = [i[1] for i in (await client.get("/queue")).json()["queue_pending"]]
        assert pending == [kept, cleared]
        await client.post("/queue", json={"clear": True})
        queue = (await client.get("/queue")).json()
        assert queue["queue_pending"] == [] and queue["queue_running"][0][1] == running_id
        assert kept  # never ran
        await wait_done(client, running_id)
        assert await history(client, kept) == {}


async def test_system_stats_and_object_info() -> None:
    gpu = SimGPU(12 * GiB, name="Sim RTX")
    async with comfy(gpu) as (_emu, client):
        gpu.allocate("other", 2 * GiB)
        device = (await client.get("/system_stats")).json()["devices"][0]
        assert device["vram_total"] == 12 * GiB and device["vram_free"] == 10 * GiB
        assert device["type"] == "cuda" and "Sim RTX" in device["name"]
        info = (await client.get("/api/object_info")).json()
        assert info["SaveImage"]["output_node"] is True


@pytest.mark.parametrize(
    ("device", "torch_total"),
    [("cuda", 6 * GiB), ("cpu", 64 * GiB), ("mps", 64 * GiB), ("privateuseone", 1 * GiB)],
)
async def test_system_stats_means_what_comfyui_means_on_each_device(
    device: str, torch_total: int
) -> None:
    # comfy/model_management.py get_total_memory: torch's reserved bytes only on cuda (and
    # xpu/npu/mlu); system RAM on cpu and mps; a constant under DirectML.
    gpu = SimGPU(16 * GiB)
    async with comfy(gpu, device_type=device) as (_emu, c):
        await wait_done(c, await submit(c))
        stats = (await c.get("/system_stats")).json()
        held = gpu.held("comfyui")
    dev = stats["devices"][0]
    assert dev["type"] == device and dev["torch_vram_total"] == torch_total
    assert held == (0 if device in ("cpu", "mps") else 6 * GiB)  # cpu, mps: the model is in RAM


async def test_every_route_also_answers_under_api_and_the_ui_is_served() -> None:
    async with comfy() as (_emu, c):
        for path in ("/prompt", "/queue", "/history", "/system_stats", "/object_info"):
            plain, api = await c.get(path), await c.get("/api" + path)
            assert plain.status_code == api.status_code == 200, path
            assert plain.json().keys() == api.json().keys()
        page = await c.get("/")
        js = await c.get("/assets/index-emulator.js")
    assert 'type="module" crossorigin' in page.text and "new WebSocket" in js.text


async def test_the_origin_check_covers_pages_the_api_and_the_websocket() -> None:
    async with comfy() as (emu, c):
        host = str(c.base_url.netloc.decode())
        foreign = {"Origin": "http://127.0.0.1:1"}
        page = await c.get("/", headers=foreign)
        queued = await c.post("/api/prompt", json={"prompt": simple_workflow()}, headers=foreign)
        same = await c.get("/", headers={"Origin": f"http://{host}"})
        url = str(c.base_url).replace("http://", "ws://").rstrip("/") + "/ws"
        with pytest.raises(Exception) as refused:
            async with connect(url, additional_headers=foreign, proxy=None):
                pass
        queue = (await c.get("/queue")).json()
    assert page.status_code == 403 and page.content == b"" and queued.status_code == 403
    assert same.status_code == 200
    assert "403" in str(refused.value)
    assert queue["queue_pending"] == [] and queue["queue_running"] == []  # nothing queued
    assert emu.origin_refusals == 3


async def test_cors_header_mode_drops_the_check_as_enable_cors_header_does() -> None:
    async with comfy(cors_header="*") as (emu, c):
        r = await c.get("/system_stats", headers={"Origin": "http://127.0.0.1:1"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert emu.origin_refusals == 0
