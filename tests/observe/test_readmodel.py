"""The read model on a busy broker: one view, and the status JSON it gives is the declared one.

The broker is real (sim emulators on a simulated GPU read through the ``sim`` telemetry
source): leases queued behind a ComfyUI job, a swap in the history, GPU processes with and
without owners, a backend that is down, and a managed worker.
"""

from __future__ import annotations

import ast
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints, is_typeddict

import anyio
import httpx
import pytest

from gpubroker.cli import watch
from gpubroker.observe import readmodel, schema
from gpubroker.observe.schema import StatusJson, WorkerJson
from gpubroker.runtime import Endpoints
from gpubroker.scheduling.scheduler import State
from gpubroker.sim import ComfyUIEmulator, GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.testing import broker_running, make_config
from gpubroker.workers.supervisor import WorkerState
from processes import FAKE, free_port

pytestmark = pytest.mark.anyio

EMPTY_WORKFLOW = {  # EmptyImage -> SaveImage: nothing to load
    "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
    "2": {"class_type": "SaveImage", "inputs": {"filename_prefix": "t", "images": ["1", 0]}},
}


def shape_errors(value: Any, typ: Any, where: str = "$") -> list[str]:
    """Where ``value`` has a key its TypedDict does not declare, or lacks a required one."""
    if is_typeddict(typ):
        hints = get_type_hints(typ)
        if not isinstance(value, dict):
            return [f"{where}: {type(value).__name__}, not an object"]
        errors = [f"{where}.{k}: not declared" for k in value if k not in hints]
        errors += [f"{where}.{k}: missing" for k in typ.__required_keys__ if k not in value]
        for k, v in value.items():
            if k in hints:
                errors += shape_errors(v, hints[k], f"{where}.{k}")
        return errors
    origin = get_origin(typ)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(typ):
            return []
        nested = [a for a in get_args(typ) if is_typeddict(a) or get_origin(a) in (list, dict)]
        return shape_errors(value, nested[0], where) if len(nested) == 1 else []
    if origin is list:
        (item,) = get_args(typ)
        return [e for i, x in enumerate(value) for e in shape_errors(x, item, f"{where}[{i}]")]
    if origin is dict:
        _, item = get_args(typ)
        return [e for k, x in value.items() for e in shape_errors(x, item, f"{where}.{k}")]
    return []


def generic(url: str, **extra: Any) -> dict[str, Any]:
    return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload", **extra}


@asynccontextmanager
async def busy_broker() -> AsyncIterator[tuple[Endpoints, httpx.AsyncClient]]:
    """A broker whose every status section has something in it, held still by a ComfyUI job."""
    gpu = SimGPU(16 * GiB)
    gpu.allocate("stranger", GiB)  # a process no backend owns
    a = GenericEmulator(gpu, 5 * GiB, owner="a")
    b = GenericEmulator(gpu, 5 * GiB, owner="b")
    comfy = ComfyUIEmulator(gpu, 2 * GiB, job_seconds=3.0)
    port = free_port()
    worker = {
        "upstream": f"http://127.0.0.1:{port}",
        "unloadStrategy": "process",
        "command": [*FAKE],
        "healthPath": "/v1/models",
        "startTimeout": "10s",
        "stopTimeout": "2s",
    }
    async with (
        running(a.app) as ua,
        running(b.app) as ub,
        running(comfy.app) as uc,
        running(gpu_app(gpu)) as g,
    ):
        cfg = make_config(
            {
                "a": generic(ua, vram="2GiB"),
                "b": generic(ub),
                "comfyui": {"upstream": uc, "unloadStrategy": "comfyui"},
                "gone": {"upstream": "http://127.0.0.1:9", "unloadStrategy": "generic"},
                "w": worker,
            },
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
        )
        async with (
            broker_running(cfg) as ep,
            httpx.AsyncClient(timeout=20) as client,
            anyio.create_task_group() as tg,
        ):
            for name in ("a", "b"):  # exclusive: b's request swaps a out
                r = await client.post(ep.proxies[name] + "/generate", json={})
                assert r.status_code == 200
            prompt = {"prompt": EMPTY_WORKFLOW}
            r = await client.post(ep.proxies["comfyui"] + "/prompt", json=prompt)
            assert r.status_code == 200
            for name in ("a", "b"):  # both wait for ComfyUI's job to end

                async def ask(base: str = ep.proxies[name]) -> None:
                    await client.post(base + "/generate", json={})

                tg.start_soon(ask)
            await wait_status(
                client,
                ep.status_url,
                lambda s: (
                    s["queueLength"] == 2
                    and any(e["kind"] == "job" for e in s["liveRequests"])
                    and {"backend_down", "unmanaged_gpu_process"}
                    <= {w["code"] for w in s["warnings"]}
                    and s["backends"]["a"]["measuredVram"] is not None
                ),
            )
            yield ep, client
            tg.cancel_scope.cancel()


