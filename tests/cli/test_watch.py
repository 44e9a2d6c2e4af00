"""The dashboard of ``gpubroker status [--watch]``, rendered to text, and its live loop."""

from __future__ import annotations

import copy
import io
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from gpubroker.cli import watch as dashboard
from gpubroker.cli.main import app
from gpubroker.cli.watch import frames, http_fetch, render, render_text
from gpubroker.config.load import parse_config
from gpubroker.config.model import Config
from gpubroker.plugins.manager import create_plugins
from gpubroker.runtime import run_broker
from gpubroker.sim import GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.testing import broker_running, make_config

runner = CliRunner()
URL = "http://127.0.0.1:5102"

STATUS: dict[str, Any] = {
    "vramOwner": "ollama",
    "activeRequests": {"ollama": 1, "comfyui": 1},
    "totals": {"inFlight": 2, "leases": 1, "jobs": 1},
    "queueLength": 1,
    "swapCount": 3,
    "uptime": 125,
    "policy": "budget",
    "swapping": True,
    "telemetry": {"source": "nvml", "notice": None, "error": None},
    "gpus": [
        {
            "index": 0,
            "uuid": "GPU-aaaa",
            "name": "NVIDIA GeForce RTX 4090",
            "memoryTotal": 24 * GiB,
            "memoryUsed": 18 * GiB,
            "utilization": 87.0,
            "powerDraw": 312.5,
            "powerLimit": 450.0,
            "temperature": 64.0,
            "fan": None,
            "smClock": 2520,
            "memClock": 10501,
            "processes": [
                {"pid": 4242, "name": "ollama", "usedBytes": 9 * GiB, "owner": "ollama"},
                {"pid": 777, "name": "python3", "usedBytes": 9 * GiB, "owner": None},
                {"pid": 5, "name": None, "usedBytes": None, "owner": None, "visible": False},
            ],
        }
    ],
    "backends": {
        "ollama": {
            "state": "resident",
            "owner": True,
            "active": 1,
            "queued": 0,
            "gpuRequests": 12,
            "passthroughRequests": 30,
            "declaredVram": 6 * GiB,
            "measuredVram": 9 * GiB,
            "health": {"status": "up", "latencyMs": 3.2},
        },
        "comfyui": {
            "state": "absent",
            "owner": False,
            "active": 0,
            "queued": 1,
            "gpuRequests": 2,
            "passthroughRequests": 0,
            "declaredVram": None,
            "measuredVram": None,
            "health": {"status": "down", "error": "ConnectError"},
        },
    },
    "liveRequests": [
        {
            "id": 41,
            "backend": "ollama",
            "path": "/api/chat",
            "state": "active",
            "elapsedMs": 2300,
            "queuedMs": 12,
            "caller": "nightly-job",
        },
        {
            "id": 42,
            "backend": "comfyui",
            "path": "/prompt",
            "state": "queued",
            "elapsedMs": 900,
            "caller": "10.0.0.5",
        },
        {
            "kind": "job",
            "id": "5f0c1d2e-aaaa",
            "backend": "comfyui",
            "path": "/prompt",
            "state": "running",
            "elapsedMs": 4100,
        },
    ],
    "queue": [{"position": 1, "id": 42, "backend": "comfyui", "waitedMs": 900}],
    "swaps": [
        {
            "at": "2026-01-01T12:00:00Z",
            "to": "ollama",
            "evicted": ["comfyui"],
            "drainMs": 120.0,
            "unloadMs": 1500.0,
            "loadMs": 4200.0,
            "totalMs": 5820.0,
            "failures": [],
        },
    ],
    "warnings": [
        {
            "code": "unmanaged_gpu_process",
            "message": "pid 777 (python3) holds 9.0 GiB on GPU 0",
            "sinceTs": 1000.0,
        },
    ],
}


def test_render_shows_every_section() -> None:
    text = render_text(render(STATUS, url=URL, now=1090.0), width=140)
    for expected in (
        "GPU owner: ollama",
        "swapping…",
        "GPU 0  NVIDIA GeForce RTX 4090  GPU-aaaa",
        "18.0 GiB / 24.0 GiB  75%",
        "util [",
        "87%",
        "] 312/450 W",
        "temp 64°C   fan n/a   clocks SM 2520 / MEM 10501 MHz",
        "unmanaged",
        "not visible here",
        "resident ★",
        "up 3ms",
        "in flight: 2",
        "queued #1",
        "job running",  # ComfyUI's own queue is in-flight work too
        "5f0c1d2e",
        "4.1s",
        "/api/chat",
        "2.3s",
        "comfyui → ollama",
        "4.2s",
        "5.8s",
        "unmanaged_gpu_process",
        "1m30s",  # the warning's age
    ):
        assert expected in text, expected
    request = next(line for line in text.splitlines() if "/api/chat" in line)
    assert "nightly-job" in request  # who asked, on the request's own row
    queued = next(line for line in text.splitlines() if "queued #1" in line)
    assert "10.0.0.5" in queued
    row = next(line for line in text.splitlines() if "│ ollama" in line)
    assert "6.0 GiB" in row and "9.0 GiB" in row  # declared next to measured
    bars = (0.75, 0.87, 312.5 / 450)  # VRAM, utilisation, power
    assert text.count("█") == sum(round(f * dashboard.BAR) for f in bars)


