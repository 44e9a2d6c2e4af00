"""Does the budget policy earn its keep? Replay traces against both policies, in one run.

    .venv/bin/python bench/scheduling.py                 # every trace (~11 min on 2 cores)
    .venv/bin/python bench/scheduling.py --traces a,b,c,d  # issue 4's traces (~2-3 min)
    .venv/bin/python bench/scheduling.py --traces h -v   # the household, every swap listed
    .venv/bin/python bench/scheduling.py --scale 0.1     # slower, finer-grained timing

Each run is the real thing on loopback: ``gpubroker.testing.broker_running`` in front of the
emulators of ``gpubroker.sim`` (Ollama, ComfyUI, vLLM, a generic load/unload service), all on one
simulated GPU that counts an OOM whenever a service allocates past its capacity: 24 GiB for
traces a-d, where every backend declares ``vram:`` equal to what its emulator really allocates
(so an over-committing scheduler shows up as OOMs), 32 GiB for trace h (``household``). Each
(trace, policy) pair gets fresh emulators, GPU, broker and state directory (``stateDir``: no
footprint learned in one run reaches the next, nor the user's own).

Every real-world cost below (Ollama 7B cold load ~5 s, vLLM wake ~2 s, ComfyUI SDXL load ~4 s, ...)
and every broker time constant (``holdTime``, ``minResidency``, ``priorityAging``,
``queueTimeout``, ``unloadTimeout``, ``telemetryInterval`` at their defaults, and the broker's
idle/confirmation polls) is multiplied by ``--scale``, so the bench runs ``1/scale`` times faster
than the world it models. Times are printed real-equivalent (measured / scale) and as measured.

Traces (deterministic, ``--seed``), each request with an arrival time, a backend and a kind:

a. chat-heavy: one chat model, an SDXL image every ~20 requests (they fit together);
b. strict A/B alternation between two models that cannot co-reside (vLLM and a 27B Ollama model);
c. bursty agents over chat, embeddings and vLLM, which all fit together;
d. all four of chat, embeddings, images and vLLM, which cannot all fit;
h. an hour of the household of ``bench/replay_traces.py`` (H): one Ollama with an 8B chat
   model, a 14B reasoning model in bursts and an embedding model, and ComfyUI with SDXL
   Lightning images and a Flux one now and then, on 32 GiB. Run under ``policy: budget`` in
   two setups (``--setups``, see ``bench/household.py``): ``units``, Ollama's models as units
   of their own and ComfyUI's workflows sized by their files; ``backend``, each service one
   unit at the worst case its user had to declare before that.

The replay sends each request at its arrival time (concurrently) and records the broker's queue
wait (``X-GPUBroker-Queue-Ms``), completion and errors; for ComfyUI completion is when
``/history/{id}`` (polled through the proxy) shows the job done. Swaps come from the status API
(``GET /`` -> ``swapCount``), OOMs from ``SimGPU.oom_count``; a load partly on the CPU or a
runner reloaded (Ollama), a sleep with requests in flight (vLLM), an unload under load (the
generic service) count as errors.

Targets, checked at the end; the exit status is 1 when one is missed. Issue 4: on (a) and (c)
budget makes at least 2x fewer swaps and has a lower p95 wait than exclusive. Issue 14: on (h)
``units`` makes at least 2x fewer swaps and has at most half the p95 wait of ``backend``. On
every trace and policy 0 OOMs, 0 errors and max wait within ``MAX_WAIT_BOUND`` (h:
``household.MAX_WAIT_BOUND``, as a Flux job of a minute cannot be preempted).

``bench/replay.py`` measures model-level residency on the pure scheduler instead: a simulated
clock, a whole day of traffic in seconds, our rule against the peers' (LRU, Ollama's,
Lemonade's, one at a time).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import household
import httpx

import gpubroker.plugins.strategies.calls as strategies_module
import gpubroker.scheduling.broker as broker_module
from gpubroker.config.model import Config
from gpubroker.events import Swapped
from gpubroker.plugins.manager import Plugins
from gpubroker.sim import (
    ComfyUIEmulator,
    GenericEmulator,
    GiB,
    OllamaEmulator,
    SimGPU,
    VLLMEmulator,
    running,
    simple_workflow,
)
from gpubroker.sim.service import EmulatedService
from gpubroker.testing import broker_running, make_config

CAPACITY = 24 * GiB
POLICIES = ("exclusive", "budget")
DEFAULT_SCALE = 0.075  # the whole bench in ~2.5 min on 2 cores
TARGET_TRACES = ("a", "c")  # where budget must beat exclusive
MAX_WAIT_BOUND = 60.0  # real-equivalent seconds; half the default queueTimeout (120 s)
TOKENS = 8  # tokens per emulated reply; the reply's duration comes from REAL below

# --- the world being modelled: real-world seconds, multiplied by --scale ------------------------

REAL = {
    "ollama_load": 5.0,  # Ollama 7B/8B cold load
    "ollama_unload": 0.5,
    "chat_reply": 2.5,  # a non-streamed chat answer, ~150 tokens
    "big_load": 10.0,  # a 27B model, ~16 GiB from disk cache
    "big_unload": 0.8,
    "big_reply": 4.0,
    "ollama_keep_alive": 300.0,  # Ollama's default keep_alive (5 min)
    "comfy_load": 4.0,  # ComfyUI SDXL checkpoint load
    "image_job": 5.0,  # SDXL 1024x1024, ~25 steps
    "vllm_start": 1.0,  # vLLM start-up happens before the trace; not timed
    "vllm_wake": 2.0,  # vLLM level-1 wake
    "vllm_sleep": 1.0,  # vLLM level-1 sleep (weights to host RAM)
    "vllm_reply": 1.5,
    "embed_load": 1.0,  # an embedding model behind a generic load/unload service
    "embed_unload": 0.2,
    "embed_reply": 0.15,
}
# The broker's own time constants at their defaults (config.py, broker.py, strategies).
BROKER_REAL = {
    "holdTime": 10.0,
    "minResidency": 3.0,  # the budget policy's default; exclusive uses 0
    "priorityAging": 30.0,
    "queueTimeout": 120.0,
    "unloadTimeout": 10.0,
    "startTimeout": 120.0,
    "telemetryInterval": 2.0,  # also how often Ollama's /api/ps is read for its model units
}
IDLE_POLL_REAL = 0.05  # gpubroker.scheduling.broker.IDLE_POLL
CONFIRM_POLL_REAL = 0.02  # gpubroker.plugins.strategies.calls.POLL_INTERVAL
HISTORY_POLL_REAL = 0.5  # how often the bench's client polls ComfyUI's /history
COUNTERS = ("loads", "unloads", "cpu_offloads", "reloads")  # the emulators' own, where they exist


@dataclass(frozen=True)
class BackendDef:
    """A backend as the bench runs it: service, declared VRAM, what its emulator allocates."""

    service: str  # ollama | comfyui | vllm | generic
    what: str
    vram: int
    model: str = ""

    def config(self, url: str, scale: float) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "upstream": url,
            "unloadStrategy": self.service,
            "vram": f"{self.vram // GiB}GiB",
            "startTimeout": BROKER_REAL["startTimeout"] * scale,
        }
        if self.service == "generic":
            entry["unloadEndpoint"] = "/unload"
        return entry


BACKENDS: dict[str, BackendDef] = {
    "chat": BackendDef("ollama", "Ollama llama3.1:8b", 9 * GiB, "llama3.1:8b"),
    "big": BackendDef("ollama", "Ollama gemma2:27b", 16 * GiB, "gemma2:27b"),
    "image": BackendDef("comfyui", "ComfyUI SDXL", 7 * GiB),
    "vllm": BackendDef("vllm", "vLLM Qwen2.5-7B, 8 GiB weights + 5 GiB KV", 13 * GiB, "qwen"),
    "embed": BackendDef("generic", "generic embedder (/unload)", 1 * GiB),
}


def make_emulator(name: str, gpu: SimGPU, scale: float) -> EmulatedService:
    """The emulator for ``name``, allocating exactly its declared ``vram`` on ``gpu``."""
    d = BACKENDS[name]
    r = {k: v * scale for k, v in REAL.items()}
    if name in ("chat", "big"):
        return OllamaEmulator(
            gpu,
            {d.model: d.vram},
            load_seconds=r[f"{'ollama' if name == 'chat' else 'big'}_load"],
            unload_seconds=r[f"{'ollama' if name == 'chat' else 'big'}_unload"],
            token_interval=r[f"{name}_reply"] / TOKENS,
            num_predict=TOKENS,
            keep_alive=r["ollama_keep_alive"],
            num_parallel=4,
            owner=f"ollama-{name}",
        )
    if name == "image":
        return ComfyUIEmulator(
            gpu, model_size=d.vram, load_seconds=r["comfy_load"], job_seconds=r["image_job"]
        )
    if name == "vllm":
        return VLLMEmulator(
            gpu,
            d.model,
            weights=8 * GiB,
            kv_cache=d.vram - 8 * GiB,
            load_seconds=r["vllm_start"],
            wake_seconds=r["vllm_wake"],
            sleep_seconds=r["vllm_sleep"],
            token_interval=r["vllm_reply"] / TOKENS,
            max_tokens=TOKENS,
        )
    assert name == "embed"
    return GenericEmulator(
        gpu,
        d.vram,
        load_seconds=r["embed_load"],
        unload_seconds=r["embed_unload"],
        token_interval=r["embed_reply"] / 4,
        tokens=4,
        owner="embed",
    )


def emulator_bytes(name: str, emu: EmulatedService) -> int:
    """What the emulator allocates when fully loaded (checked against the declared vram)."""
    if isinstance(emu, OllamaEmulator):
        return sum(emu.models.values())
    if isinstance(emu, ComfyUIEmulator):
        return emu.model_size + emu.work_size
    if isinstance(emu, VLLMEmulator):
        return emu.reserved
    assert isinstance(emu, GenericEmulator)
    return emu.size


# --- traces (real-world seconds) -------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    at: float  # real-world seconds from the start of the trace
    backend: str
    kind: str  # chat | image | completion | embed
    model: str = ""  # trace h: the model (or image workflow) it names
    work: float = 0.0  # trace h: real seconds it computes once loaded


KIND = {"chat": "chat", "big": "chat", "image": "image", "vllm": "completion", "embed": "embed"}


@dataclass(frozen=True)
class Trace:
    key: str
    title: str
    backends: tuple[str, ...]
    requests: tuple[Req, ...]
    world: str = "bench"  # bench: BACKENDS on 24 GiB, run per policy; household: trace h

    @property
    def household(self) -> bool:
        return self.world == "household"


def _reqs(pairs: list[tuple[float, str]]) -> tuple[Req, ...]:
    return tuple(Req(round(at, 3), b, KIND[b]) for at, b in sorted(pairs))


def trace_a(rng: random.Random) -> Trace:
    """Chat-heavy: 120 chats ~2 s apart (Poisson), one SDXL image in every block of 20."""
    n = 120
    images = {20 * k + rng.randrange(20) for k in range(n // 20)}
    t, pairs = 0.0, []
    for i in range(n):
        t += rng.expovariate(1 / 2.0)
        pairs.append((t, "image" if i in images else "chat"))
    return Trace("a", "chat-heavy, an image every ~20", ("chat", "image"), _reqs(pairs))


def trace_b(rng: random.Random) -> Trace:
    """Strict A/B alternation every ~5 s between two models that never fit together."""
    t, pairs = 0.0, []
    for i in range(40):
        t += 5.0 + rng.uniform(-0.5, 0.5)
        pairs.append((t, ("vllm", "big")[i % 2]))
    return Trace("b", "strict A/B alternation (vLLM, 27B)", ("vllm", "big"), _reqs(pairs))


def trace_c(rng: random.Random) -> Trace:
    """Bursty agents: 8 bursts of 3-5 agents, each 4-6 steps over chat, embed and vLLM."""
    t, pairs = 0.0, []
    for _ in range(8):
        t += rng.uniform(15.0, 35.0)
        for _agent in range(rng.randint(3, 5)):
            at = t + rng.uniform(0.0, 2.0)
            for _step in range(rng.randint(4, 6)):
                backend = rng.choices(("vllm", "chat", "embed"), weights=(4, 3, 3))[0]
                pairs.append((at, backend))
                at += rng.uniform(0.5, 2.5)
    return Trace("c", "bursty agents, 3 backends that fit", ("chat", "embed", "vllm"), _reqs(pairs))


def trace_d(rng: random.Random) -> Trace:
    """Everything at once: 140 requests ~2 s apart over four backends (30 GiB on 24)."""
    t, pairs = 0.0, []
    for _ in range(140):
        t += rng.expovariate(1 / 2.0)
        backend = rng.choices(("chat", "vllm", "embed", "image"), weights=(5, 3, 3, 1))[0]
        pairs.append((t, backend))
    return Trace(
        "d", "4 backends that cannot all fit", ("chat", "embed", "image", "vllm"), _reqs(pairs)
    )


def trace_h(rng: random.Random) -> Trace:
    """The household (bench/household.py): three Ollama models and ComfyUI on 32 GiB."""
    reqs = tuple(Req(a.at, a.backend, a.kind, a.model, a.work) for a in household.requests(rng))
    return Trace("h", "household, 32 GiB", ("ollama", "comfyui"), reqs, world="household")


TRACES: dict[str, Callable[[random.Random], Trace]] = {
    "a": trace_a,
    "b": trace_b,
    "c": trace_c,
    "d": trace_d,
    "h": trace_h,
}


def build_traces(keys: list[str], seed: int) -> list[Trace]:
    # One generator per trace, seeded from (seed, key): a trace never depends on the others.
    return [TRACES[k](random.Random(f"{seed}-{k}")) for k in keys]


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Record:
    req: Req
    status: int = 0
    queue_ms: float | None = None
    done: float | None = None  # measured seconds from the trace start
    error: str | None = None


@dataclass
class Result:
    trace: Trace
    policy: str
    scale: float
    records: list[Record]
    swaps: int
    swap_events: list[Swapped]
    ooms: int
    faults: list[str]
    total_s: float  # measured
    lag_p99_ms: float
    lag_max_ms: float
    counters: dict[str, Any] = field(default_factory=dict)

    @property
    def waits(self) -> list[float]:
        """Queue waits of the answered requests, measured seconds."""
        return [r.queue_ms / 1000 for r in self.records if r.queue_ms is not None]

    @property
    def latencies(self) -> list[float]:
        """Arrival to completion (ComfyUI: job finished), measured seconds."""
        return [r.done - r.req.at * self.scale for r in self.records if r.done is not None]

    @property
    def errors(self) -> int:
        return sum(1 for r in self.records if r.error) + len(self.faults)

    def pct(self, q: float) -> float:
        return percentile(self.waits, q)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def call_for(req: Req) -> tuple[str, str, dict[str, Any]]:
    """The service a request goes to, and the path and JSON body it is sent as."""
    if req.model:
        return (req.backend, *household.request(req.backend, req.kind, req.model, req.work))
    backend = BACKENDS[req.backend]
    if backend.service == "ollama":
        body = {"model": backend.model, "messages": [{"role": "user", "content": "hello"}]}
        return "ollama", "/api/chat", {**body, "stream": False}
    if backend.service == "vllm":
        body = {"model": backend.model, "messages": [{"role": "user", "content": "hi"}]}
        return "vllm", "/v1/chat/completions", body
    if backend.service == "generic":
        return "generic", "/generate", {"prompt": "embed me", "stream": False}
    return "comfyui", "/prompt", {"prompt": simple_workflow()}


async def send(client: httpx.AsyncClient, base: str, rec: Record, scale: float) -> None:
    """Send one request through the proxy; fill ``rec``."""
    service, path, body = call_for(rec.req)
    r = await client.post(base + path, json=body)
    rec.status = r.status_code
    header = r.headers.get("x-gpubroker-queue-ms")
    rec.queue_ms = float(header) if header is not None else None
    if r.status_code != 200:
        rec.error = f"{r.status_code} {r.text[:160]}"
        return
    if header is None:
        rec.error = "no X-GPUBroker-Queue-Ms header: the request took no lease"
        return
    data = r.json()
    if service == "ollama" and "error" in data:
        rec.error = f"ollama: {data['error'][:160]}"
    elif service == "vllm":
        choice = data["choices"][0]
        if choice["finish_reason"] == "abort" or "garbage" in choice["message"]["content"]:
            rec.error = f"vllm: bad answer {choice}"
    elif service == "comfyui":
        pid = data["prompt_id"]
        poll = max(0.005, HISTORY_POLL_REAL * scale)
        while not (history := (await client.get(f"{base}/history/{pid}")).json()):
            await anyio.sleep(poll)
        status = history[pid]["status"]
        if status["status_str"] != "success":
            rec.error = f"comfyui: {str(status.get('messages'))[-160:]}"


async def loop_lag(samples: list[float], stop: anyio.Event) -> None:
    """How late the event loop wakes a 10 ms sleeper: the bench's own timing noise."""
    while not stop.is_set():
        before = time.perf_counter()
        await anyio.sleep(0.01)
        samples.append(time.perf_counter() - before - 0.01)


