"""Ollama sizing facts with known numbers: the KV cache, the context Ollama picks, the need."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpubroker.plugins.strategies import ollama_sizing as sizing
from gpubroker.plugins.strategies.ollama_sizing import (
    RUNNER_RESERVE,
    default_num_ctx,
    effective_num_ctx,
    generation_batch,
    graph_bytes,
    kv_cache_bytes,
    kv_cells,
    model_need,
    num_parallel,
)

GiB, MiB = 1 << 30, 1 << 20


def llama3_8b(**extra: Any) -> dict[str, Any]:
    """Llama 3.1 8B's model_info as a plain /api/show sends it (no key_length, arrays null)."""
    return {
        "general.architecture": "llama",
        "llama.block_count": 32,
        "llama.embedding_length": 4096,
        "llama.attention.head_count": 32,
        "llama.attention.head_count_kv": 8,
        "llama.context_length": 131072,
        "tokenizer.ggml.tokens": None,
        **extra,
    }


def test_llama3_8b_at_8192_f16_is_one_gib() -> None:
    # 32 layers x 8 kv heads x 128 dims x 2 (K, V) x 2 bytes x 8192 cells
    assert kv_cache_bytes(llama3_8b(), 8192) == 32 * 8 * 128 * 2 * 2 * 8192 == GiB


def test_quantized_caches_take_ggml_block_sizes() -> None:
    # q8_0: 34 bytes per 32 values, q4_0: 18 per 32 (Ollama's own estimate says 1 and 0.5)
    assert kv_cache_bytes(llama3_8b(), 8192, cache_type="q8_0") == GiB * 34 // 64
    assert kv_cache_bytes(llama3_8b(), 8192, cache_type="q4_0") == GiB * 18 // 64
    assert kv_cache_bytes(llama3_8b(), 8192, cache_type="Q8_0") == GiB * 34 // 64
    assert kv_cache_bytes(llama3_8b(), 8192, cache_type="f32") == 2 * GiB
    assert kv_cache_bytes(llama3_8b(), 8192, cache_type="bogus") == GiB  # counted as f16


def test_slots_multiply_the_context_and_cells_are_padded_to_256() -> None:
    assert kv_cache_bytes(llama3_8b(), 2048, parallel=4) == GiB
    assert kv_cache_bytes(llama3_8b(), 8000) == GiB  # 8000 cells -> 8192
    assert kv_cells(100, 3) == 768 and kv_cells(1) == 256


def test_context_is_capped_at_the_trained_length_and_floored_at_4() -> None:
    llama3 = llama3_8b(**{"llama.context_length": 8192})
    assert kv_cache_bytes(llama3, 65536) == GiB
    assert effective_num_ctx(65536, llama3) == 8192
    assert effective_num_ctx(0, llama3) == 4
    assert effective_num_ctx(10**7, {}) == 10**7


def test_head_sizes_and_kv_heads_default_as_llama_cpp_does() -> None:
    explicit = llama3_8b(**{"llama.attention.key_length": 128, "llama.attention.value_length": 128})
    assert kv_cache_bytes(explicit, 8192) == GiB
    wide_v = llama3_8b(**{"llama.attention.value_length": 256})
    assert kv_cache_bytes(wide_v, 8192) == GiB * 3 // 2
    mha = llama3_8b()
    del mha["llama.attention.head_count_kv"]  # no GQA key: every head keeps its K and V
    assert kv_cache_bytes(mha, 8192) == 4 * GiB
    elided = llama3_8b(**{"llama.attention.head_count_kv": None})  # an array /api/show hid
    assert kv_cache_bytes(elided, 8192) == 4 * GiB  # the head count bounds it


@pytest.mark.parametrize(
    "drop", ["general.architecture", "llama.block_count", "llama.attention.head_count"]
)
def test_missing_facts_leave_the_cache_unknown(drop: str) -> None:
    info = llama3_8b()
    del info[drop]
    if drop == "llama.attention.head_count":
        del info["llama.attention.head_count_kv"]
    assert kv_cache_bytes(info, 8192) is None


def test_junk_values_are_not_facts() -> None:
    assert kv_cache_bytes(llama3_8b(**{"llama.block_count": "32"}), 8192) is None
    assert kv_cache_bytes(llama3_8b(**{"llama.block_count": True}), 8192) is None
    assert kv_cache_bytes(llama3_8b(**{"llama.block_count": -1}), 8192) is None
    assert kv_cache_bytes({}, 8192) is None
    no_dims = llama3_8b()
    del no_dims["llama.embedding_length"]
    assert kv_cache_bytes(no_dims, 8192) is None


def test_per_layer_head_counts_and_recurrent_layers() -> None:
    # a hybrid: half the layers have no KV heads (recurrent), their state is per sequence
    info = llama3_8b(
        **{
            "llama.attention.head_count_kv": [8, 0] * 16,
            "llama.ssm.conv_kernel": 4,
            "llama.ssm.state_size": 16,
            "llama.ssm.inner_size": 1024,
            "llama.ssm.group_count": 1,
        }
    )
    state = ((4 - 1) * (1024 + 2 * 16) + 16 * 1024) * 4
    assert kv_cache_bytes(info, 8192) == GiB // 2 + 16 * state
    assert kv_cache_bytes(info, 8192, parallel=2) == GiB + 16 * 2 * state


