"""The models an :class:`~gpubroker.sim.ollama.OllamaEmulator` serves, and what a runner takes.

A model is either a plain number of bytes, a fixed footprint at any context (what most tests
declare: ``/api/show`` then names no layers or heads, so nothing can size its cache), or a
:class:`SimModel`, sized the way Ollama v0.33.0-rc2 (commit fb30760) and its llama-server size
one. Written from that source, not from gpubroker's own estimator
(``plugins/strategies/ollama_sizing.py``), so the two check each other:

- options: ``server/routes.go`` ``modelOptions`` (defaults, then the Modelfile's
  PARAMETERs, then the request's ``options``), ``usesAutomaticNumCtx`` /
  ``usesAutomaticNumBatch``, the VRAM-tier default num_ctx of ``Serve`` and
  ``OLLAMA_CONTEXT_LENGTH``; ``server/sched.go`` ``getRunner`` (num_ctx at least 4) and
  ``effectiveContext`` (at most the model's ``context_length``, what ``/api/ps`` shows);
- a reload: ``server/sched.go`` ``(*runnerRef).needsReload`` compares the runner options
  (``api.Runner``: num_ctx, num_batch, num_gpu, main_gpu, use_mmap, num_thread), keeping the
  loaded num_ctx / num_batch where both sides are automatic and ignoring num_gpu -1;
- a runner's memory: llama-server's model buffer (the weights), its KV buffer for ``-c
  num_ctx*parallel`` cells (``llm/llama_server.go`` ``startLlamaServer``; llama.cpp pads the
  count to 256) at the ``OLLAMA_KV_CACHE_TYPE`` element size, and a compute buffer of one
  batch of output logits, ``4 * batch * (embedding + vocab)``; ``/api/ps`` reports their sum
  (``MemorySize``, parsed from the buffer lines llama-server logs);
- the scheduler's own prediction for its 80% pre-flight check, ``llm/llama_server.go``
  ``PredictServerVRAM`` (file size + an f16 cache of ``2 * layers * head_count_kv *
  embedding/head_count * ctx * 2``) + ``generationBatchSurcharge``.

Not reproduced: sliding-window and recurrent caches (every layer holds a full cache here),
per-layer head arrays, partial offload by layer, and the automatic num_ctx being lowered after
an OOM (``reduceAutoNumCtxForLoadOOM``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MiB = 1 << 20
GiB = 1 << 30

# What llama-server stores one cache element in (bytes per block, elements per block).
_CACHE_BLOCKS = {"f32": (4, 1), "f16": (2, 1), "bf16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The architecture facts ``/api/show`` lists in ``model_info`` (GGUF metadata)."""

    architecture: str = "llama"
    block_count: int = 32
    embedding_length: int = 4096
    head_count: int = 32
    head_count_kv: int = 8
    key_length: int = 128
    value_length: int = 128
    context_length: int = 131072
    vocab_size: int = 128256


# Real shapes (Llama 3.2 1B/3B, Llama 3.1 8B, Qwen2.5 14B/32B, Llama 3.1 70B), chosen by the
# Q4_K_M size of each: the largest whose size does not exceed the model's weights.
_QWEN = {"context_length": 32768, "vocab_size": 152064}
_SHAPES: tuple[tuple[int, ModelShape], ...] = (
    (0, ModelShape(block_count=16, embedding_length=2048, key_length=64, value_length=64)),
    (2 * GiB, ModelShape(block_count=28, embedding_length=3072, head_count=24)),
    (4 * GiB, ModelShape()),
    (8 * GiB, ModelShape("qwen2", 48, 5120, 40, 8, **_QWEN)),
    (16 * GiB, ModelShape("qwen2", 64, 5120, 40, 8, **_QWEN)),
    (32 * GiB, ModelShape(block_count=80, embedding_length=8192, head_count=64)),
)


def shape_for(weights: int) -> ModelShape:
    """A sane shape for a model of ``weights`` bytes (see :data:`_SHAPES`)."""
    return [shape for floor, shape in _SHAPES if weights >= floor][-1]


