"""``gpubroker demo``: the whole product on a laptop, no GPU needed.

Emulated Ollama, ComfyUI and vLLM share one simulated 24 GiB GPU that OOMs like a real card.
The same mixed workload runs twice: straight at the services (they crash into each other), then
through a real broker (nobody OOMs). Load times are scaled down from real ones so it takes
seconds.
"""

from __future__ import annotations

import contextlib
import random
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
import httpx
import typer

from gpubroker.config.load import parse_config
from gpubroker.config.model import Config
from gpubroker.events import Event, Swapped
from gpubroker.plugins.manager import create_plugins
from gpubroker.runtime import run_broker
from gpubroker.sim import (
    ComfyUIEmulator,
    GiB,
    OllamaEmulator,
    SimGPU,
    VLLMEmulator,
    gpu_app,
    running,
)
from gpubroker.sim.comfyui import simple_workflow

CAPACITY = 24 * GiB
CONCURRENCY = 6


@dataclass
class Tally:
    ok: dict[str, int] = field(default_factory=lambda: {"ollama": 0, "comfyui": 0, "vllm": 0})
    failed: dict[str, int] = field(default_factory=lambda: {"ollama": 0, "comfyui": 0, "vllm": 0})
    waits: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def services(gpu: SimGPU) -> AsyncIterator[dict[str, str]]:
    """Start the three emulators on ``gpu``; vLLM first, as it grabs its memory at start-up."""
    vllm = VLLMEmulator(
        gpu,
        "Qwen/Qwen2.5-7B-Instruct",
        weights=8 * GiB,
        kv_cache=6 * GiB,
        load_seconds=0.2,
        wake_seconds=0.3,
        token_interval=0.02,
        max_tokens=12,
    )
    ollama = OllamaEmulator(
        gpu,
        {"llama3.1:8b": 9 * GiB},
        load_seconds=0.5,
        unload_seconds=0.15,
        token_interval=0.02,
        num_predict=12,
    )
    comfy = ComfyUIEmulator(gpu, model_size=7 * GiB, load_seconds=0.4, job_seconds=0.6)
    async with running(vllm.app) as v, running(ollama.app) as o, running(comfy.app) as c:
        yield {"ollama": o, "comfyui": c, "vllm": v}


def workload(n: int, seed: int = 7) -> list[str]:
    """Mostly chat, some images, some vLLM: the mix that makes one GPU hurt."""
    rng = random.Random(seed)
    return [rng.choices(["ollama", "comfyui", "vllm"], weights=[5, 2, 3])[0] for _ in range(n)]


async def one(
    client: httpx.AsyncClient, kind: str, base: str, tally: Tally, echo: bool = True
) -> None:
    started = time.perf_counter()
    try:
        if kind == "ollama":
            r = await client.post(
                base + "/api/chat",
                json={
                    "model": "llama3.1:8b",
                    "stream": False,
                    "messages": [{"role": "user", "content": "hello"}],
                },
            )
            ok = r.status_code == 200 and "error" not in r.json()
        elif kind == "vllm":
            r = await client.post(
                base + "/v1/chat/completions",
                json={
                    "model": "Qwen/Qwen2.5-7B-Instruct",
                    "messages": [{"role": "user", "content": "hi"}],
                },
            )
            ok = r.status_code == 200
        else:
            r = await client.post(base + "/prompt", json={"prompt": simple_workflow()})
            ok = r.status_code == 200
            if ok:
                pid = r.json()["prompt_id"]
                with anyio.fail_after(60):
                    while not (h := (await client.get(f"{base}/history/{pid}")).json()):
                        await anyio.sleep(0.05)
                ok = h[pid]["status"]["status_str"] == "success"
                if not ok:
                    r = httpx.Response(500, text=str(h[pid]["status"].get("messages", ""))[-200:])
    except (httpx.HTTPError, TimeoutError, ValueError) as exc:
        ok, r = False, httpx.Response(599, text=type(exc).__name__)
    (tally.ok if ok else tally.failed)[kind] += 1
    if ok:
        tally.waits.append(float(r.headers.get("x-gpubroker-queue-ms", 0)) / 1000)
    else:
        tally.errors.append(f"{kind}: {r.status_code} {r.text[:120]}")
    if not echo:
        return
    typer.echo(
        f"  {'ok ' if ok else 'ERR'} {kind:<8} {time.perf_counter() - started:5.2f}s"
        + ("" if ok else f"  {r.text[:90]}")
    )


async def drive(urls: dict[str, str], jobs: list[str]) -> Tally:
    tally = Tally()
    limiter = anyio.Semaphore(CONCURRENCY)
    async with (
        httpx.AsyncClient(timeout=120, trust_env=False) as client,
        anyio.create_task_group() as tg,
    ):
        for kind in jobs:

            async def task(kind: str = kind) -> None:
                async with limiter:
                    await one(client, kind, urls[kind], tally)

            tg.start_soon(task)
            await anyio.sleep(0.03)
    return tally


def dashboard_url(status_url: str) -> str:
    """Where the status port serves its dashboard (``observe/dashboard.py``)."""
    return status_url.rstrip("/") + "/ui/"


