"""How much a swap adds beyond the services' own unload and load (target: <= 20 ms).

Run by hand: ``.venv/bin/python bench/swap.py``. Each service under test (emulated, with known
unload and load times) takes turns with an instant generic backend behind a real broker; the
swap time the broker reports (``X-GPUBroker-Swap: ...; ms=N``) minus the service's own time is
the broker's overhead: polling, bookkeeping, the HTTP calls themselves.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx

from gpubroker.sim import GenericEmulator, GiB, OllamaEmulator, SimGPU, VLLMEmulator, running
from gpubroker.testing import broker_running, make_config

SERVICE_S = 0.23  # each emulated unload, sleep, load and wake takes this long
ROUNDS = 8
TARGET_MS = 20.0


def swap_ms(response: httpx.Response) -> float | None:
    header = response.headers.get("x-gpubroker-swap")
    if not header:
        return None
    return float(header.rsplit("ms=", 1)[1])


@asynccontextmanager
async def service(kind: str, gpu: SimGPU) -> AsyncIterator[tuple[dict[str, Any], str, Any]]:
    """(backend config, GPU request path, JSON body) for the service under test."""
    if kind == "generic":
        emu = GenericEmulator(
            gpu, 4 * GiB, owner="x", unload_seconds=SERVICE_S, load_seconds=SERVICE_S
        )
        spec = {"unloadStrategy": "generic", "unloadEndpoint": "/unload", "loadEndpoint": "/load"}
        body: Any = {"stream": False}
        path = "/generate"
    elif kind == "ollama":
        emu = OllamaEmulator(gpu, {"m:latest": 4 * GiB}, unload_seconds=SERVICE_S, load_seconds=0)
        spec = {"unloadStrategy": "ollama"}
        body, path = {"model": "m", "prompt": "x", "stream": False}, "/api/generate"
    else:
        emu = VLLMEmulator(
            gpu,
            "m",
            weights=3 * GiB,
            kv_cache=1 * GiB,
            sleep_seconds=SERVICE_S,
            wake_seconds=SERVICE_S,
        )
        spec = {"unloadStrategy": "vllm"}
        body, path = {"model": "m", "prompt": "x"}, "/v1/completions"
    async with running(emu.app) as url:
        yield {"upstream": url, **spec}, path, body


async def measure(kind: str) -> dict[str, list[float]]:
    gpu = SimGPU(24 * GiB)
    other = GenericEmulator(gpu, 1 * GiB, owner="y", load_seconds=0, unload_seconds=0)
    out: dict[str, list[float]] = {"evict": [], "bring back": []}
    async with service(kind, gpu) as (spec, path, body), running(other.app) as uo:
        cfg = make_config(
            {"x": spec, "y": {"upstream": uo, "unloadStrategy": "generic"}},
            telemetry="none",
            holdTime="0s",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=30) as client:
            await client.post(ep.proxies["x"] + path, json=body)
            for _ in range(ROUNDS):
                r = await client.post(ep.proxies["y"] + "/generate", json={"stream": False})
                if (ms := swap_ms(r)) is not None:
                    out["evict"].append(ms - SERVICE_S * 1000)
                r = await client.post(ep.proxies["x"] + path, json=body)
                # ollama loads inside the request (after admission), so nothing to subtract
                own = 0.0 if kind == "ollama" else SERVICE_S * 1000
                if (ms := swap_ms(r)) is not None:
                    out["bring back"].append(ms - own)
    return out


async def main() -> int:
    rows, worst = [], 0.0
    for kind in ("generic", "ollama", "vllm"):
        results = await measure(kind)
        for phase, overheads in results.items():
            med, top = statistics.median(overheads), max(overheads)
            worst = max(worst, med)
            rows.append(f"| {kind} | {phase} | {len(overheads)} | {med:.1f} | {top:.1f} |")
    print(
        f"service time per unload/load: {SERVICE_S * 1000:.0f} ms; target overhead "
        f"<= {TARGET_MS:.0f} ms (median)"
    )
    print("| service | swap | n | median overhead ms | max ms |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0 if worst <= TARGET_MS else 1


if __name__ == "__main__":
    code: Callable[[], Any] = main
    sys.exit(anyio.run(code))