async def wait_status(
    client: httpx.AsyncClient, url: str, ok: Callable[[dict[str, Any]], bool], limit: float = 10
) -> dict[str, Any]:
    with anyio.fail_after(limit):
        while not ok(s := (await client.get(url + "/")).json()):
            await anyio.sleep(0.05)
    return s


async def test_the_status_json_and_the_workers_list_have_exactly_the_declared_keys() -> None:
    async with busy_broker() as (ep, client):
        broker, monitor = ep.broker, ep.monitor
        assert broker is not None and monitor is not None
        view = readmodel.read(broker, monitor, monitor.health)
        bare = readmodel.read(broker, None, monitor.health)  # no telemetry running
        served = (await client.get(ep.status_url + "/")).json()
        listed = (await client.get(ep.status_url + "/api/workers")).json()["workers"]
    body = view.to_json()
    assert body["queueLength"] == 2 and body["swapCount"] >= 1 and body["gpus"][0]["processes"]
    assert body["telemetry"]["source"] == "sim" and "takenAt" not in bare.to_json()["telemetry"]
    for status in (body, bare.to_json(), served):
        assert shape_errors(status, StatusJson) == []
    workers = [*view.workers_json(admin=False), *view.workers_json(admin=True), *listed]
    assert len(workers) == 3 and "command" in workers[1] and "command" not in workers[0]
    assert [e for w in workers for e in shape_errors(w, WorkerJson)] == []


async def test_the_view_is_python_units_and_what_the_json_and_metrics_say() -> None:
    async with busy_broker() as (ep, client):
        assert ep.broker is not None and ep.monitor is not None
        view = readmodel.read(ep.broker, ep.monitor, ep.monitor.health)
        metrics = (await client.get(ep.status_url + "/metrics")).text
    by_name = {b.name: b for b in view.backends}
    assert by_name["comfyui"].state is State.RESIDENT and by_name["comfyui"].job_count == 1
    a = by_name["a"]  # swapped out, so its process holds nothing now
    assert (a.state, a.measured_vram, a.declared_vram) == (State.ABSENT, 0, 2 * GiB)
    assert a.measured_by_gpu == {"0": 0}
    assert by_name["gone"].up is False and by_name["gone"].jobs is None
    assert [q.backend for q in view.queue] == sorted(q.backend for q in view.queue)
    assert all(q.waited_s >= 0 for q in view.queue) and view.swaps[0].total_s < 60
    assert (view.workers[0].name, view.workers[0].state) == ("w", WorkerState.STOPPED)
    body = view.to_json()
    assert body["swaps"][0]["totalMs"] == round(view.swaps[0].total_s * 1000, 1)
    assert body["uptime"] == int(view.now - view.started_at)
    assert [q.unit for q in view.queue] == [q.backend for q in view.queue]  # whole backends
    assert view.swaps[0].reason == "request" and body["swaps"][0]["reason"] == "request"
    # exclusive: each unit takes its whole GPU, and memory nobody owns is not planned with
    (plan,) = body["gpuPlan"]
    assert plan["unmanagedBytes"] is None and plan["capacityBytes"] == 16 * GiB
    (comfy,) = body["backends"]["comfyui"]["units"]
    assert comfy["name"] == "comfyui" and comfy["model"] is None
    assert (comfy["state"], comfy["vramBytes"], comfy["vramSource"]) == (
        "resident", 16 * GiB, "exclusive"
    )  # fmt: skip
    assert [u["name"] for u in body["backends"]["a"]["units"]] == ["a"]  # absent, yet its only
    assert 'gpubroker_backend_state{backend="comfyui",state="resident"} 1.0' in metrics
    assert 'gpubroker_unit_state{backend="comfyui",model="",state="resident"} 1.0' in metrics
    assert "gpubroker_unmanaged_vram_bytes{" not in metrics  # not counted: left out
    assert 'gpubroker_backend_up{backend="gone"} 0.0' in metrics
    assert 'gpubroker_backend_vram_measured_bytes{backend="a"} 0.0' in metrics
    assert 'gpubroker_backend_vram_declared_bytes{backend="a"} 2.147483648e+09' in metrics


def test_the_dashboard_reads_only_keys_the_schema_declares() -> None:
    # mypy checks d["key"] on a TypedDict but lets d.get("key") of an unknown key pass as
    # `object`: this catches a lookup of a key the status JSON does not declare.
    declared = {
        key
        for value in vars(schema).values()
        if is_typeddict(value)
        for key in get_type_hints(value)
    }
    tree = ast.parse(Path(watch.__file__).read_text())
    looked_up = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            looked_up.add(node.slice.value)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            looked_up.add(node.args[0].value)
    strings = {k for k in looked_up if isinstance(k, str)}
    assert len(strings) > 30 and strings <= declared, strings - declared