@dataclass(frozen=True, slots=True)
class SimModel:
    """A model sized as Ollama sizes it: ``weights`` bytes plus a cache at its context.

    ``shape``: None for :func:`shape_for` the weights. ``parameters``: the Modelfile's
    PARAMETERs (``{"num_ctx": 8192}``), defaults under the request's options.
    ``capabilities``: as ``/api/show`` lists them; one without ``completion`` is an embedding
    model, which runs one slot (server/sched.go load).
    """

    weights: int
    shape: ModelShape | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ("completion",)

    @property
    def dims(self) -> ModelShape:
        return self.shape or shape_for(self.weights)

    @property
    def completion(self) -> bool:
        return "completion" in self.capabilities


Entry = int | SimModel
"""A model the emulator serves: a fixed footprint in bytes, or a :class:`SimModel`."""


def weights_of(entry: Entry) -> int:
    """What ``/api/tags`` reports as the model's size: the files, i.e. the weights."""
    return entry.weights if isinstance(entry, SimModel) else entry


def trained_context(entry: Entry) -> int:
    return entry.dims.context_length if isinstance(entry, SimModel) else FIXED_CONTEXT_LENGTH


FIXED_CONTEXT_LENGTH = 131072
"""The ``context_length`` a fixed-footprint model reports (Llama 3.1's)."""


def default_context(gpu_total: int, context_length: int = 0) -> int:
    """server/routes.go Serve: OLLAMA_CONTEXT_LENGTH when set, else by total VRAM."""
    if context_length > 0:
        return context_length
    if gpu_total >= 47 * GiB:
        return 262144
    return 32768 if gpu_total >= 23 * GiB else 4096


@dataclass(frozen=True, slots=True)
class RunnerOptions:
    """``api.Runner``: the options a runner is loaded with; a change means a reload."""

    num_ctx: int
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int | None = None
    use_mmap: bool | None = None
    num_thread: int = 0
    ctx_auto: bool = True
    batch_auto: bool = True


def runner_options(
    entry: Entry, options: Mapping[str, Any], *, default_ctx: int, parallel: int
) -> RunnerOptions:
    """The runner options a request with ``options`` asks of ``entry``.

    server/routes.go modelOptions: api.DefaultOptions (num_ctx = ``default_ctx``, num_batch
    512, num_gpu -1), then the Modelfile's, then the request's; getRunner floors num_ctx at
    4; effectiveContext caps it at the model's context. An embedding model gets num_batch
    min(2048, num_ctx) (WithDefaultEmbeddingNumBatch), a completion model with an automatic
    batch the one sched.go generationBatchForContext picks for num_ctx * parallel.
    """
    params = entry.parameters if isinstance(entry, SimModel) else {}
    merged = {**params, **options}
    num_ctx = _int(merged.get("num_ctx"))
    ctx_auto = "num_ctx" not in merged
    ctx = max(4, default_ctx if num_ctx is None else num_ctx)
    ctx = min(ctx, trained_context(entry))
    batch_auto = "num_batch" not in merged
    batch = _int(merged.get("num_batch")) or 512
    completion = not isinstance(entry, SimModel) or entry.completion
    if batch_auto and not completion:
        batch, batch_auto = min(2048, ctx), False
    elif batch_auto:
        total = ctx * max(parallel, 1)
        batch = 2048 if total > 32768 else 1024 if total > 4096 else 512
    num_gpu = _int(merged.get("num_gpu"), allow_negative=True)
    main_gpu = _int(merged.get("main_gpu"))
    use_mmap = merged.get("use_mmap")
    return RunnerOptions(
        num_ctx=ctx,
        num_batch=batch,
        num_gpu=-1 if num_gpu is None else num_gpu,
        main_gpu=main_gpu,
        use_mmap=use_mmap if isinstance(use_mmap, bool) else None,
        num_thread=_int(merged.get("num_thread")) or 0,
        ctx_auto=ctx_auto,
        batch_auto=batch_auto,
    )


def needs_reload(loaded: RunnerOptions, new: RunnerOptions) -> bool:
    """server/sched.go (*runnerRef).needsReload, for the runner options: any difference, but
    an automatic num_ctx / num_batch on both sides keeps the loaded one, and a num_gpu of -1
    (automatic) matches whatever the runner was loaded with."""
    ctx = loaded.num_ctx if loaded.ctx_auto and new.ctx_auto else new.num_ctx
    batch = loaded.num_batch if loaded.batch_auto and new.batch_auto else new.num_batch
    gpu_old, gpu_new = (-1, -1) if new.num_gpu < 0 else (loaded.num_gpu, new.num_gpu)
    old = (loaded.num_ctx, loaded.num_batch, gpu_old, loaded.main_gpu, loaded.use_mmap)
    return old != (ctx, batch, gpu_new, new.main_gpu, new.use_mmap) or (
        loaded.num_thread != new.num_thread
    )


