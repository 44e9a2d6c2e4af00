"""bench/scheduling.py's household trace (h), end to end over real sockets, on a few requests:
so the run that proves issue 14 through a real broker keeps working as the code changes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCALE = 0.05  # a real second is 50 ms: the whole household below in ~2 s per setup

pytestmark = pytest.mark.anyio


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCH))  # for its `import household`
    spec = importlib.util.spec_from_file_location("bench_scheduling", BENCH / "scheduling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_scheduling", module)
    spec.loader.exec_module(module)
    return module


def tiny_household(bench: ModuleType) -> object:
    """Every kind of request the household makes, once or twice, in real seconds: the
    reasoning model answers, then Flux comes while it is still loaded (which, on 32 GiB
    beside the pinned chat model, only fits once it is gone)."""
    h = bench.household
    req = bench.Req
    requests = (
        req(0.0, "ollama", "embed", h.EMBED, h.EMBED_S),
        req(0.5, "ollama", "chat", h.CHAT, 1.0),
        req(1.0, "comfyui", "image", "sdxl", 3.0),
        req(2.0, "ollama", "chat", h.REASON, 2.0),
        req(14.0, "comfyui", "image", "flux", 4.0),
        req(15.0, "ollama", "chat", h.CHAT, 1.0),
        req(16.0, "ollama", "embed", h.EMBED, h.EMBED_S),
    )
    return bench.Trace("h", "tiny household", ("ollama", "comfyui"), requests, world="household")


@pytest.mark.parametrize("setup", ["units", "backend"])
async def test_every_household_request_is_answered_without_an_oom(
    bench: ModuleType, setup: str
) -> None:
    trace = tiny_household(bench)
    result = await bench.run_one(trace, setup, SCALE)
    assert [r.error for r in result.records if r.error] == []
    assert all(r.status == 200 and r.queue_ms is not None for r in result.records)
    assert result.ooms == 0
    assert result.faults == []  # no CPU offload, no reload, swap count as the events say
    evicted = {unit for e in result.swap_events for unit in e.evicted}
    if setup == "units":  # Flux made room by freeing the 14B model alone, the chat stayed
        assert "ollama/qwen3:14b" in evicted
        assert not {"ollama", f"ollama/{bench.household.CHAT}"} & evicted
    else:  # the bench's whole-Ollama strategy: one unit, every model freed with it
        assert evicted <= {"ollama", "comfyui"} and "ollama" in evicted


def test_the_household_setups_are_run_from_the_command_line(bench: ModuleType) -> None:
    args = bench.parse_args(["--traces", "h", "--setups", "units,backend"])
    assert args.traces == ["h"] and args.setups == ["units", "backend"]
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--traces", "h", "--setups", "units,sideways"])
    assert exc.value.code == 2
