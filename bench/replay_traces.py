"""The worlds and the days of traffic ``bench/replay.py`` replays (deterministic for a seed).

A :class:`Trace` is one GPU, the backends on it (what each can load, at its declared and its
true size, and how long that takes) and a list of :class:`Request`. Every number is stated
where it is set; the rule of thumb behind the load times is a cold load from the page cache or
an NVMe disk at ~2 GiB/s plus ~1 s of start-up, checked against the figures already used by
``bench/scheduling.py`` (Ollama 8B ~5 s, ComfyUI SDXL ~4 s, vLLM wake ~2 s) and the issue's
Flux ~15 s. Declared sizes are what a user would write in ``vram:``; true sizes are what the
service really allocates (weights + KV cache at the context used + compute buffers), and the
two differ a little, as they do.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

GiB = 2**30
Kind = Literal["ollama", "comfyui", "whole"]


def gib(x: float) -> int:
    return int(x * GiB)


@dataclass(frozen=True, slots=True)
class Item:
    """Something a service loads: an Ollama model, a ComfyUI workflow's files, a whole service."""

    name: str
    declared: int  # bytes the user declares for it (vram:)
    true: int  # bytes it really takes on the GPU
    load_s: float  # cold load


@dataclass(frozen=True, slots=True)
class Backend:
    """A service on the GPU. ``kind``: ``ollama`` loads and frees models one by one, on request
    (so its model units are the broker's units at model level); ``comfyui`` loads the files a
    workflow names, on request, and keeps them cached until freed; ``whole`` is loaded as a
    whole by the broker's Load (a vLLM wake), and ``items`` holds just that one."""

    name: str
    kind: Kind
    items: tuple[Item, ...]
    declared: int  # the backend's own ``vram:`` at backend level (largest model + margin...)
    unload_s: float  # a model unloaded (Ollama keep_alive 0), ComfyUI /free, a vLLM sleep
    wake_s: float = 0.0  # the broker's Load: 0 where the service loads on request
    cost: int = 2  # BackendSpec.cost: 1 sleeps and wakes in seconds, 2 a cold load
    sleeps: bool = False
    pinned: tuple[str, ...] = ()  # items the user wants always resident (pinned: true)

    def item(self, name: str) -> Item:
        return next(i for i in self.items if i.name == name)


@dataclass(frozen=True, slots=True)
class Request:
    """One GPU request: when it arrives, which backend and item (model, or workflow files) it
    asks for, how long it computes once its item is loaded, and optionally what it asks of
    its unit (``need``: bytes, e.g. a longer context), as the broker's strategy would read it."""

    at: float
    backend: str
    item: str
    service_s: float
    need: int | None = None


@dataclass(frozen=True, slots=True)
class Trace:
    key: str
    title: str
    capacity: int
    backends: tuple[Backend, ...]
    requests: tuple[Request, ...]
    # (from, until, bytes): memory a process nobody owns holds (a game, Blender)
    unowned: tuple[tuple[float, float, int], ...] = ()
    targets: bool = False  # the targets vs backend level apply to this trace
    notes: tuple[str, ...] = field(default_factory=tuple)

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)


# --- building blocks ---------------------------------------------------------------------------


class Day:
    """Collects requests over a horizon of ``hours`` from one seeded RNG."""

    def __init__(self, seed: int, hours: float) -> None:
        self.rng = random.Random(seed)
        self.horizon = hours * 3600.0
        self.out: list[Request] = []

    def poisson(self, mean_gap: float) -> list[float]:
        """Arrival times of a Poisson process with ``mean_gap`` seconds between events."""
        t, times = 0.0, list[float]()
        while True:
            t += self.rng.expovariate(1.0 / mean_gap)
            if t >= self.horizon:
                return times
            times.append(t)

    def add(
        self, at: float, backend: str, item: str, service_s: float, need: int | None = None
    ) -> None:
        if 0.0 <= at < self.horizon:
            self.out.append(Request(at, backend, item, service_s, need))

    def burst(
        self,
        start: float,
        count: tuple[int, int],
        gap: tuple[float, float],
        each: Callable[[float], None],
    ) -> None:
        """``each(t)`` for a burst of ``count`` events spaced by ``gap`` seconds from ``start``."""
        t = start
        for _ in range(self.rng.randint(*count)):
            each(t)
            t += self.rng.uniform(*gap)

    def requests(self) -> tuple[Request, ...]:
        return tuple(sorted(self.out, key=lambda r: r.at))


