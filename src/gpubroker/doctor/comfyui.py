"""ComfyUI: reachable, its version, and the device it computes on.

``GET /system_stats`` (Comfy-Org/ComfyUI server.py ``system_stats``) answers
``{"system": {"comfyui_version", ...}, "devices": [{"name", "type", "index", "vram_total",
...}]}``, ``type`` being torch's device type (``comfy.model_management.get_torch_device``):
``cuda`` on NVIDIA (and ROCm) cards, ``cpu`` when started with ``--cpu`` or without a usable GPU,
``mps``, ``xpu``, ``npu``, ``mlu``, ``privateuseone`` (DirectML) elsewhere.
"""

from __future__ import annotations

from typing import Any

import httpx

from gpubroker.config.model import BackendConfig, Config
from gpubroker.config.units import format_size
from gpubroker.doctor.findings import Finding
from gpubroker.doctor.services import fetch, json_of


async def check(client: httpx.AsyncClient, cfg: Config, backend: BackendConfig) -> list[Finding]:
    response = await fetch(client, backend.upstream.rstrip("/") + "/system_stats")
    body = json_of(response)
    facts: dict[str, Any] = {"url": backend.upstream, "kind": "comfyui"}
    system = body.get("system") if isinstance(body, dict) else None
    devices = body.get("devices") if isinstance(body, dict) else None
    if response.status_code != 200 or not isinstance(system, dict) or not devices:
        return [
            Finding(
                "comfyui",
                "error",
                f"{backend.upstream}/system_stats answers {response.status_code} without "
                "ComfyUI's system and devices: is it ComfyUI?",
                f"point `upstream:` at ComfyUI (default port 8188), or give {backend.name} "
                "the strategy of what runs there",
                backend.name,
                facts,
            )
        ]
    device = devices[0] if isinstance(devices[0], dict) else {}
    kind, name = device.get("type"), device.get("name")
    total = device.get("vram_total")
    facts.update(version=system.get("comfyui_version"), device=kind, deviceName=name)
    version = facts["version"] or "(version unknown)"
    out = [
        Finding(
            "upstream",
            "ok",
            f"ComfyUI {version} at {backend.upstream}, on {name or kind}",
            backend=backend.name,
            facts=dict(facts),
        )
    ]
    if kind == "cpu":
        out.append(
            Finding(
                "comfyui",
                "warning",
                "ComfyUI computes on the CPU (devices[0].type cpu): it holds no GPU memory, "
                "yet each of its prompts makes gpubroker free the GPU for it, so other "
                "backends wait for nothing",
                "start ComfyUI on the GPU (without --cpu; check its torch has CUDA), or, if "
                "CPU is meant, reach it directly rather than through gpubroker",
                backend.name,
                facts,
            )
        )
    elif kind not in ("cuda", None):
        size = f" ({format_size(total)})" if isinstance(total, int) else ""
        out.append(
            Finding(
                "comfyui",
                "info",
                f"ComfyUI runs on {kind}{size}: gpubroker's telemetry reads NVIDIA cards only "
                "(NVML), so its memory is never measured",
                f"declare `vram:` on {backend.name} (and the card under `gpus:`) so budgets hold",
                backend.name,
                facts,
            )
        )
    return out