@contextlib.asynccontextmanager
async def services(
    names: tuple[str, ...], gpu: SimGPU, scale: float
) -> AsyncIterator[tuple[dict[str, str], dict[str, EmulatedService]]]:
    """Start the emulators (vLLM first: it takes its memory at start-up)."""
    ordered = sorted(names, key=lambda n: n != "vllm")
    emus = {n: make_emulator(n, gpu, scale) for n in ordered}
    for name, emu in emus.items():
        have, declared = emulator_bytes(name, emu), BACKENDS[name].vram
        assert have == declared, f"{name}: emulator holds {have}, declares {declared}"
    async with contextlib.AsyncExitStack() as stack:
        urls = {n: await stack.enter_async_context(running(emus[n].app)) for n in ordered}
        yield urls, emus


def broker_top(
    policy: str, scale: float, *, capacity: int = CAPACITY, state_dir: str | None = None
) -> dict[str, Any]:
    top: dict[str, Any] = {
        "policy": policy,
        "telemetry": "none",  # schedule on the declared sizes: deterministic, no NVML probing
        "gpus": [{"id": 0, "memory": f"{capacity // GiB}GiB", "reserve": 0}],
        "holdTime": BROKER_REAL["holdTime"] * scale,
        "priorityAging": BROKER_REAL["priorityAging"] * scale,
        "queueTimeout": BROKER_REAL["queueTimeout"] * scale,
        "unloadTimeout": BROKER_REAL["unloadTimeout"] * scale,
        "telemetryInterval": max(0.1, BROKER_REAL["telemetryInterval"] * scale),  # 0.1: its floor
    }
    top["minResidency"] = (BROKER_REAL["minResidency"] if policy == "budget" else 0.0) * scale
    if state_dir is not None:  # learned footprints stay in this run
        top["stateDir"] = state_dir
    return top


