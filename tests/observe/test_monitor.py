"""Telemetry in a running broker: the status JSON's GPUs, measured VRAM, and warnings.

Emulators allocate on a simulated GPU; the broker reads it through the ``sim`` source, as it
reads NVML on a real machine.
"""

from __future__ import annotations

import ctypes.util
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, ClassVar

import anyio
import httpx
import pytest

from gpubroker.config.model import Config
from gpubroker.errors import TelemetryError
from gpubroker.events import Event, EventBus, Measured, Unmanaged, on_wire
from gpubroker.observe import alerts, monitor
from gpubroker.observe.monitor import Monitor
from gpubroker.plugins.manager import Provided, create_plugins
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler
from gpubroker.sim import GenericEmulator, GiB, OllamaEmulator, SimGPU, gpu_app, running
from gpubroker.telemetry.base import GpuProcess, GpuSample, TelemetrySnapshot, TelemetrySource
from gpubroker.telemetry.sampler import Sampler
from gpubroker.telemetry.sim import SimTelemetry
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio

FAST = {"telemetry": "sim", "telemetryInterval": "100ms"}


def generic(url: str, **extra: Any) -> dict[str, Any]:
    return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload", **extra}


async def wait_status(
    client: httpx.AsyncClient, url: str, ok: Callable[[dict[str, Any]], bool], limit: float = 5
) -> dict[str, Any]:
    """Poll ``GET /`` until ``ok(status)``; fail after ``limit`` seconds."""
    with anyio.fail_after(limit):
        while not ok(status := (await client.get(url + "/")).json()):
            await anyio.sleep(0.05)
    return status


@asynccontextmanager
async def two_generics(gpu: SimGPU, size: int) -> AsyncIterator[tuple[str, str, str]]:
    a = GenericEmulator(gpu, size, owner="a")
    b = GenericEmulator(gpu, size, owner="b")
    async with running(a.app) as ua, running(b.app) as ub, running(gpu_app(gpu)) as g:
        yield ua, ub, g


def codes(status: dict[str, Any]) -> set[str]:
    return {w["code"] for w in status["warnings"]}


