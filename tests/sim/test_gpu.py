"""SimGPU: the byte counter that refuses to over-commit, and what it reports."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpubroker.sim import GiB, MiB, OutOfMemory, SimGPU


def test_allocations_add_up_and_free_by_owner_and_tag() -> None:
    gpu = SimGPU(8 * GiB)
    gpu.allocate("ollama", 2 * GiB, tag="llama3.2:latest")
    gpu.allocate("ollama", 1 * GiB, tag="qwen:latest")
    gpu.allocate("comfyui", 3 * GiB)
    assert gpu.used == 6 * GiB
    assert gpu.free_bytes == 2 * GiB
    assert gpu.by_owner() == {"ollama": 3 * GiB, "comfyui": 3 * GiB}
    assert gpu.free("ollama", tag="qwen:latest") == 1 * GiB
    assert gpu.held("ollama") == 2 * GiB
    assert gpu.free("ollama") == 2 * GiB
    assert gpu.by_owner() == {"comfyui": 3 * GiB}
    assert gpu.free("nobody") == 0
    assert gpu.peak_used == 6 * GiB


def test_two_big_models_over_commit_and_oom_like_cuda() -> None:
    gpu = SimGPU(10 * GiB)
    gpu.allocate("ollama", 6 * GiB)
    with pytest.raises(OutOfMemory) as caught:
        gpu.allocate("comfyui", 6 * GiB, tag="checkpoint")
    message = str(caught.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 6144.00 MiB (GPU 0;")
    assert "10.00 GiB total capacity" in message
    assert "6144.00 MiB already allocated; 4096.00 MiB free)" in message
    assert caught.value.owner == "comfyui"
    assert gpu.oom_count == 1
    assert gpu.used == 6 * GiB  # a refused allocation takes nothing


def test_snapshot_reports_processes_with_stable_fake_pids() -> None:
    gpu = SimGPU(4 * GiB, name="Sim H100", uuid="GPU-sim-1", index=1)
    gpu.allocate("a", 100 * MiB)
    gpu.allocate("b", 200 * MiB)
    pid_a = gpu.pid("a")
    gpu.free("a")
    gpu.allocate("a", 50 * MiB)
    snap = gpu.snapshot()
    assert snap["name"] == "Sim H100"
    assert snap["uuid"] == "GPU-sim-1"
    assert snap["index"] == 1
    assert (snap["total"], snap["used"], snap["free"]) == (4 * GiB, 250 * MiB, 4 * GiB - 250 * MiB)
    by_owner = {p["owner"]: p for p in snap["processes"]}
    assert by_owner["a"] == {"owner": "a", "pid": pid_a, "used": 50 * MiB}
    assert by_owner["b"]["pid"] != pid_a


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SimGPU(0)
    with pytest.raises(ValueError):
        SimGPU(1).allocate("x", -1)


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 5 * GiB), st.booleans())))
def test_used_never_exceeds_capacity(ops: list[tuple[str, int, bool]]) -> None:
    gpu = SimGPU(8 * GiB)
    for owner, nbytes, release in ops:
        if release:
            gpu.free(owner)
            continue
        before = gpu.used
        try:
            gpu.allocate(owner, nbytes)
        except OutOfMemory:
            assert before + nbytes > gpu.total
            assert gpu.used == before
        assert 0 <= gpu.used <= gpu.total
        assert gpu.used == sum(gpu.by_owner().values())