@dataclass
class World:
    """One run's services and the broker's config for them."""

    gpu: SimGPU
    emus: dict[str, EmulatedService]
    config: Config
    plugins: Plugins | None = None


@contextlib.asynccontextmanager
async def bench_world(
    trace: Trace, policy: str, scale: float, state_dir: str
) -> AsyncIterator[World]:
    """Traces a-d: one emulator per backend of ``BACKENDS`` on 24 GiB."""
    gpu = SimGPU(CAPACITY, name="Simulated 24 GiB GPU")
    async with services(trace.backends, gpu, scale) as (urls, emus):
        cfg = make_config(
            {n: BACKENDS[n].config(urls[n], scale) for n in trace.backends},
            **broker_top(policy, scale, state_dir=state_dir),
        )
        yield World(gpu, emus, cfg)


@contextlib.asynccontextmanager
async def household_world(setup: str, scale: float, state_dir: str) -> AsyncIterator[World]:
    """Trace h: one Ollama (three models) and ComfyUI on 32 GiB, configured per ``setup``."""
    gpu = SimGPU(household.CAPACITY, name="Simulated 32 GiB GPU")
    emus = household.emulators(gpu, scale)
    async with contextlib.AsyncExitStack() as stack:
        urls = {n: await stack.enter_async_context(running(e.app)) for n, e in emus.items()}
        backends = household.backends(setup, urls, BROKER_REAL["startTimeout"] * scale)
        top = broker_top("budget", scale, capacity=household.CAPACITY, state_dir=state_dir)
        yield World(gpu, emus, make_config(backends, **top), household.plugins(setup))


