"""How much GPU memory an Ollama model takes for one request: weights, KV cache, buffers.

Pure functions over what ``/api/show`` returns (``model_info``), pinned to Ollama v0.33.0-rc2
(commit fb30760), where every GGUF model runs in an upstream llama-server:

- the context a runner gets: ``server/routes.go`` (``modelOptions``: request options over the
  Modelfile's over ``OLLAMA_CONTEXT_LENGTH`` over the VRAM-tier default set in ``Serve``),
  ``server/sched.go`` (``getRunner``: at least 4; ``effectiveContext`` / ``llm/server.go``
  ``NewLlamaServer``: at most the model's ``context_length``), and ``llm/llama_server.go``
  ``startLlamaServer`` (``-c num_ctx*parallel -np parallel --cache-type-k/v
  OLLAMA_KV_CACHE_TYPE``);
- what llama-server then allocates for the cache: per attention layer, each cell holds
  ``head_count_kv * (key_length + value_length)`` elements of the cache type (the formula of
  ``fs/ggml/ggml.go`` ``GraphSize``, with its defaults: ``key_length`` falls back to
  ``embedding_length / head_count``), over ``n_ctx`` padded to 256 cells (llama.cpp
  ``llama_context``: ``GGML_PAD(n_ctx, 256)``, per sequence too), at ggml's real block sizes
  (q8_0 is 34 bytes per 32 elements, where Ollama's ``kvCacheBytesPerElement`` says 1);
- the buffers beyond weights and cache: ``GraphSize``'s output graph ``4 * batch *
  (embedding + vocab)``, the batch surcharge of ``server/sched.go``
  (``generationBatchSurcharge``) and, per runner, the CUDA reserve of ``ml/device.go``
  (``MinimumMemory``, 457 MiB): a runner is its own process with its own CUDA context, which
  NVML counts although ``/api/ps`` does not.

Every choice between two readings takes the bigger one: an estimate that is too small lets a
load push another model off the card (or onto the CPU), one that is too big only evicts early.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MiB = 1 << 20
GiB = 1 << 30

RUNNER_RESERVE = 457 * MiB
"""ml/device.go: (DeviceInfo).MinimumMemory on CUDA/ROCm (Metal: 512 MiB)."""
DEFAULT_VOCAB = 262_144
"""Tokens assumed when ``model_info`` does not say (the array is elided in a plain
``/api/show``): the largest vocabulary in common use (gemma3's)."""
LLAMA_CTX_PAD = 256
"""llama.cpp llama_context: n_ctx and each sequence's share are padded to this many cells."""
MIN_NUM_CTX = 4
"""server/sched.go: getRunner raises a smaller num_ctx to 4."""
VISION_MIN_NUM_CTX = 2048
"""server/sched.go: getRunner — a model with the vision capability gets at least 2048."""

# server/routes.go: Serve — the default num_ctx by the total VRAM of the GPUs Ollama sees
# (each less OLLAMA_GPU_OVERHEAD), thresholds just below 48 and 24 GiB on purpose.
CONTEXT_TIERS: tuple[tuple[int, int], ...] = ((47 * GiB, 262_144), (23 * GiB, 32_768), (0, 4_096))
LARGEST_DEFAULT_CTX = CONTEXT_TIERS[0][1]

# server/sched.go: (*Scheduler).load — families run with one slot whatever OLLAMA_NUM_PARALLEL.
SINGLE_SLOT_FAMILIES = frozenset(
    {
        "mllama",
        "qwen3vl",
        "qwen3vlmoe",
        "qwen35",
        "qwen35moe",
        "qwen3next",
        "lfm2",
        "lfm2moe",
        "nemotron_h",
        "nemotron_h_moe",
        "nemotron_h_omni",
    }
)

# ggml type traits: (bytes per block, elements per block) of the types llama-server accepts
# for --cache-type-k/-v; Ollama passes OLLAMA_KV_CACHE_TYPE through as it is (lowercased).
CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (4, 1),
    "f16": (2, 1),
    "bf16": (2, 1),
    "q8_0": (34, 32),
    "q5_1": (24, 32),
    "q5_0": (22, 32),
    "q4_1": (20, 32),
    "q4_0": (18, 32),
    "iq4_nl": (18, 32),
}