async def test_status_shows_the_gpu_its_owners_and_measured_next_to_declared() -> None:
    gpu = SimGPU(16 * GiB, name="Sim 16G")
    gpu.allocate("stranger", 2 * GiB)  # a process no backend owns
    ollama = OllamaEmulator(gpu, {"llama3.2:latest": 6 * GiB})
    async with running(ollama.app) as o, running(gpu_app(gpu)) as g:
        cfg = make_config(
            {
                "ollama": {"upstream": o, "unloadStrategy": "ollama", "vram": "4GiB"},
                "gone": {"upstream": "http://127.0.0.1:9", "unloadStrategy": "generic"},
            },
            telemetryUrl=g,
            **FAST,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            body = {"model": "llama3.2:latest", "prompt": "hi", "stream": False}
            r = await client.post(ep.proxies["ollama"] + "/api/generate", json=body)
            assert r.status_code == 200
            status = await wait_status(
                client,
                ep.status_url,
                lambda s: (
                    s["backends"]["ollama"]["measuredVram"] == 6 * GiB
                    and {"vram_mismatch", "backend_down"} <= codes(s)
                ),
            )
    (card,) = status["gpus"]
    assert (card["name"], card["memoryTotal"], card["memoryUsed"]) == ("Sim 16G", 16 * GiB, 8 * GiB)
    assert card["utilization"] is None  # the simulator does not model it: unknown, not 0
    owners = {p["name"]: (p["owner"], p["usedBytes"]) for p in card["processes"]}
    assert owners == {"stranger": (None, 2 * GiB), "ollama": ("ollama", 6 * GiB)}
    backend = status["backends"]["ollama"]
    assert (backend["declaredVram"], backend["measuredByGpu"]) == (4 * GiB, {"0": 6 * GiB})
    assert status["telemetry"]["source"] == "sim" and status["telemetry"]["error"] is None
    by_code = {w["code"]: w for w in status["warnings"]}
    assert by_code["unmanaged_gpu_process"]["message"].startswith(
        f"pid {gpu.pid('stranger')} (stranger) holds 2.0 GiB on GPU 0"
    )
    assert by_code["vram_mismatch"]["backend"] == "ollama"
    assert by_code["backend_down"]["subject"] == "gone"
    assert by_code["backend_down"]["since"].endswith("Z")


async def test_measured_vram_keeps_an_under_declared_backend_from_ooming() -> None:
    async def run(telemetry: dict[str, Any]) -> tuple[int, int, int]:
        gpu = SimGPU(8 * GiB)
        async with two_generics(gpu, 5 * GiB) as (ua, ub, g):  # both really take 5 GiB
            cfg = make_config(
                {"a": generic(ua, vram="2GiB"), "b": generic(ub, vram="4GiB")},
                policy="budget",
                minResidency=0,
                gpus=[{"id": 0, "memory": "8GiB"}],
                **({k: v.format(g=g) for k, v in telemetry.items()}),
            )
            async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
                assert (
                    await client.post(ep.proxies["a"] + "/generate", json={})
                ).status_code == 200
                if "telemetryUrl" in telemetry:
                    await wait_status(
                        client,
                        ep.status_url,
                        lambda s: s["backends"]["a"]["measuredVram"] == 5 * GiB,
                    )
                r = await client.post(ep.proxies["b"] + "/generate", json={})
                swaps = (await client.get(ep.status_url + "/")).json()["swapCount"]
        return r.status_code, gpu.oom_count, swaps

    # Declared sizes alone (2 + 4 of 8 GiB) let both in, and the card runs out of memory…
    assert await run({"telemetry": "none"}) == (500, 1, 0)
    # …while a's measured 5 GiB (5 + 4 > 8) makes the broker free a first.
    assert await run({**FAST, "telemetryUrl": "{g}"}) == (200, 0, 1)


async def test_unload_that_does_not_free_memory_is_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(alerts, "UNLOAD_GRACE", 0.2)
    gpu = SimGPU(16 * GiB)
    async with two_generics(gpu, 3 * GiB) as (ua, ub, g):
        cfg = make_config({"a": generic(ua), "b": generic(ub)}, telemetryUrl=g, **FAST)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            await client.post(ep.proxies["a"] + "/generate", json={})
            await wait_status(
                client, ep.status_url, lambda s: s["backends"]["a"]["measuredVram"] == 3 * GiB
            )
            r = await client.post(ep.status_url + "/api/unload", json={"backend": "a"})
            assert r.json()["unloaded"] == ["a"]
            gpu.allocate("a", 2 * GiB, tag="leak")  # the service says unloaded, keeps memory
            status = await wait_status(
                client, ep.status_url, lambda s: "unload_not_freed" in codes(s)
            )
            gpu.free("a")
            cleared = await wait_status(
                client, ep.status_url, lambda s: "unload_not_freed" not in codes(s)
            )
    (warning,) = [w for w in status["warnings"] if w["code"] == "unload_not_freed"]
    assert (
        warning["message"].startswith("a was unloaded")
        and "holds 2.0 GiB of 3.0 GiB" in (warning["message"])
    )
    assert cleared["backends"]["a"]["measuredVram"] == 0


async def test_sim_endpoint_down_mid_run_is_a_warning_and_the_broker_serves_on() -> None:
    gpu = SimGPU(16 * GiB)
    a = GenericEmulator(gpu, 3 * GiB, owner="a")
    async with running(a.app) as ua, AsyncExitStack() as gpu_endpoint:
        g = await gpu_endpoint.enter_async_context(running(gpu_app(gpu)))
        cfg = make_config({"a": generic(ua)}, telemetryUrl=g, **FAST)
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            await wait_status(client, ep.status_url, lambda s: bool(s["gpus"]))
            await gpu_endpoint.aclose()  # the telemetry endpoint goes away mid-run
            down = await wait_status(client, ep.status_url, lambda s: s["telemetry"]["error"])
            r = await client.post(ep.proxies["a"] + "/generate", json={})
    assert r.status_code == 200  # serving does not depend on telemetry
    assert down["telemetry"]["error"].startswith("simulated GPUs at ")
    assert down["gpus"][0]["memoryTotal"] is None  # the card is still listed, readings unknown
    assert codes(down) == {"telemetry_failed"}


async def test_no_driver_is_one_log_line_and_the_broker_runs_on_declared_sizes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    if ctypes.util.find_library("nvidia-ml") is not None:
        pytest.skip("this machine has an NVIDIA driver")
    gpu = SimGPU(8 * GiB)
    a = GenericEmulator(gpu, 3 * GiB, owner="a")
    caplog.set_level(logging.INFO, logger="gpubroker")
    async with running(a.app) as ua:
        cfg = make_config({"a": generic(ua, vram="3GiB")}, telemetryInterval="100ms")
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert (await client.post(ep.proxies["a"] + "/generate", json={})).status_code == 200
            await anyio.sleep(0.3)  # a few samples: the notice must not repeat
            status = (await client.get(ep.status_url + "/")).json()
    notices = [m for r in caplog.records if "telemetry" in (m := r.getMessage())]
    assert notices == [
        "telemetry: no NVIDIA driver found (libnvidia-ml.so.1 is missing); "
        "the broker runs on declared VRAM sizes"
    ]
    assert status["telemetry"]["source"] == "none"
    assert status["telemetry"]["notice"].startswith("no NVIDIA driver found")
    assert status["gpus"] == [] and status["warnings"] == []
    assert status["backends"]["a"]["measuredVram"] is None


class OneReadAtATime(SimTelemetry):
    """The simulated GPUs read slowly, under NVML's rule: a read begun during another fails."""

    name = "one_at_a_time"
    made: ClassVar[list[OneReadAtATime]] = []

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.reads = self.overlaps = 0
        self.busy = False
        self.made.append(self)

    async def sample(self) -> TelemetrySnapshot:
        if self.busy:
            self.overlaps += 1
            raise TelemetryError("the previous read is not done yet")
        self.busy = True
        try:
            self.reads += 1
            await anyio.sleep(0.05)  # a driver that takes its time
            return await super().sample()
        finally:
            self.busy = False


async def test_refreshes_asked_for_together_are_one_sample_traced_and_judged_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    traced: list[TelemetrySnapshot] = []

    def counting(snap: TelemetrySnapshot, *args: Any, **kwargs: Any) -> Any:
        traced.append(snap)
        return real(snap, *args, **kwargs)

    real = monitor.attribute
    monkeypatch.setattr(monitor, "attribute", counting)
    gpu = SimGPU(16 * GiB)
    gpu.allocate("stranger", 2 * GiB)
    async with running(gpu_app(gpu)) as g:
        cfg = make_config({}, telemetry="sim", telemetryUrl=g, telemetryInterval="100ms")
        bus = EventBus()
        sched = build_scheduler(cfg, {}, None)
        Broker(cfg, {}, sched, bus)  # what the monitor measures goes to a broker, as in serve
        events: list[dict[str, Any]] = []
        bus.subscribe(on_wire(events.append))
        source = OneReadAtATime(cfg)
        watch = Monitor(cfg, sched, Sampler(source), bus)
        async with anyio.create_task_group() as tg:
            for _ in range(3):  # the monitor's loop and unload confirmations, at once
                tg.start_soon(watch.refresh)
        await source.close()
    assert (source.reads, source.overlaps, len(traced)) == (1, 0, 1)
    warnings = [e for e in events if e["event"].startswith("warning")]
    assert [(e["event"], e["code"]) for e in warnings] == [("warning", "unmanaged_gpu_process")]
    assert watch.snapshot.error is None


async def test_confirming_an_unload_never_reads_the_gpus_while_the_loop_does(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gpu = SimGPU(16 * GiB)
    a = GenericEmulator(gpu, 4 * GiB, owner="a")
    plugins = create_plugins(env={}, entry_points=False)
    plugins.telemetry[OneReadAtATime.name] = Provided(
        OneReadAtATime.name, OneReadAtATime, "test", "test", "0"
    )
    OneReadAtATime.made.clear()
    async with running(a.app) as ua, running(gpu_app(gpu)) as g:
        cfg = make_config(
            {"a": generic(ua)},
            telemetry=OneReadAtATime.name,
            telemetryUrl=g,
            telemetryInterval="100ms",
            unloadTimeout="700ms",
        )
        async with broker_running(cfg, plugins) as ep, httpx.AsyncClient(timeout=10) as client:
            await client.post(ep.proxies["a"] + "/generate", json={})
            gpu.allocate("a", 4 * GiB, tag="leak")  # kept after unload: confirmation polls on
            await wait_status(
                client, ep.status_url, lambda s: s["backends"]["a"]["measuredVram"] == 8 * GiB
            )
            r = await client.post(ep.status_url + "/api/unload", json={"backend": "a"})
            assert r.json()["unloaded"] == ["a"]
            status = (await client.get(ep.status_url + "/")).json()
    # The confirmation sampled ten times a second for 0.7 s, beside the loop's samples…
    assert "a: its memory did not come back: 4096 MiB still held" in caplog.text
    (source,) = OneReadAtATime.made
    assert source.overlaps == 0  # …never at once: no failed sample, no telemetry_failed
    assert source.reads >= 5 and status["telemetry"]["error"] is None
    assert "telemetry" not in caplog.text


def placement(*names: str) -> Scheduler:
    """A scheduler for backends ``names`` with nothing placed (the alerts only look)."""
    return Scheduler([BackendSpec(n) for n in names])


async def test_memory_under_an_owner_that_is_no_backend_is_published_as_unmanaged() -> None:
    cards = SimGPU(16 * GiB), SimGPU(16 * GiB, uuid="GPU-sim-1", index=1)
    async with AsyncExitStack() as endpoint:
        g = await endpoint.enter_async_context(running(gpu_app(*cards)))
        cfg = make_config({"a": generic("http://127.0.0.1:9")}, telemetryUrl=g, **FAST)
        bus = EventBus()
        news: list[Event] = []
        bus.subscribe(news.append, (Measured, Unmanaged))
        source = SimTelemetry(cfg)
        watch = Monitor(cfg, placement("a"), Sampler(source), bus)

        async def sample() -> dict[str, int]:
            news.clear()
            await watch.refresh()
            assert [type(e) for e in news] == [Measured, Unmanaged]  # measured first
            assert isinstance(news[-1], Unmanaged)
            return dict(news[-1].per_gpu)

        cards[0].allocate("a", 3 * GiB)  # the backend's own: the scheduler counts it already
        assert await sample() == {"0": 0, "1": 0}
        cards[1].allocate("comfyui-by-hand", 2 * GiB)  # started outside gpubroker
        cards[0].allocate("desktop", GiB // 4)
        assert await sample() == {"0": GiB // 4, "1": 2 * GiB}
        cards[1].free("comfyui-by-hand")
        cards[0].free("desktop")
        assert await sample() == {"0": 0, "1": 0}
        cards[1].allocate("comfyui-by-hand", 2 * GiB)
        await endpoint.aclose()  # telemetry fails: nothing is known of who holds what
        news.clear()
        await watch.refresh()
        await source.close()
    assert watch.snapshot.error is not None and news == []


class HostProcesses(TelemetrySource):
    """An NVML-like source (pids, no owners): whatever the test puts in ``processes``."""

    name = "host_processes"
    processes: tuple[GpuProcess, ...] = ()

    async def sample(self) -> TelemetrySnapshot:
        gpu = GpuSample(uuid="GPU-0", index=0, name="card", processes=self.processes)
        return TelemetrySnapshot(taken_at=0.0, gpus=(gpu,))


@pytest.fixture
def worker_pid() -> Iterator[int]:
    """A real process standing for a managed worker's runner."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield worker.pid
    finally:
        worker.kill()
        worker.wait(5)


async def test_by_pids_unmanaged_is_the_visible_strangers_the_broker_itself_included(
    worker_pid: int,
) -> None:
    cfg = make_config({"svc": generic("http://127.0.0.1:1")}, telemetryInterval="100ms")
    bus = EventBus()
    got: list[Event] = []
    bus.subscribe(got.append, (Unmanaged,))
    source = HostProcesses(cfg)
    source.processes = (
        GpuProcess(worker_pid, 5 * GiB, "runner"),  # svc's managed worker
        GpuProcess(os.getpid(), GiB, "gpubroker"),  # a plugin opened a CUDA context here
        GpuProcess(999_999_999, 3 * GiB, "ghost"),  # not in our pid namespace
    )
    watch = Monitor(
        cfg, placement("svc"), Sampler(source), bus, roots=lambda: {"svc": [worker_pid]}
    )
    await watch.refresh()
    assert [e.per_gpu for e in got if isinstance(e, Unmanaged)] == [{"0": GiB}]
    assert watch.attribution.measured["svc"] == {"0": 5 * GiB}


async def test_a_backend_whose_processes_cannot_be_found_stops_strangers_being_subtracted(
    worker_pid: int, caplog: pytest.LogCaptureFixture
) -> None:
    # svc answers (its probe says up), but no tree holds its processes (another user's
    # service: its listener's pid is hidden): its runner would pass for a stranger.
    cfg = make_config({"svc": generic("http://127.0.0.1:1")}, telemetryInterval="100ms")
    bus = EventBus()
    got: list[Event] = []
    bus.subscribe(got.append, (Unmanaged,))
    source = HostProcesses(cfg)
    source.processes = (GpuProcess(worker_pid, 5 * GiB, "runner"),)
    health = {"svc": {"status": "up"}}
    watch = Monitor(cfg, placement("svc"), Sampler(source), bus, health=health)
    with caplog.at_level(logging.WARNING, "gpubroker.observe.monitor"):
        await watch.refresh()
        await watch.refresh()
    assert [e.per_gpu for e in got if isinstance(e, Unmanaged)] == [{"0": 0}, {"0": 0}]
    told = [r for r in caplog.records if "cannot see the processes of svc" in r.message]
    assert len(told) == 1  # said once, not every sample
    health["svc"] = {"status": "down"}  # not running: what remains on the GPU is a stranger's
    await watch.refresh()
    assert got[-1].per_gpu == {"0": 5 * GiB}  # type: ignore[attr-defined]