async def run_one(trace: Trace, policy: str, scale: float) -> Result:
    """``trace`` under ``policy`` (trace h: a setup of ``household.SETUPS``), each run with
    fresh emulators, GPU, broker and state directory."""
    with tempfile.TemporaryDirectory(prefix="gpubroker-bench-") as state_dir:
        if trace.household:
            world = household_world(policy, scale, state_dir)
        else:
            world = bench_world(trace, policy, scale, state_dir)
        async with world as w:
            return await replay(trace, policy, scale, w)


async def replay(trace: Trace, policy: str, scale: float, world: World) -> Result:
    records = [Record(req) for req in trace.requests]
    events: list[Swapped] = []
    lag: list[float] = []
    gpu, emus = world.gpu, world.emus
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with (
        broker_running(world.config, world.plugins) as ep,
        httpx.AsyncClient(timeout=600, limits=limits, trust_env=False) as client,
    ):
        assert ep.bus is not None
        ep.bus.subscribe(lambda e: events.append(e) if isinstance(e, Swapped) else None)
        stop = anyio.Event()
        t0 = anyio.current_time()

        async def one(rec: Record) -> None:
            await anyio.sleep_until(t0 + rec.req.at * scale)
            try:
                await send(client, ep.proxies[rec.req.backend], rec, scale)
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                rec.error = f"{type(exc).__name__}: {exc}"
            rec.done = anyio.current_time() - t0

        async with anyio.create_task_group() as tg:
            tg.start_soon(loop_lag, lag, stop)
            async with anyio.create_task_group() as requests:
                for rec in records:
                    requests.start_soon(one, rec)
            stop.set()
        total = max((r.done or 0.0) for r in records)
        status = (await client.get(ep.status_url + "/")).json()
    faults = []
    vllm = emus.get("vllm")
    if isinstance(vllm, VLLMEmulator):
        if vllm.sleep_with_inflight:
            faults.append(f"vLLM slept with requests in flight x{vllm.sleep_with_inflight}")
        if vllm.requests_while_asleep:
            faults.append(f"vLLM got requests while asleep x{vllm.requests_while_asleep}")
    for name, emu in emus.items():  # real Ollama spills to the CPU where it would OOM
        if isinstance(emu, OllamaEmulator) and emu.cpu_offloads:
            faults.append(f"{name} loaded partly on the CPU x{emu.cpu_offloads}")
        if isinstance(emu, OllamaEmulator) and emu.reloads:
            faults.append(f"{name} reloaded a runner for other options x{emu.reloads}")
    embed = emus.get("embed")
    if isinstance(embed, GenericEmulator) and embed.unload_with_inflight:
        faults.append(f"embed unloaded with requests in flight x{embed.unload_with_inflight}")
    if status["swapCount"] != len(events):
        faults.append(f"swapCount {status['swapCount']} != {len(events)} swap events")
    counters = {n: {k: getattr(e, k) for k in COUNTERS if hasattr(e, k)} for n, e in emus.items()}
    lag_ms = sorted(x * 1000 for x in lag) or [0.0]
    return Result(
        trace=trace,
        policy=policy,
        scale=scale,
        records=records,
        swaps=status["swapCount"],
        swap_events=events,
        ooms=gpu.oom_count,
        faults=faults,
        total_s=total,
        lag_p99_ms=percentile(lag_ms, 99),
        lag_max_ms=lag_ms[-1],
        counters=counters,
    )