def with_units() -> dict[str, Any]:
    """STATUS from a broker that shows units: ollama's models, each GPU's plan, why swaps ran."""
    status = copy.deepcopy(STATUS)
    unit = {"active": 0, "queued": 0, "measuredBytes": None}
    status["backends"]["ollama"]["units"] = [
        {**unit, "name": "ollama/llama3:8b", "model": "llama3:8b", "state": "resident",
         "vramBytes": 9 * GiB, "vramSource": "measured", "measuredBytes": 9 * GiB, "active": 1},
        {**unit, "name": "ollama/qwen2:0.5b", "model": "qwen2:0.5b", "state": "draining",
         "vramBytes": GiB, "vramSource": "learned"},
        {**unit, "name": "ollama/gemma:27b", "model": "gemma:27b", "state": "absent",
         "vramBytes": 17 * GiB, "vramSource": "declared"},
    ]  # fmt: skip
    status["backends"]["comfyui"]["units"] = [
        {**unit, "name": "comfyui", "model": None, "state": "absent", "vramBytes": 7 * GiB,
         "vramSource": "estimated", "queued": 1},
    ]  # fmt: skip
    status["gpuPlan"] = [
        {"gpu": "0", "capacityBytes": 24 * GiB, "plannedBytes": 19 * GiB,
         "unmanagedBytes": 9 * GiB},
    ]  # fmt: skip
    status["swaps"][0] |= {"evicted": ["ollama/gemma:27b", "comfyui"], "reason": "unmanaged"}
    status["queue"][0]["unit"] = "comfyui"
    return status


def test_render_shows_each_unit_its_footprint_and_why_it_was_evicted() -> None:
    text = render_text(render(with_units(), url=URL, now=1090.0), width=140)
    lines = text.splitlines()

    def line(part: str) -> str:
        (found,) = [row for row in lines if part in row]
        return found

    llama = line("  llama3:8b")
    assert "resident" in llama and "9.0 GiB measured" in llama  # size, and where it comes from
    assert "draining" in line("  qwen2:0.5b") and "1.0 GiB learned" in line("  qwen2:0.5b")
    assert not [row for row in lines if "  gemma:27b" in row]  # absent: no line of its own
    below = [lines.index(line(part)) for part in ("resident ★", "  llama3:8b", "  qwen2:0.5b")]
    assert below == list(range(below[0], below[0] + 3))  # right under their backend's row
    assert "7.0 GiB estimated" in line("estimated")  # a whole backend: on its own row
    assert line("estimated").startswith("│ comfyui ")
    assert "plan 19.0 GiB / 24.0 GiB   unmanaged 9.0 GiB" in text
    swap = line("ollama/gemma:27b, comfyui → ollama")
    assert "unmanaged" in swap.split("→")[1]  # the reason, beside the units that went
    bars = (0.75, 0.87, 312.5 / 450)  # no bar of its own for the plan
    assert text.count("█") == sum(round(f * dashboard.BAR) for f in bars)


def test_the_plan_line_leaves_out_what_is_zero_or_unknown_and_shows_without_telemetry() -> None:
    status = with_units()
    status["gpuPlan"][0]["unmanagedBytes"] = 0
    assert "unmanaged 0" not in render_text(render(status, url=URL), width=140)
    quiet = {
        "vramOwner": None,
        "backends": {},
        "telemetry": {"source": "none", "notice": "no NVIDIA driver found"},
        "gpuPlan": [
            {"gpu": "0", "capacityBytes": 24 * GiB, "plannedBytes": 6 * GiB,
             "unmanagedBytes": None},
            {"gpu": "1", "capacityBytes": None, "plannedBytes": None, "unmanagedBytes": None},
        ],
    }  # fmt: skip
    text = render_text(render(quiet, url=URL))
    assert "GPU 0 plan 6.0 GiB / 24.0 GiB" in text and "GPU 1" not in text  # unknown: no line
    assert "GPUs" not in text


def test_render_without_gpus_or_activity_is_short_and_honest() -> None:
    quiet = {
        "vramOwner": None,
        "backends": {},
        "telemetry": {"source": "none", "notice": "no NVIDIA driver found"},
    }
    text = render_text(render(quiet, url=URL))
    assert "GPU owner: nobody" in text and "telemetry: none (no NVIDIA driver found)" in text
    assert "GPUs" not in text
    assert "No requests in flight or queued." in text and "No warnings." in text