# fs/ggml/ggml.go: GraphSize — the architectures whose cache it sizes with a sliding window:
# (every how many layers one is global, cells of a windowed layer: parallel * window + batch).
# Any other architecture is sized with a full cache on every layer (never too small).
_SLIDING: dict[str, int] = {"gemma3": 6, "gptoss": 2, "gpt-oss": 2}
_GPTOSS_WINDOW = 4096  # GraphSize's gptoss case: numParallel*4096 + batch cells


def cache_row_bytes(elements: int, cache_type: str = "f16") -> int:
    """Bytes ggml stores ``elements`` values of ``cache_type`` in (whole blocks).

    An empty or unknown type counts as f16, Ollama's default (llama-server refuses a type
    it does not know, so such a runner never holds memory anyway).
    """
    block_bytes, per_block = CACHE_TYPES.get(cache_type.lower(), CACHE_TYPES["f16"])
    return -(-elements // per_block) * block_bytes


def architecture(model_info: Mapping[str, Any]) -> str | None:
    """``general.architecture``: the prefix of every other model key."""
    arch = model_info.get("general.architecture")
    return arch if isinstance(arch, str) and arch else None


def _uint(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value < 0 or int(value) != value:
        return None
    return int(value)


def _arch_uint(model_info: Mapping[str, Any], key: str) -> int | None:
    arch = architecture(model_info)
    return None if arch is None else _uint(model_info.get(f"{arch}.{key}"))


def _per_layer(value: Any, layers: int) -> list[int] | None:
    """A key that is one number or one per layer (``attention.head_count_kv``), per layer.

    None when absent or elided: a plain ``/api/show`` sends arrays as null.
    """
    one = _uint(value)
    if one is not None:
        return [one] * layers
    if not isinstance(value, list) or not value:
        return None
    items = [_uint(v) for v in value]
    if any(v is None for v in items):
        return None
    out = [v for v in items if v is not None]
    return (out + [max(out)] * layers)[:layers]  # a short list: the rest as its largest


def context_length(model_info: Mapping[str, Any]) -> int | None:
    """The context the model was trained for (``<arch>.context_length``)."""
    return _arch_uint(model_info, "context_length") or None


def effective_num_ctx(num_ctx: int, model_info: Mapping[str, Any]) -> int:
    """The per-slot context a runner gets for ``num_ctx``: at least 4, at most the model's.

    server/sched.go: getRunner (the floor) and effectiveContext / llm/server.go
    NewLlamaServer (the cap; ``/api/ps`` then shows this as ``context_length``).
    """
    num_ctx = max(MIN_NUM_CTX, num_ctx)
    trained = context_length(model_info)
    return min(num_ctx, trained) if trained else num_ctx


def default_num_ctx(vram_total: int | None, env: Mapping[str, str] | None = None) -> int | None:
    """The num_ctx Ollama uses when neither request nor Modelfile sets one.

    ``OLLAMA_CONTEXT_LENGTH`` when set (envconfig.ContextLength, > 0); else the tier of
    server/routes.go Serve by ``vram_total`` (bytes of the GPUs Ollama sees, less
    ``OLLAMA_GPU_OVERHEAD``, which is taken off once here); None when neither is known.
    """
    env = env or {}
    set_ctx = _env_uint(env, "OLLAMA_CONTEXT_LENGTH")
    if set_ctx:
        return set_ctx
    if vram_total is None:
        return None
    total = vram_total - (_env_uint(env, "OLLAMA_GPU_OVERHEAD") or 0)
    return next(ctx for floor, ctx in CONTEXT_TIERS if total >= floor)


def num_parallel(
    env: Mapping[str, str] | None = None, *, completion: bool = True, family: str | None = None
) -> int:
    """Slots a runner gets: OLLAMA_NUM_PARALLEL (default 1), but one for an embedding model
    and for the families of :data:`SINGLE_SLOT_FAMILIES` (server/sched.go: load)."""
    parallel = max(_env_uint(env or {}, "OLLAMA_NUM_PARALLEL") or 1, 1)
    if not completion or (family or "") in SINGLE_SLOT_FAMILIES:
        return 1
    return parallel


def cache_type(env: Mapping[str, str] | None = None) -> str:
    """OLLAMA_KV_CACHE_TYPE, lowercased as llm/server.go passes it; f16 when unset."""
    return (env or {}).get("OLLAMA_KV_CACHE_TYPE", "").strip().lower() or "f16"


def _env_uint(env: Mapping[str, str], key: str) -> int | None:
    try:
        value = int(env.get(key, "").strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def kv_cells(num_ctx: int, parallel: int = 1) -> int:
    """Cache cells llama-server allocates for ``-c num_ctx*parallel -np parallel``.

    llama.cpp llama_context: n_ctx is padded to 256, and each sequence's share of it again;
    the cache holds share * sequences cells.
    """
    parallel = max(parallel, 1)
    n_ctx = _pad(max(num_ctx, 1) * parallel)
    return n_ctx if parallel == 1 else _pad(n_ctx // parallel) * parallel


def _pad(n: int) -> int:
    return -(-n // LLAMA_CTX_PAD) * LLAMA_CTX_PAD


def generation_batch(num_ctx: int, parallel: int = 1, *, completion: bool = True) -> int:
    """The batch Ollama runs a model at when no ``num_batch`` is set.

    Completion: server/sched.go generationBatchForContext over num_ctx*parallel (2048 above
    32768, 1024 above 4096, else 512; it may lower that to fit, never raise it). Embedding:
    llm/llama_server.go DefaultEmbeddingNumBatchForContext (2048, at most num_ctx).
    """
    if not completion:
        return min(2048, max(num_ctx, 1))
    total = num_ctx * max(parallel, 1)
    return 2048 if total > 32768 else 1024 if total > 4096 else 512


def batch_surcharge(batch: int, *, completion: bool = True) -> int:
    """server/sched.go: generationBatchSurchargeForCompletion — what a big batch adds."""
    if not completion:
        return 0
    return 2 * GiB if batch >= 2048 else 768 * MiB if batch >= 1024 else 0


def kv_cache_bytes(
    model_info: Mapping[str, Any],
    num_ctx: int,
    parallel: int = 1,
    cache_type: str = "f16",
    *,
    batch: int = 512,
) -> int | None:
    """Bytes of the KV cache (and recurrent state) a runner of this model allocates.

    ``num_ctx`` is per slot, as in a request's options; it is floored and capped first
    (:func:`effective_num_ctx`). None when ``model_info`` lacks what is needed: the layer
    count, and the heads or head sizes of the cache.
    """
    layers = _arch_uint(model_info, "block_count")
    arch = architecture(model_info)
    if not layers or arch is None:
        return None
    heads = _per_layer(model_info.get(f"{arch}.attention.head_count"), layers)
    kv_heads = _per_layer(model_info.get(f"{arch}.attention.head_count_kv"), layers)
    # llama.cpp: head_count_kv defaults to head_count; where the array was elided, the head
    # count is its upper bound. Neither known: nothing to size the cache by.
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads is None:
        return None
    key_len, value_len = _head_dims(model_info, heads)
    if key_len is None or value_len is None:
        return None
    parallel = max(parallel, 1)
    ctx = effective_num_ctx(num_ctx, model_info)
    cells = kv_cells(ctx, parallel)
    window_every = _SLIDING.get(arch)
    window = _arch_uint(model_info, "attention.sliding_window")
    if arch in ("gptoss", "gpt-oss"):
        window = _GPTOSS_WINDOW
    total = 0
    for i in range(layers):
        head_i = heads[i] if heads is not None else kv_heads[i]
        if head_i > 0 and kv_heads[i] > 0:
            layer_cells = cells
            if window_every and window and _windowed(arch, i, window_every):
                layer_cells = min(cells, _pad(parallel * window + batch))
            row = cache_row_bytes(kv_heads[i] * key_len, cache_type) + cache_row_bytes(
                kv_heads[i] * value_len, cache_type
            )
            total += layer_cells * row
        else:
            total += _recurrent_bytes(model_info, arch) * parallel
    return total


def _windowed(arch: str, layer: int, every: int) -> bool:
    # GraphSize: gemma3 — every 6th layer (i+1) % 6 == 0 is global; gptoss — even layers slide.
    if arch == "gemma3":
        return (layer + 1) % every != 0
    return layer % every == 0


def _head_dims(
    model_info: Mapping[str, Any], heads: list[int] | None
) -> tuple[int | None, int | None]:
    """``attention.key_length`` / ``value_length``, else embedding_length / head_count.

    fs/ggml/ggml.go: EmbeddingHeadCountK/V default to embedding_length over the smallest
    head count (EmbeddingHeadCountMax), the largest head size the model could have.
    """
    derived = None
    embedding = _arch_uint(model_info, "embedding_length")
    positive = [h for h in heads or () if h > 0]
    if embedding and positive:
        derived = embedding // min(positive)
    key_len = _arch_uint(model_info, "attention.key_length") or derived
    value_len = _arch_uint(model_info, "attention.value_length") or key_len
    return key_len, value_len


def _recurrent_bytes(model_info: Mapping[str, Any], arch: str) -> int:
    """One sequence's state in a recurrent layer, f32 (fs/ggml/ggml.go: GraphSize)."""
    conv = _arch_uint(model_info, "ssm.conv_kernel") or 0
    state = _arch_uint(model_info, "ssm.state_size") or 0
    inner = _arch_uint(model_info, "ssm.inner_size") or 0
    groups = _arch_uint(model_info, "ssm.group_count") or 0
    conv_state = (conv - 1) * (inner + 2 * groups * state) if conv > 0 else 0
    return (conv_state + state * inner) * 4


def vocab_size(model_info: Mapping[str, Any]) -> int:
    """``<arch>.vocab_size``, else the token list's length, else :data:`DEFAULT_VOCAB`."""
    size = _arch_uint(model_info, "vocab_size")
    if size:
        return size
    tokens = model_info.get("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list) and tokens else DEFAULT_VOCAB


def graph_bytes(model_info: Mapping[str, Any], batch: int = 512) -> int:
    """The compute buffer for one batch: GraphSize's output graph, 4 * batch * (embd + vocab)."""
    embedding = _arch_uint(model_info, "embedding_length") or 0
    return 4 * batch * (embedding + vocab_size(model_info))


def predicted_kv_bytes(model_info: Mapping[str, Any], num_ctx: int, parallel: int = 1) -> int:
    """llm/llama_server.go PredictServerVRAM's cache term: 2 * layers * head_count_kv (its
    smallest, at least 1) * embedding/head_count (its largest) * ctx * 2 bytes, whatever
    the cache type: Ollama's own rough figure, used here only where ours cannot be had."""
    layers = _arch_uint(model_info, "block_count") or 0
    arch = architecture(model_info) or ""
    kv = _per_layer(model_info.get(f"{arch}.attention.head_count_kv"), max(layers, 1))
    heads = _per_layer(model_info.get(f"{arch}.attention.head_count"), max(layers, 1))
    kv_min = max(min(kv) if kv else 1, 1)
    head_max = max(heads) if heads else 0
    embedding = _arch_uint(model_info, "embedding_length") or 0
    head_dim = embedding // head_max if head_max else 0
    ctx = effective_num_ctx(num_ctx, model_info) * max(parallel, 1)
    return 2 * layers * kv_min * head_dim * ctx * 2


def model_need(
    weights: int,
    model_info: Mapping[str, Any],
    num_ctx: int,
    parallel: int = 1,
    cache_type: str = "f16",
    *,
    completion: bool = True,
    batch: int | None = None,
) -> int:
    """Bytes a runner of this model holds on the GPU at ``num_ctx`` (per slot) x ``parallel``.

    Weights (``/api/tags`` size: the whole model, as if every layer were offloaded) + the
    cache (:func:`kv_cache_bytes`; where ``model_info`` cannot size it, Ollama's own figure
    from :func:`predicted_kv_bytes`) + the compute buffer (:func:`graph_bytes`) + the batch
    surcharge + :data:`RUNNER_RESERVE`. ``batch``: an explicit ``num_batch``; None: as Ollama
    picks it (:func:`generation_batch`). Callers that must tell "unknown" apart check
    :func:`kv_cache_bytes` first.
    """
    ctx = effective_num_ctx(num_ctx, model_info)
    if batch is None or batch <= 0:
        batch = generation_batch(ctx, parallel, completion=completion)
    kv = kv_cache_bytes(model_info, ctx, parallel, cache_type, batch=batch)
    if kv is None:
        kv = predicted_kv_bytes(model_info, ctx, parallel)
    surcharge = batch_surcharge(batch, completion=completion)
    return max(weights, 0) + kv + graph_bytes(model_info, batch) + surcharge + RUNNER_RESERVE