def test_gemma3_sliding_layers_hold_a_window() -> None:
    info = {
        "general.architecture": "gemma3",
        "gemma3.block_count": 12,
        "gemma3.attention.head_count": 8,
        "gemma3.attention.head_count_kv": 4,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256,
        "gemma3.context_length": 131072,
        "gemma3.attention.sliding_window": 1024,
    }
    row = 4 * 512 * 2  # kv heads x (K + V dims) x f16
    full, window = 32768 * row, 1536 * row  # window 1024 + batch 512 cells
    assert kv_cache_bytes(info, 32768) == 2 * full + 10 * window


def test_default_context_follows_ollamas_vram_tiers() -> None:
    assert default_num_ctx(16 * GiB) == 4096
    assert default_num_ctx(24 * GiB) == 32768
    assert default_num_ctx(48 * GiB) == 262144
    assert default_num_ctx(48 * GiB, {"OLLAMA_GPU_OVERHEAD": str(2 * GiB)}) == 32768
    assert default_num_ctx(None, {"OLLAMA_CONTEXT_LENGTH": "8192"}) == 8192
    assert default_num_ctx(80 * GiB, {"OLLAMA_CONTEXT_LENGTH": "8192"}) == 8192
    assert default_num_ctx(None) is None
    assert default_num_ctx(None, {"OLLAMA_CONTEXT_LENGTH": "lots"}) is None


def test_slots_and_cache_type_come_from_ollamas_env() -> None:
    assert num_parallel() == 1 and num_parallel({"OLLAMA_NUM_PARALLEL": "4"}) == 4
    assert num_parallel({"OLLAMA_NUM_PARALLEL": "0"}) == 1
    assert num_parallel({"OLLAMA_NUM_PARALLEL": "4"}, completion=False) == 1
    assert num_parallel({"OLLAMA_NUM_PARALLEL": "4"}, family="qwen3vl") == 1
    assert sizing.cache_type({}) == "f16" and sizing.cache_type({"OLLAMA_KV_CACHE_TYPE": "Q8_0"})


def test_need_adds_cache_buffers_and_the_runner_reserve() -> None:
    info = llama3_8b(**{"llama.vocab_size": 128256})
    weights = 4_900_000_000
    # 8192 cells > 4096: Ollama runs a 1024 batch and counts a 768 MiB surcharge for it
    graph = 4 * 1024 * (4096 + 128256)
    assert model_need(weights, info, 8192) == weights + GiB + graph + 768 * MiB + RUNNER_RESERVE
    small = model_need(weights, info, 4096)
    assert small == weights + GiB // 2 + 4 * 512 * (4096 + 128256) + RUNNER_RESERVE
    assert model_need(weights, info, 8192, batch=512) < model_need(weights, info, 8192)
    embed = model_need(weights, info, 8192, completion=False)  # batch 2048, no surcharge
    assert embed == weights + GiB + 4 * 2048 * (4096 + 128256) + RUNNER_RESERVE


def test_need_without_a_vocabulary_assumes_a_large_one() -> None:
    assert graph_bytes(llama3_8b()) == 4 * 512 * (4096 + sizing.DEFAULT_VOCAB)
    listed = llama3_8b(**{"tokenizer.ggml.tokens": ["a"] * 1000})
    assert graph_bytes(listed) == 4 * 512 * (4096 + 1000)


def test_need_falls_back_to_ollamas_own_estimate_of_the_cache() -> None:
    # head sizes unknown: Ollama's PredictServerVRAM counts an f16 cache with head_dim 0
    info = {"general.architecture": "llama", "llama.block_count": 32}
    assert kv_cache_bytes(info, 8192) is None
    assert model_need(GiB, info, 4096) == GiB + graph_bytes(info) + RUNNER_RESERVE


def test_generation_batch_grows_with_the_context() -> None:
    assert [generation_batch(c) for c in (2048, 4096, 4097, 32768, 32769)] == [
        512,
        512,
        1024,
        1024,
        2048,
    ]
    assert generation_batch(4096, 2) == 1024
    assert generation_batch(65536, completion=False) == 2048
    assert generation_batch(100, completion=False) == 100


@given(
    ctx=st.integers(1, 1 << 20),
    more=st.integers(0, 1 << 16),
    parallel=st.integers(1, 8),
    cache=st.sampled_from(sorted(sizing.CACHE_TYPES)),
)
def test_cache_grows_with_context_and_slots_and_never_undercounts(
    ctx: int, more: int, parallel: int, cache: str
) -> None:
    info = llama3_8b(**{"llama.context_length": 1 << 21})
    kv = kv_cache_bytes(info, ctx, parallel, cache)
    assert kv is not None
    assert kv <= (kv_cache_bytes(info, ctx + more, parallel, cache) or 0)
    assert kv <= (kv_cache_bytes(info, ctx, parallel + 1, cache) or 0)
    block, per = sizing.CACHE_TYPES[cache]
    exact = 32 * ctx * parallel * 2 * 8 * 128 * block / per  # no padding, fractional bytes
    assert exact <= kv <= exact + 32 * parallel * 2 * 256 * 2 * 8 * 128 * block / per
    assert model_need(0, info, ctx, parallel, cache) >= kv + RUNNER_RESERVE