def test_render_shows_the_preload_while_it_runs_and_nothing_after() -> None:
    status = copy.deepcopy(STATUS)
    status["preload"] = [
        {"target": "ollama/llama3.1:8b", "state": "done", "error": None},
        {"target": "vllm", "state": "loading", "error": None},
        {"target": "comfy", "state": "pending", "error": None},
    ]
    text = render_text(render(status, url=URL, now=1090.0), width=140)
    assert "Preload: ollama/llama3.1:8b done, vllm loading…, comfy pending" in text
    for step in status["preload"]:
        step["state"] = "done"
    assert "Preload" not in render_text(render(status, url=URL, now=1090.0), width=140)


def test_render_marks_stale_data_while_reconnecting() -> None:
    text = render_text(render(STATUS, url=URL, error="ConnectError", stale_s=12))
    assert "reconnecting: ConnectError (last seen 12s ago)" in text
    assert "GPU owner: ollama" in text  # the last good picture stays up meanwhile
    never = render_text(render(None, url=URL, error="ConnectError"))
    assert f"no broker answering at {URL} (ConnectError); retrying" in never


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def broker_on(cfg: Config) -> AsyncIterator[None]:
    """A broker on the config's own ports (the dashboard must find it again after a restart)."""
    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        await tg.start(partial(run_broker, cfg, create_plugins(), shutdown))
        try:
            yield
        finally:
            shutdown.set()


@pytest.mark.anyio
async def test_the_live_loop_survives_a_broker_restart() -> None:
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 3 * GiB, owner="a")
    status_port = free_port()
    url = f"http://127.0.0.1:{status_port}"
    async with running(a.app) as ua:
        cfg = parse_config(
            {
                "statusPort": status_port,
                "telemetry": "none",
                "shutdownGrace": "1s",
                "backends": [{"name": "a", "proxyPort": free_port(), "upstream": ua}],
            }
        )
        fetch, close = http_fetch(url, timeout=2.0)
        clock = [100.0]
        loop = frames(fetch, url, clock=lambda: clock[0])

        def frame() -> Any:
            return anyio.to_thread.run_sync(lambda: render_text(next(loop)))

        try:
            with anyio.fail_after(20):
                assert "no broker answering" in await frame()  # not started yet
                async with broker_on(cfg):
                    up = await frame()
                clock[0] = 107.0
                down = await frame()
                async with broker_on(cfg):
                    back = await frame()
        finally:
            close()
    assert "GPU owner: nobody" in up and "reconnecting" not in up
    assert "reconnecting: ConnectError (last seen 7s ago)" in down and "│ a " in down
    assert "reconnecting" not in back and "up " in back


def test_watch_draws_until_ctrl_c_and_exits_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[str] = []
    closed: list[bool] = []

    def fake_fetch() -> dict[str, Any]:
        return STATUS

    monkeypatch.setattr(
        dashboard, "http_fetch", lambda url: (fake_fetch, lambda: closed.append(True))
    )

    class Recorder(Console):
        def __init__(self) -> None:
            super().__init__(width=120, force_terminal=True, record=True, file=io.StringIO())

    console = Recorder()
    ticks = iter(range(3))

    def sleep(_: float) -> None:
        drawn.append(console.export_text(clear=True))
        if next(ticks) == 2:
            raise KeyboardInterrupt  # Ctrl-C

    monkeypatch.setattr(dashboard.time, "sleep", sleep)
    dashboard.watch(URL, interval=0.01, console=console)  # returns: no traceback, no exit code
    assert closed == [True]
    assert len(drawn) == 3 and all("GPU owner: ollama" in d for d in drawn)


def test_status_watch_and_json_do_not_mix() -> None:
    result = runner.invoke(app, ["status", "--watch", "--json", "--url", URL])
    assert result.exit_code == 2
    assert "--watch draws a dashboard" in result.output


@pytest.mark.anyio
async def test_one_shot_status_prints_the_dashboard_once() -> None:
    gpu = SimGPU(8 * GiB, name="Sim 8G")
    a = GenericEmulator(gpu, 3 * GiB, owner="a")
    async with running(a.app) as ua, running(gpu_app(gpu)) as g:
        cfg = make_config(
            {"a": {"upstream": ua, "unloadStrategy": "generic", "vram": "3GiB"}},
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            await client.post(ep.proxies["a"] + "/generate", json={})
            with anyio.fail_after(5):
                while not (await client.get(ep.status_url + "/")).json()["gpus"][0]["processes"]:
                    await anyio.sleep(0.05)
            started = time.monotonic()
            result = await anyio.to_thread.run_sync(
                lambda: runner.invoke(app, ["status", "--url", ep.status_url])
            )
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 5
    assert "GPU 0  Sim 8G" in result.output and "3.0 GiB / 8.0 GiB" in result.output
    assert "GPU owner: a" in result.output