async def trickle(urls: dict[str, str], pause: float = 3.0) -> None:
    """``--keep``: the mixed workload, slowly and for ever, two at a time, so the dashboard
    shows swaps happening (each request's line is not printed; the swaps are)."""
    rng = random.Random(11)
    async with httpx.AsyncClient(timeout=120, trust_env=False) as client:
        while True:
            kinds = workload(2, seed=rng.randrange(1 << 30))
            async with anyio.create_task_group() as tg:
                for kind in kinds:
                    tg.start_soon(one, client, kind, urls[kind], Tally(), False)
            await anyio.sleep(pause)


def broker_config(
    urls: dict[str, str], telemetry_url: str | None = None, state_dir: str | None = None
) -> Config:
    """The demo's broker. ``state_dir``: where it keeps what it learns (a directory of its own:
    the simulated services' footprints must never size a user's real ones)."""
    telemetry = {"telemetry": "sim", "telemetryUrl": telemetry_url} if telemetry_url else {}
    state = {"stateDir": state_dir} if state_dir else {}
    return parse_config(
        {
            "queueTimeout": "60s",
            "holdTime": "2s",
            **telemetry,
            **state,
            "backends": [
                {"name": name, "proxyPort": 5001 + i, "upstream": url, "unloadStrategy": name}
                for i, (name, url) in enumerate(urls.items())
            ],
        },
        source="demo",
    )


@contextlib.asynccontextmanager
async def _scratch_dir() -> AsyncIterator[str]:
    """A directory for the demo broker's state, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="gpubroker-demo-") as path:
        yield path


def summary(title: str, tally: Tally, gpu: SimGPU, extra: str = "") -> None:
    done = sum(tally.ok.values())
    failed = sum(tally.failed.values())
    typer.echo(f"\n{title}: {done} ok, {failed} failed, {gpu.oom_count} simulated OOMs{extra}")


async def run(keep: bool, n: int) -> int:
    jobs = workload(n)
    typer.echo(f"gpubroker demo: {n} requests (chat, images, vLLM) on one simulated 24 GiB GPU.\n")

    typer.echo("1) Straight at the services, no broker:")
    gpu = SimGPU(CAPACITY, name="Simulated 24 GiB GPU")
    async with services(gpu) as urls:
        direct = await drive(urls, jobs)
    summary("Without gpubroker", direct, gpu)

    typer.echo("\n2) The same workload through gpubroker:")
    gpu = SimGPU(CAPACITY, name="Simulated 24 GiB GPU")
    async with (
        services(gpu) as urls,
        running(gpu_app(gpu)) as gpu_url,
        _scratch_dir() as state_dir,
    ):
        shutdown = anyio.Event()
        async with anyio.create_task_group() as tg:
            endpoints = await tg.start(
                lambda task_status: run_broker(
                    broker_config(urls, gpu_url, state_dir),
                    create_plugins(),
                    shutdown,
                    ephemeral_ports=True,
                    task_status=task_status,
                )
            )
            swaps: list[Swapped] = []

            def on_event(event: Event) -> None:
                if isinstance(event, Swapped):
                    swaps.append(event)
                    typer.echo(
                        f"  swap: {', '.join(event.evicted)} -> {event.backend} "
                        f"({round(event.total * 1000, 1):.0f} ms)"
                    )

            endpoints.bus.subscribe(on_event)
            if keep:
                typer.echo(f"  (watch it: {dashboard_url(endpoints.status_url)})")
            brokered = await drive(endpoints.proxies, jobs)
            waits = sorted(brokered.waits) or [0.0]
            summary(
                "With gpubroker",
                brokered,
                gpu,
                f", {len(swaps)} swaps, median queue wait "
                f"{waits[len(waits) // 2]:.2f}s, max {waits[-1]:.2f}s",
            )
            if keep:
                typer.echo(
                    f"\nStill serving, with a request every few seconds so swaps keep "
                    f"happening.\n\n  Dashboard: {dashboard_url(endpoints.status_url)}\n\n"
                    "Or try:\n"
                    f"  gpubroker status --watch --url {endpoints.status_url}"
                    + "".join(f"\n  {n}: {u}" for n, u in endpoints.proxies.items())
                    + "\nCtrl-C to stop."
                )
                async with anyio.create_task_group() as keepers:
                    keepers.start_soon(trickle, endpoints.proxies)
                    await _until_stopped()  # Ctrl-C or SIGTERM: a clean stop, no traceback
                    keepers.cancel_scope.cancel()
                typer.echo("stopping.")
            shutdown.set()
    return 0 if gpu.oom_count == 0 and not sum(brokered.failed.values()) else 1


async def _until_stopped() -> None:
    """Wait for the first SIGINT or SIGTERM (handled here, so asyncio raises nothing)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def run_demo(*, keep: bool = False, requests: int = 24) -> None:
    from gpubroker.cli.serve import loop_options

    code = anyio.run(run, keep, requests, backend_options=loop_options())
    if code:
        raise typer.Exit(code)
