"""Trace h of ``bench/scheduling.py``: the household of ``bench/replay_traces.py`` (H), end to
end over real sockets, under model-level units and under the backend-level setup a user had
to write before them.

The world (real-world seconds and bytes; ``bench/scheduling.py`` multiplies times by
``--scale``), one 32 GiB GPU shared by two services:

- one Ollama hosting three models, sized the way Ollama sizes them
  (:class:`~gpubroker.sim.ollama_models.SimModel`: weights + KV cache at the Modelfile's
  ``num_ctx`` 8192 + the compute buffer; ``/api/show`` carries their ``model_info``, so the
  broker's strategy can estimate each request): an 8B chat model (llama3.1:8b Q4_K_M, 4.9 GB
  file, ~6.1 GiB loaded, ~5 s cold load), a 14B reasoning model (qwen3:14b Q4_K_M, 9.3 GB,
  ~10.5 GiB, ~8 s) and an embedding model (nomic-embed-text, 274 MB, ~0.6 GiB, ~1 s). Load
  times and sizes are ``replay_traces``' (cold load at ~2 GiB/s + ~1 s), shapes the models'
  published configs. ``OLLAMA_NUM_PARALLEL`` 1 (Ollama's default) and ``OLLAMA_KEEP_ALIVE``
  -1: behind a broker the household lets the broker decide what stays (as ``replay.py``,
  which models no keep-alive);
- ComfyUI with mostly SDXL Lightning images (4 steps, one 6.9 GB checkpoint, ~3 s a job,
  ~4 s to load) and now and then a Flux.1-dev image (fp8 UNET 11.9 GB, T5-XXL fp16 9.8 GB,
  CLIP-L, VAE: ~20.7 GiB of files, ~15 s to load them all, 15-30 steps at ~2 s). Activations
  are what ComfyUI itself reserves for sampling (comfy/model_base.py
  ``BaseModel.memory_required`` with PyTorch attention, called by comfy/sampler_helpers.py
  ``estimate_memory``: 2 x latent area x dtype size x 0.01 x the model's
  ``memory_usage_factor`` MiB, comfy/supported_models.py: SDXL 0.8, Flux 3.1; Comfy-Org/ComfyUI
  a125cd84b054), at 1024x1024: ~0.5 GiB for SDXL, ~1.9 GiB for Flux.

The two setups (``bench/scheduling.py`` runs each with fresh emulators, GPU, broker, state):

- ``units``: ``policy: budget``; Ollama's models are units of their own (``backend/model``)
  with their ``vram`` declared as ``ollama ps`` shows it and the chat model ``pinned``;
  ComfyUI declares each model file under ``models:`` with its ``vram``, so a workflow is
  sized by the files it names. ``units-est`` is the same without Ollama's sizes: the
  strategy's estimates (from ``/api/show``) size each model;
- ``backend``: what had to be written before model-level units: Ollama one unit at the
  worst case a user must declare (all three models loaded together), ComfyUI one unit at its
  heaviest workflow (Flux), no per-file sizes. Ollama is made one unit by a bench-only
  strategy, :class:`WholeOllama`, registered as a plugin is (no config knob for it).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from gpubroker.plugins.manager import Plugins, Provided, create_plugins
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.plugins.strategies.ollama import OllamaStrategy
from gpubroker.sim import (
    ComfyUIEmulator,
    GiB,
    MiB,
    OllamaEmulator,
    SimGPU,
    flux_workflow,
    simple_workflow,
)
from gpubroker.sim.ollama_models import ModelShape, SimModel, footprint, runner_options
from gpubroker.sim.service import EmulatedService

CAPACITY = 32 * GiB
SETUPS = ("backend", "units", "units-est")
DEFAULT_SETUPS = ("backend", "units")
HORIZON = 3600.0  # real seconds: an hour of the household
MAX_WAIT_BOUND = 120.0
"""Real-equivalent seconds. A Flux job computes up to a minute after ~15 s of loading and
cannot be preempted, so whatever must make room for or after it may wait that long, plus a
hold; 120 s is the broker's default queueTimeout (what waits longer is refused) and the bound
``bench/replay.py`` uses for the same reason."""

# --- Ollama --------------------------------------------------------------------------------

CHAT, REASON, EMBED = "llama3.1:8b", "qwen3:14b", "nomic-embed-text:latest"
_CTX = {"num_ctx": 8192}  # the Modelfile's PARAMETER num_ctx (replay_traces: 8k context)
MODELS: dict[str, SimModel] = {
    # Llama 3.1 8B: 32 layers, 4096 wide, 32 heads, 8 KV heads (ModelShape's default).
    CHAT: SimModel(int(4.92e9), ModelShape(), parameters=_CTX),
    # Qwen3-14B config.json: 40 layers, 5120, 40 heads, 8 KV heads of 128, 151936 tokens.
    REASON: SimModel(
        int(9.28e9), ModelShape("qwen3", 40, 5120, 40, 8, 128, 128, 40960, 151936), parameters=_CTX
    ),
    # nomic-embed-text v1.5 (nomic-bert): 12 layers, 768, 12 heads, 2048 context.
    EMBED: SimModel(
        int(0.274e9),
        ModelShape("nomic-bert", 12, 768, 12, 12, 64, 64, 2048, 30528),
        parameters=_CTX,
        capabilities=("embedding",),
    ),
}
LOAD_S = {CHAT: 5.0, REASON: 8.0, EMBED: 1.0}
OLLAMA_UNLOAD_S = 0.5  # bench/scheduling.py REAL["ollama_unload"]
TOKEN_S = 0.2  # one emulated token; a reply of ``work`` seconds is work / TOKEN_S tokens
EMBED_S = TOKEN_S  # the emulator computes one embedding call in one token's time


def runner_bytes(model: str) -> int:
    """What a runner of ``model`` takes once loaded (``ollama ps``), on this GPU."""
    entry = MODELS[model]
    opts = runner_options(entry, {}, default_ctx=32768, parallel=1)
    return footprint(entry, opts, parallel=1, cache_type="").total


class HouseOllama(OllamaEmulator):
    """The Ollama emulator with a cold-load time per model (a 14B takes longer than an
    embedder). Its scheduler task loads one model at a time, so setting the time just before
    each load is safe."""

    def __init__(self, gpu: SimGPU, scale: float) -> None:
        super().__init__(
            gpu,
            MODELS,
            unload_seconds=OLLAMA_UNLOAD_S * scale,
            token_interval=TOKEN_S * scale,
            keep_alive=-1,
            num_parallel=1,
        )
        self._load_s = {m: s * scale for m, s in LOAD_S.items()}

    async def _schedule(self, p: Any) -> None:
        self.load_seconds = self._load_s[p.name]
        await super()._schedule(p)


# --- ComfyUI -------------------------------------------------------------------------------

SDXL = "sdxl_lightning_4step.safetensors"
FLUX_UNET, T5, CLIP_L, FLUX_VAE = (
    "flux1-dev-fp8.safetensors",
    "t5xxl_fp16.safetensors",
    "clip_l.safetensors",
    "ae.safetensors",
)
FILES = {  # bytes on the GPU (the files' sizes) and cold-load seconds
    SDXL: (int(6.94e9), 4.0),
    FLUX_UNET: (int(11.9e9), 8.0),
    T5: (int(9.79e9), 5.0),
    CLIP_L: (int(0.246e9), 1.0),
    FLUX_VAE: (int(0.335e9), 1.0),
}
FLUX_FILES = (FLUX_UNET, T5, CLIP_L, FLUX_VAE)
SDXL_STEPS = 4  # SDXL Lightning 4-step
STEP_S = {"sdxl": 0.75, "flux": 2.0}  # real seconds per sampling step at 1024x1024
MEMORY_FACTOR = {"sdxl": 0.8, "flux": 3.1}  # comfy/supported_models.py memory_usage_factor


def activations(family: str, side: int = 1024) -> int:
    """comfy/model_base.py BaseModel.memory_required for a ``side``^2 image, batch 1 (x2 for
    the conditional and unconditional pass), 2-byte compute dtype, PyTorch attention."""
    area = 2 * (side // 8) * (side // 8)
    return int(area * 2 * 0.01 * MEMORY_FACTOR[family] * MiB)


def workflow_bytes(files: Sequence[str], family: str) -> int:
    return sum(FILES[f][0] for f in files) + activations(family)


class HouseComfyUI(ComfyUIEmulator):
    """The ComfyUI emulator with a load time per file, and activations and a step time per
    model family (the emulator's are one figure each). Its worker runs one prompt at a time,
    so setting them as each prompt starts is safe."""

    def __init__(self, gpu: SimGPU, scale: float) -> None:
        super().__init__(
            gpu,
            model_size=FILES[SDXL][0],
            model_sizes={f: size for f, (size, _) in FILES.items()},
        )
        self.scale = scale

    async def _execute(self, job: Any) -> None:
        family = "flux" if any(FLUX_UNET in str(n) for n in job.prompt.values()) else "sdxl"
        steps = sum(self._steps_of(n) for n in job.prompt.values() if _samples(n))
        self.job_seconds = max(steps, 1) * STEP_S[family] * self.scale
        self.work_size = activations(family)
        await super()._execute(job)

    async def _load(self, files: Sequence[tuple[str, str]], busy: set[str]) -> None:
        for one in files:
            self.load_seconds = FILES.get(one[0], (0, 4.0))[1] * self.scale
            await super()._load([one], busy)


def _samples(node: Any) -> bool:
    """A node whose steps count: the emulator's samplers (class name with ``Sampler``), or
    Flux's BasicScheduler, which holds the steps its SamplerCustomAdvanced runs."""
    if not isinstance(node, Mapping):
        return False
    kind = str(node.get("class_type", ""))
    return kind == "BasicScheduler" or ("Sampler" in kind and "steps" in node.get("inputs", {}))


# --- the two setups ------------------------------------------------------------------------


class WholeOllama(OllamaStrategy):
    """Ollama as one unit, as before model-level units: frees every model at once, reads no
    request's demand. Bench-only; registered as a plugin strategy is."""

    name = "bench-ollama-whole"
    description = "bench: Ollama as one unit (unload all), no model units, no estimates"
    per_model: ClassVar[bool] = False
    demand = Strategy.demand


def plugins(setup: str) -> Plugins | None:
    if setup != "backend":
        return None
    out = create_plugins(env={}, entry_points=False)
    out.strategies[WholeOllama.name] = Provided(
        WholeOllama.name, WholeOllama, "bench-household", "bench", "0", WholeOllama.description
    )
    return out


def emulators(gpu: SimGPU, scale: float) -> dict[str, EmulatedService]:
    return {"ollama": HouseOllama(gpu, scale), "comfyui": HouseComfyUI(gpu, scale)}


def worst_cases() -> tuple[int, int]:
    """What a backend-level user declares: Ollama with every model loaded, ComfyUI at Flux;
    rounded up to whole GiB, as one writes ``vram: 18GiB``."""
    ollama = sum(runner_bytes(m) for m in MODELS)
    comfy = max(workflow_bytes(FLUX_FILES, "flux"), workflow_bytes([SDXL], "sdxl"))
    return -(-ollama // GiB) * GiB, -(-comfy // GiB) * GiB


def backends(setup: str, urls: Mapping[str, str], start_timeout: float) -> dict[str, Any]:
    """The config of each backend in ``setup`` (``bench/scheduling.py`` adds the top keys)."""
    ollama: dict[str, Any] = {"upstream": urls["ollama"], "startTimeout": start_timeout}
    comfy: dict[str, Any] = {
        "upstream": urls["comfyui"],
        "unloadStrategy": "comfyui",
        "startTimeout": start_timeout,
    }
    if setup == "backend":
        whole_ollama, whole_comfy = worst_cases()
        ollama.update(unloadStrategy=WholeOllama.name, classifier="ollama", vram=whole_ollama)
        comfy["vram"] = whole_comfy
        return {"ollama": ollama, "comfyui": comfy}
    ollama["unloadStrategy"] = "ollama"
    sized = setup == "units"
    ollama["models"] = [
        {"name": m, "pinned": m == CHAT, **({"vram": runner_bytes(m)} if sized else {})}
        for m in (MODELS if sized else [CHAT])
    ]
    comfy["models"] = [{"name": f, "vram": size} for f, (size, _) in FILES.items()]
    return {"ollama": ollama, "comfyui": comfy}


def describe() -> str:
    """One line on the world, for the bench's header."""
    ollama, comfy = worst_cases()
    models = ", ".join(f"{m} {runner_bytes(m) / GiB:.1f}" for m in MODELS)
    flux = workflow_bytes(FLUX_FILES, "flux") / GiB
    sdxl = workflow_bytes([SDXL], "sdxl") / GiB
    return (
        f"trace h world: one {CAPACITY // GiB} GiB card; Ollama ({models} GiB loaded; "
        f"backend setup declares {ollama // GiB} GiB), ComfyUI (SDXL Lightning {sdxl:.1f} GiB, "
        f"Flux {flux:.1f} GiB with activations; backend setup declares {comfy // GiB} GiB)"
    )


# --- the trace -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One request of the household: when, where, what it names, how long it computes."""

    at: float
    backend: str  # ollama | comfyui
    kind: str  # chat | embed | image
    model: str  # an Ollama model, or "sdxl" / "flux"
    work: float  # real seconds of compute once loaded


def requests(rng: random.Random, horizon: float = HORIZON) -> list[Ask]:
    """The household's busiest stretch, ``replay_traces.household``'s activities at its rates:
    a chat every ~4 min (half of them after 1-3 RAG lookups), an indexing burst of 10-40
    embeddings every ~20 min, image sessions of 1-6 SDXL images every ~30 min; and its two
    rare ones, a reasoning burst (3-8 long answers, ~every 2 h) and a Flux session (1-2
    images, ~every 3 h), once each at a random time."""
    out: list[Ask] = []

    def add(at: float, backend: str, kind: str, model: str, work: float) -> None:
        if 0.0 <= at < horizon:
            out.append(Ask(round(at, 3), backend, kind, model, round(work, 3)))

    def poisson(gap: float) -> list[float]:
        t, times = 0.0, []
        while (t := t + rng.expovariate(1.0 / gap)) < horizon:
            times.append(t)
        return times

    def burst(start: float, count: tuple[int, int], gap: tuple[float, float]) -> list[float]:
        t, times = start, []
        for _ in range(rng.randint(*count)):
            times.append(t)
            t += rng.uniform(*gap)
        return times

    for t in poisson(240.0):
        add(t, "ollama", "chat", CHAT, rng.uniform(3.0, 10.0))
        if rng.random() < 0.5:
            for s in burst(t - 1.5, (1, 3), (0.2, 0.5)):
                add(s, "ollama", "embed", EMBED, EMBED_S)
    for t in poisson(1200.0):
        for s in burst(t, (10, 40), (0.5, 2.0)):
            add(s, "ollama", "embed", EMBED, EMBED_S)
    for t in poisson(1800.0):
        for s in burst(t, (1, 6), (5.0, 30.0)):
            add(s, "comfyui", "image", "sdxl", SDXL_STEPS * STEP_S["sdxl"])
    for s in burst(rng.uniform(0.0, 0.5) * horizon, (3, 8), (30.0, 180.0)):
        add(s, "ollama", "chat", REASON, rng.uniform(15.0, 60.0))
    for s in burst(rng.uniform(0.1, 0.7) * horizon, (1, 2), (60.0, 120.0)):
        add(s, "comfyui", "image", "flux", round(rng.uniform(30.0, 60.0) / STEP_S["flux"]) * 2.0)
    return sorted(out, key=lambda a: a.at)


def request(backend: str, kind: str, model: str, work: float) -> tuple[str, dict[str, Any]]:
    """The path and JSON body a request of the trace is sent as."""
    if kind == "embed":
        return "/api/embed", {"model": model, "input": "what did we say about the GPU?"}
    if backend == "ollama":
        tokens = max(1, round(work / TOKEN_S))
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "stream": False,
            "options": {"num_predict": tokens},
        }
        return "/api/chat", body
    if model == "flux":
        steps = max(1, round(work / STEP_S["flux"]))
        prompt = flux_workflow(FLUX_UNET, (T5, CLIP_L), FLUX_VAE, steps=steps)
    else:
        prompt = simple_workflow(steps=SDXL_STEPS, ckpt=SDXL)
    return "/prompt", {"prompt": prompt}