# --- the world's items -------------------------------------------------------------------------
# Ollama (Q4_K_M GGUF): weights + KV cache at 8k context + compute graph; load = size / ~2 GiB/s
# + ~1 s. 8B: 4.9 GB file, 1 GiB KV -> ~6.2 GiB, ~5 s (bench/scheduling.py's REAL figure).
# 14B: 9 GB file, ~1.5 GiB KV -> ~11.4 GiB, ~8 s. nomic-embed-text: 0.3 GB, ~0.6 GiB, ~1 s.
CHAT_8B = Item("llama3.1:8b", gib(6), gib(6.2), 5.0)
REASON_14B = Item("qwen3:14b", gib(11), gib(11.4), 8.0)
EMBED = Item("nomic-embed-text", gib(1), gib(0.6), 1.0)
# ComfyUI: SDXL Lightning (6.9 GB fp16 checkpoint + VAE decode at 1024^2) ~7.2 GiB, ~4 s (the
# issue, bench/scheduling.py); Flux.1-dev fp8 (12 GB unet + 5 GB t5xxl + clip + vae, and its
# activations) ~21.3 GiB, ~15 s (the issue).
SDXL = Item("sdxl-lightning", gib(7), gib(7.2), 4.0)
FLUX = Item("flux1-dev", gib(22), gib(21.3), 15.0)
OLLAMA_UNLOAD_S = 0.5  # keep_alive 0: the runner process exits (bench/scheduling.py)
COMFY_FREE_S = 1.0  # POST /free {unload_models, free_memory}


def household(seed: int, hours: float = 24.0) -> Trace:
    """(H) The issue's household on a 32 GiB GPU: an always-resident 8B chat model used every
    few minutes, a 14B reasoning model in bursts, an embeddings model (RAG lookups before chats
    and indexing bursts), ComfyUI with mostly SDXL Lightning images and a few Flux ones."""
    day = Day(seed, hours)
    r = day.rng
    for t in day.poisson(240.0):  # chat, every ~4 min; ~300 tokens at ~50 tok/s
        day.add(t, "ollama", CHAT_8B.name, r.uniform(3.0, 10.0))
        if r.random() < 0.5:  # a RAG lookup just before it
            day.burst(t - 1.5, (1, 3), (0.2, 0.5), lambda s: day.add(s, "ollama", EMBED.name, 0.2))
    for t in day.poisson(1200.0):  # indexing bursts, ~every 20 min
        day.burst(
            t,
            (10, 40),
            (0.5, 2.0),
            lambda s: day.add(s, "ollama", EMBED.name, r.uniform(0.1, 0.5)),
        )
    for t in day.poisson(7200.0):  # reasoning bursts, ~every 2 h: 3-8 long thinking answers
        day.burst(
            t,
            (3, 8),
            (30.0, 180.0),
            lambda s: day.add(s, "ollama", REASON_14B.name, r.uniform(15.0, 60.0)),
        )
    for t in day.poisson(1800.0):  # image sessions, ~every 30 min: 1-6 SDXL Lightning images
        day.burst(
            t,
            (1, 6),
            (5.0, 30.0),
            lambda s: day.add(s, "comfyui", SDXL.name, r.uniform(2.0, 4.0)),
        )
    for t in day.poisson(3 * 3600.0):  # a Flux image, ~every 3 h (20 steps, ~2 s/step)
        day.burst(
            t,
            (1, 2),
            (60.0, 120.0),
            lambda s: day.add(s, "comfyui", FLUX.name, r.uniform(30.0, 60.0)),
        )
    ollama = Backend(
        "ollama",
        "ollama",
        (CHAT_8B, REASON_14B, EMBED),
        declared=gib(13),  # the largest model (11) + margin
        unload_s=OLLAMA_UNLOAD_S,
        pinned=(CHAT_8B.name,),
    )
    comfy = Backend(
        "comfyui", "comfyui", (SDXL, FLUX), declared=FLUX.declared, unload_s=COMFY_FREE_S
    )
    return Trace(
        "H",
        "household, 32 GiB",
        gib(32),
        (ollama, comfy),
        day.requests(),
        targets=True,
    )


def rotation(seed: int, hours: float = 24.0) -> Trace:
    """(R) Six Ollama models (9-14 GiB, 69 GiB in all) on a 24 GiB GPU, asked for in sessions
    with Zipf popularity: at most two fit at once, every unit costs the same and nothing is
    pinned, so least-recently-used is about as good as any rule, and ours should tie it."""
    day = Day(seed, hours)
    r = day.rng
    sizes = (9.0, 10.0, 11.0, 12.0, 13.0, 14.0)
    items = tuple(
        Item(f"m{i}:{s:g}g", gib(s), gib(s), round(1.0 + s / 2.0, 1)) for i, s in enumerate(sizes)
    )
    weights = [1.0 / (k + 1) for k in range(len(items))]
    order = list(items)
    r.shuffle(order)  # popularity is not size
    for t in day.poisson(120.0):  # a session every ~2 min: 1-5 questions to one model
        name = r.choices(order, weights)[0].name

        def ask(s: float, name: str = name) -> None:
            day.add(s, "ollama", name, r.uniform(5.0, 30.0))

        day.burst(t, (1, 5), (5.0, 40.0), ask)
    ollama = Backend("ollama", "ollama", items, declared=gib(16), unload_s=OLLAMA_UNLOAD_S)
    return Trace("R", "rotation, 6 models on 24 GiB", gib(24), (ollama,), day.requests())