def _int(value: Any, *, allow_negative: bool = False) -> int | None:
    # api/types.go (*Options).FromMap: an int option takes any JSON number.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = int(value)
    return number if allow_negative or number >= 0 else None


@dataclass(frozen=True, slots=True)
class Footprint:
    """What one runner of a model takes, and what Ollama predicted before loading it."""

    total: int
    """Bytes of all its buffers (``/api/ps`` ``size``; ``size_vram`` when all fit)."""
    predicted: int
    """The scheduler's estimate, for the "more than 80% of free" eviction check."""
    context_length: int
    """Its per-slot num_ctx (``/api/ps`` ``context_length``)."""


def slots_of(entry: Entry, parallel: int) -> int:
    """Slots a runner gets: OLLAMA_NUM_PARALLEL, one for an embedding model (sched.go load)."""
    completion = not isinstance(entry, SimModel) or entry.completion
    return max(parallel, 1) if completion else 1


def footprint(entry: Entry, opts: RunnerOptions, *, parallel: int, cache_type: str) -> Footprint:
    """The runner ``entry`` loads with ``opts``, ``parallel`` slots and ``cache_type``."""
    if not isinstance(entry, SimModel):
        return Footprint(entry, entry, opts.num_ctx)
    d = entry.dims
    slots = slots_of(entry, parallel)
    cells = -(-opts.num_ctx * slots // 256) * 256
    block_bytes, per_block = _CACHE_BLOCKS.get(cache_type.lower() or "f16", _CACHE_BLOCKS["f16"])
    row = d.head_count_kv * (d.key_length + d.value_length)
    kv = d.block_count * cells * (-(-row // per_block) * block_bytes)
    compute = 4 * opts.num_batch * (d.embedding_length + d.vocab_size)
    head_dim = d.embedding_length // d.head_count
    predicted_kv = 2 * d.block_count * d.head_count_kv * head_dim * opts.num_ctx * slots * 2
    surcharge = 0
    if entry.completion and opts.num_batch >= 1024:
        surcharge = 2 * GiB if opts.num_batch >= 2048 else 768 * MiB
    predicted = entry.weights + predicted_kv + surcharge
    return Footprint(entry.weights + kv + compute, predicted, opts.num_ctx)


def model_info(entry: Entry) -> dict[str, Any]:
    """``/api/show``'s ``model_info``: the GGUF metadata (arrays elided to null, as Ollama
    sends them without ``verbose``), or for a fixed footprint only its architecture."""
    if not isinstance(entry, SimModel):
        return {"general.architecture": "llama", "llama.context_length": FIXED_CONTEXT_LENGTH}
    d = entry.dims
    a = d.architecture
    return {
        "general.architecture": a,
        "general.file_type": 15,
        "general.parameter_count": int(entry.weights / 0.6),
        "general.quantization_version": 2,
        f"{a}.attention.head_count": d.head_count,
        f"{a}.attention.head_count_kv": d.head_count_kv,
        f"{a}.attention.key_length": d.key_length,
        f"{a}.attention.layer_norm_rms_epsilon": 1e-05,
        f"{a}.attention.value_length": d.value_length,
        f"{a}.block_count": d.block_count,
        f"{a}.context_length": d.context_length,
        f"{a}.embedding_length": d.embedding_length,
        f"{a}.feed_forward_length": d.embedding_length * 7 // 2,
        f"{a}.rope.freq_base": 500000,
        f"{a}.vocab_size": d.vocab_size,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.merges": None,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.token_type": None,
        "tokenizer.ggml.tokens": None,
    }


def parameters_text(entry: Entry) -> str:
    """``/api/show``'s ``parameters``: server/routes.go GetModelInfo writes ``%-30s %#v``
    per value, one line per item of a list."""
    params = entry.parameters if isinstance(entry, SimModel) else {}
    lines = []
    for key, value in params.items():
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"{key:<30} {_go_value(item)}")
    return "\n".join(lines)


def _go_value(value: Any) -> str:
    """Go's ``%#v`` of a JSON-decoded value: numbers plainly (8192, not 8192.0), quoted
    strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def capabilities(entry: Entry) -> list[str]:
    if isinstance(entry, SimModel):
        return list(entry.capabilities)
    return ["completion", "embedding"]