# --- report ----------------------------------------------------------------------------------


def table(results: list[Result], *, real: bool) -> str:
    unit = "real-equivalent s" if real else "s as measured"
    lines = [
        "| trace | policy | requests | swaps | total time | p50 wait | p95 wait | max wait "
        "| p95 latency | OOMs | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        k = 1 / r.scale if real else 1.0
        lines.append(
            f"| {r.trace.key}. {r.trace.title} | {r.policy} | {len(r.records)} | {r.swaps} "
            f"| {r.total_s * k:.1f} | {r.pct(50) * k:.2f} | {r.pct(95) * k:.2f} "
            f"| {r.pct(100) * k:.2f} | {percentile(r.latencies, 95) * k:.2f} | {r.ooms} "
            f"| {r.errors} |"
        )
    return f"times in {unit}\n\n" + "\n".join(lines)


def ratio(a: float, b: float) -> str:
    if b == 0:
        return "n/a" if a == 0 else "inf"
    return f"{a / b:.2f}"


def check(results: list[Result]) -> list[str]:
    """Every missed target, as a sentence; empty when all are met."""
    missed: list[str] = []
    for r in results:
        where = f"{r.trace.key}/{r.policy}"
        if r.ooms:
            missed.append(f"{where}: {r.ooms} OOMs")
        if r.errors:
            missed.append(f"{where}: {r.errors} errors")
        worst = r.pct(100) / r.scale
        bound = household.MAX_WAIT_BOUND if r.trace.household else MAX_WAIT_BOUND
        if worst > bound:
            missed.append(f"{where}: max wait {worst:.1f} s > bound {bound:.0f} s")
    by = {(r.trace.key, r.policy): r for r in results}
    for r in results:  # trace h: model-level units against the backend-level setup
        base = by.get((r.trace.key, "backend"))
        if not r.trace.household or base is None or r.policy == "backend":
            continue
        where = f"{r.trace.key}/{r.policy}"
        if not (base.swaps > 0 and 2 * r.swaps <= base.swaps):
            missed.append(f"{where}: swaps {r.swaps} not <= half of backend's {base.swaps}")
        if not (base.pct(95) > 0 and 2 * r.pct(95) <= base.pct(95)):
            missed.append(
                f"{where}: p95 wait {r.pct(95) / r.scale:.2f} s not <= half of backend's "
                f"{base.pct(95) / base.scale:.2f} s"
            )
    for key in TARGET_TRACES:
        ex, bu = by.get((key, "exclusive")), by.get((key, "budget"))
        if ex is None or bu is None:
            continue
        if not (ex.swaps > 0 and 2 * bu.swaps <= ex.swaps):
            missed.append(f"{key}: budget swaps {bu.swaps} not <= half of exclusive {ex.swaps}")
        if not bu.pct(95) < ex.pct(95):
            missed.append(
                f"{key}: budget p95 wait {bu.pct(95) / bu.scale:.2f} s not below "
                f"exclusive {ex.pct(95) / ex.scale:.2f} s"
            )
    return missed


def details(r: Result) -> str:
    pairs = Counter(f"{','.join(e.evicted)}->{e.backend}" for e in r.swap_events)
    swap_s = [e.total for e in r.swap_events]
    swap_txt = ", ".join(f"{k} x{v}" for k, v in pairs.most_common()) or "none"
    mean = sum(swap_s) / len(swap_s) / r.scale if swap_s else 0.0
    by_backend = []
    names = list(r.trace.backends)
    if r.trace.household:  # by model (or workflow)
        names = list(dict.fromkeys(x.req.model for x in r.records))
    for name in names:
        mine = [x for x in r.records if name in (x.req.model or x.req.backend,)]
        waits = [x.queue_ms / 1000 for x in mine if x.queue_ms]
        worst = max(waits, default=0.0) / r.scale
        by_backend.append(
            f"{name} n={len(mine)} p95 {percentile(waits, 95) / r.scale:.1f}s max {worst:.1f}s"
        )
    errors = [f"{x.req.backend}@{x.req.at:.0f}s: {x.error}" for x in r.records if x.error]
    text = (
        f"  {r.trace.key}/{r.policy}: swaps {swap_txt}; mean swap {mean:.1f} s real-eq; "
        f"{'; '.join(by_backend)}; emulators {r.counters}; "
        f"event-loop lag p99 {r.lag_p99_ms:.1f} ms, max {r.lag_max_ms:.1f} ms measured"
    )
    for line in [*r.faults, *errors[:5]]:
        text += f"\n    ! {line}"
    return text


def dump(results: list[Result], path: str) -> None:
    """Every request's record as JSON lines, times real-equivalent."""
    rows = []
    for r in results:
        for x in r.records:
            wait = None if x.queue_ms is None else x.queue_ms / 1000 / r.scale
            done = None if x.done is None else x.done / r.scale
            row: dict[str, Any] = {"trace": r.trace.key, "policy": r.policy}
            row["backend"] = x.req.backend
            if x.req.model:
                row["model"] = x.req.model
            row.update(at=x.req.at, status=x.status, wait=wait, done=done, error=x.error)
            rows.append(row)
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def scale_polls(scale: float) -> list[str]:
    """Scale the broker's fixed poll intervals with the rest of the world; say what changed."""
    notes = []
    for module, attr, real in (
        (broker_module, "IDLE_POLL", IDLE_POLL_REAL),
        (strategies_module, "POLL_INTERVAL", CONFIRM_POLL_REAL),
    ):
        if hasattr(module, attr):
            setattr(module, attr, max(0.002, real * scale))
            notes.append(f"{module.__name__}.{attr} {real:g}s -> {getattr(module, attr):g}s")
        else:
            notes.append(f"{module.__name__}.{attr} not found: left unscaled")
    return notes


async def main_async(args: argparse.Namespace) -> int:
    scale: float = args.scale
    traces = build_traces(args.traces, args.seed)
    started = time.perf_counter()
    print(f"# gpubroker scheduling bench: scale {scale:g} (1 s real = {scale * 1000:g} ms here)")
    print(
        "world (real-world seconds, x scale): "
        + ", ".join(f"{k} {v:g}" for k, v in REAL.items() if k != "vllm_start")
    )
    exclusive, budget = broker_top("exclusive", 1.0), broker_top("budget", 1.0)
    print(
        "broker config: the defaults, untuned, x scale in the run: "
        f"holdTime {budget['holdTime']:g}s, minResidency "
        f"{budget['minResidency']:g}s (budget) / {exclusive['minResidency']:g}s (exclusive), "
        f"priorityAging {budget['priorityAging']:g}s, queueTimeout {budget['queueTimeout']:g}s, "
        f"unloadTimeout {budget['unloadTimeout']:g}s; polls scaled too: "
        + "; ".join(scale_polls(scale))
    )
    print(
        f"GPU: one simulated {CAPACITY // GiB} GiB card, reserve 0, telemetry none (the broker "
        "schedules on declared sizes); backends (declared vram = "
        "emulator allocation): "
        + ", ".join(f"{n} {d.vram // GiB} GiB ({d.what})" for n, d in BACKENDS.items())
    )
    if any(t.household for t in traces):
        print(household.describe() + f"; setups {', '.join(args.setups)}")
    for t in traces:
        span = t.requests[-1].at if t.requests else 0.0
        mix = Counter(r.model or r.backend for r in t.requests)
        print(
            f"trace {t.key}. {t.title}: {len(t.requests)} requests over {span:.0f} s real "
            f"({', '.join(f'{k} {v}' for k, v in mix.items())})"
        )
    results: list[Result] = []
    for t in traces:
        for policy in args.setups if t.household else args.policies:
            t_run = time.perf_counter()
            result = await run_one(t, policy, scale)
            results.append(result)
            print(
                f"  ran {t.key}/{policy} in {time.perf_counter() - t_run:.1f} s: "
                f"{result.swaps} swaps, {result.ooms} OOMs, {result.errors} errors",
                flush=True,
            )
    print("\n## Real-equivalent (measured / scale)\n")
    print(table(results, real=True))
    print(f"\n## As measured at scale {scale:g}\n")
    print(table(results, real=False))
    if args.dump:
        dump(results, args.dump)
        print(f"\nper-request records (real-equivalent seconds) written to {args.dump}")
    by = {(r.trace.key, r.policy): r for r in results}
    if any((t.key, p) in by for t in traces for p in POLICIES):
        print("\n## budget / exclusive\n")
    for t in traces:
        ex, bu = by.get((t.key, "exclusive")), by.get((t.key, "budget"))
        if ex is None or bu is None:
            continue
        print(
            f"- {t.key}. {t.title}: swaps {bu.swaps}/{ex.swaps} = {ratio(bu.swaps, ex.swaps)}, "
            f"p95 wait {bu.pct(95) / scale:.2f}/{ex.pct(95) / scale:.2f} s = "
            f"{ratio(bu.pct(95), ex.pct(95))}, total time {ratio(bu.total_s, ex.total_s)}"
            + (" (target: <= 0.5 swaps, < 1 p95)" if t.key in TARGET_TRACES else "")
        )
    household_ratios(results)
    if args.verbose or any(r.errors or r.ooms for r in results):
        print("\n## Details\n")
        for r in results:
            print(details(r))
    missed = check(results)
    print(f"\nbench took {time.perf_counter() - started:.0f} s")
    if missed:
        print("TARGETS MISSED:\n" + "\n".join(f"  - {m}" for m in missed))
        return 1
    met = [f"{k} budget <= 1/2 swaps and lower p95 wait" for k in TARGET_TRACES if k in args.traces]
    if "h" in args.traces:
        met.append("h units <= 1/2 the swaps and p95 wait of backend")
    met.append("everywhere 0 OOMs, 0 errors")
    if any(k != "h" for k in args.traces):
        met.append(f"max wait <= {MAX_WAIT_BOUND:.0f} s on a-d")
    if "h" in args.traces:
        met.append(f"max wait <= {household.MAX_WAIT_BOUND:.0f} s on h")
    print("targets met: " + "; ".join(met))
    return 0


def household_ratios(results: list[Result]) -> None:
    """Trace h: each model-level setup against the backend-level one, and the services' own
    counters (Ollama's loads, unloads, CPU offloads, reloads; ComfyUI's file loads)."""
    by = {r.policy: r for r in results if r.trace.household}
    base = by.get("backend")
    if not by:
        return
    print("\n## h: model-level units / backend level\n")
    for r in by.values():
        if base is not None and r is not base:
            print(
                f"- h/{r.policy}: swaps {r.swaps}/{base.swaps} = {ratio(r.swaps, base.swaps)}, "
                f"p95 wait {r.pct(95) / r.scale:.2f}/{base.pct(95) / base.scale:.2f} s = "
                f"{ratio(r.pct(95), base.pct(95))}, max wait {r.pct(100) / r.scale:.2f}/"
                f"{base.pct(100) / base.scale:.2f} s (target: <= 0.5 swaps, <= 0.5 p95)"
            )
    for r in by.values():
        print(f"- h/{r.policy} services: {r.counters}; faults: {r.faults or 'none'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_SCALE,
        help=f"multiply every real-world time by this (default {DEFAULT_SCALE})",
    )
    p.add_argument("--traces", default="a,b,c,d,h", help="which traces, e.g. a,c")
    p.add_argument("--policies", default=",".join(POLICIES), help="exclusive,budget (a-d)")
    p.add_argument(
        "--setups",
        default=",".join(household.DEFAULT_SETUPS),
        help=f"trace h's setups, of {','.join(household.SETUPS)}",
    )
    p.add_argument("--seed", type=int, default=4, help="trace seed (default 4)")
    p.add_argument("--dump", metavar="FILE", help="write every request's record as JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="per-run swap and wait details")
    args = p.parse_args(argv)
    args.traces = [t.strip() for t in args.traces.split(",") if t.strip()]
    args.policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    args.setups = [x.strip() for x in args.setups.split(",") if x.strip()]
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    if unknown := [t for t in args.traces if t not in TRACES]:
        p.error(f"unknown trace(s) {unknown}; known: {', '.join(TRACES)}")
    if unknown := [x for x in args.policies if x not in POLICIES]:
        p.error(f"unknown policy {unknown}; known: {', '.join(POLICIES)}")
    if unknown := [x for x in args.setups if x not in household.SETUPS]:
        p.error(f"unknown setup {unknown}; known: {', '.join(household.SETUPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    return anyio.run(main_async, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