def pinned(seed: int, hours: float = 24.0) -> Trace:
    """(P) A pinned chat model (Ollama 8B) beside vLLM (Qwen2.5-7B: 8 GiB weights + 6 GiB KV,
    sleeps and wakes in ~1/~2 s) serving agent bursts, and ComfyUI SDXL image sessions, on a
    24 GiB GPU: 7 + 14 + 7.2 do not fit, so vLLM and ComfyUI take turns beside the chat."""
    day = Day(seed, hours)
    r = day.rng
    chat = Item("llama3.1:8b", gib(7), gib(6.2), 5.0)
    qwen = Item("qwen2.5-7b", gib(14), gib(14), 2.0)
    sdxl = Item("sdxl", gib(7), gib(7.2), 4.0)
    for t in day.poisson(120.0):
        day.add(t, "ollama", chat.name, r.uniform(3.0, 10.0))
    for t in day.poisson(1200.0):  # an agent run, ~every 20 min: 10-40 short calls
        day.burst(
            t, (10, 40), (0.5, 5.0), lambda s: day.add(s, "vllm", qwen.name, r.uniform(1.0, 4.0))
        )
    for t in day.poisson(1500.0):  # image sessions, ~every 25 min (SDXL 25 steps, ~5 s)
        day.burst(
            t, (2, 8), (10.0, 40.0), lambda s: day.add(s, "comfyui", sdxl.name, r.uniform(4.0, 6.0))
        )
    backends = (
        Backend(
            "ollama",
            "ollama",
            (chat,),
            declared=gib(8),
            unload_s=OLLAMA_UNLOAD_S,
            pinned=(chat.name,),
        ),
        Backend(
            "vllm",
            "whole",
            (qwen,),
            declared=qwen.declared,
            unload_s=1.0,
            wake_s=2.0,
            cost=1,
            sleeps=True,
        ),
        Backend("comfyui", "comfyui", (sdxl,), declared=sdxl.declared, unload_s=COMFY_FREE_S),
    )
    return Trace(
        "P", "pinned chat + vLLM and image bursts, 24 GiB", gib(24), backends, day.requests()
    )


def unowned(seed: int, hours: float = 24.0) -> Trace:
    """(U) The household on a 24 GiB GPU without Flux, with memory nobody owns appearing:
    a game (9 GiB) from 55% to 63% of the day, Blender (6 GiB) from 83% to 90%; and the 14B
    model declared at its file size (9 GiB) while it really takes 11.4, to test estimates."""
    day = Day(seed, hours)
    r = day.rng
    reason = Item(REASON_14B.name, gib(9), REASON_14B.true, REASON_14B.load_s)
    for t in day.poisson(240.0):
        day.add(t, "ollama", CHAT_8B.name, r.uniform(3.0, 10.0))
        if r.random() < 0.5:
            day.burst(t - 1.5, (1, 3), (0.2, 0.5), lambda s: day.add(s, "ollama", EMBED.name, 0.2))
    for t in day.poisson(7200.0):
        day.burst(
            t,
            (3, 8),
            (30.0, 180.0),
            lambda s: day.add(s, "ollama", reason.name, r.uniform(15.0, 60.0)),
        )
    for t in day.poisson(1800.0):
        day.burst(
            t, (1, 6), (5.0, 30.0), lambda s: day.add(s, "comfyui", SDXL.name, r.uniform(2.0, 4.0))
        )
    h = day.horizon
    ollama = Backend(
        "ollama",
        "ollama",
        (CHAT_8B, reason, EMBED),
        declared=gib(11),
        unload_s=OLLAMA_UNLOAD_S,
        pinned=(CHAT_8B.name,),
    )
    comfy = Backend("comfyui", "comfyui", (SDXL,), declared=SDXL.declared, unload_s=COMFY_FREE_S)
    return Trace(
        "U",
        "unowned memory mid-day, 24 GiB",
        gib(24),
        (ollama, comfy),
        day.requests(),
        unowned=((0.55 * h, 0.63 * h, gib(9)), (0.83 * h, 0.90 * h, gib(6))),
    )


TRACES: dict[str, Callable[[int, float], Trace]] = {
    "H": household,
    "R": rotation,
    "P": pinned,
    "U": unowned,
}
