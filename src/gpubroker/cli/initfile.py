"""Write the commented ``gpubroker.yaml`` that ``gpubroker init`` produces.

Built as a ruamel.yaml round-trip document, so the comments are part of the tree: a later
load-edit-dump keeps them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from gpubroker.cli.detect import FoundService
from gpubroker.config.model import DEFAULT_STATUS_PORT
from gpubroker.telemetry.base import GpuSample

HEADER = """\
gpubroker configuration, written by `gpubroker init`.
Point each app at its backend's proxyPort instead of the service's own port.
Durations: 10s, 2m. Sizes: 9GiB, 512MiB. Check it with `gpubroker serve --check`.
"""

_STRATEGY = {"ollama": "ollama", "comfyui": "comfyui", "vllm": "vllm", "llamacpp": "generic"}
_DEFAULTS = (
    FoundService("ollama", 11434, "http://127.0.0.1:11434", ""),
    FoundService("comfyui", 8188, "http://127.0.0.1:8188", ""),
)


def _gib(nbytes: int) -> str:
    return f"{nbytes // 2**20}MiB"


def build_document(
    services: Sequence[FoundService], gpus: Sequence[GpuSample], gpu_notice: str | None
) -> CommentedMap:
    doc = CommentedMap()
    doc["statusPort"] = DEFAULT_STATUS_PORT
    doc.yaml_add_eol_comment(
        "status page + admin API; binds 127.0.0.1 unless `bind:` says", "statusPort", column=22
    )
    doc.yaml_set_comment_before_after_key(
        "policy",
        before="One endpoint for every model (OpenAI /v1 and Ollama /api), routed by `model`:\n"
        "apiPort: 5100              # base_url = http://localhost:5100/v1\n"
        "apiBodyLimit: 64MiB        # how much of a body is read to find its model\n"
        "modelRefresh: 30s          # how often each backend's model list is read again\n"
        "apiKeys:                   # Bearer keys; needed when the api port binds beyond loopback\n"
        "  - {name: ci, key: env:CI_KEY}\n"
        "Where learned memory footprints are kept (default: $XDG_STATE_HOME/gpubroker):\n"
        "stateDir: ~/.local/state/gpubroker",
    )
    doc["policy"] = "exclusive"
    doc.yaml_add_eol_comment("one service owns the GPU at a time", "policy", column=22)
    doc["queueTimeout"] = "120s"
    doc.yaml_add_eol_comment(
        "a GPU request waiting longer gets 503 + Retry-After", "queueTimeout", column=22
    )
    doc["unloadTimeout"] = "10s"
    doc.yaml_add_eol_comment(
        "how long an unload may take before the swap goes on", "unloadTimeout", column=22
    )
    doc["holdTime"] = "10s"
    doc.yaml_add_eol_comment(
        "how long the owner keeps admitting while others wait", "holdTime", column=22
    )

    if gpus:
        seq = CommentedSeq()
        for gpu in gpus:
            entry = CommentedMap()
            entry["id"] = gpu.uuid
            if gpu.memory_total is not None:
                entry["memory"] = _gib(gpu.memory_total)
            entry["reserve"] = "512MiB"
            seq.append(entry)
            entry.yaml_add_eol_comment(f"GPU {gpu.index}: {gpu.name}", "id")
        doc["gpus"] = seq
        doc.yaml_set_comment_before_after_key("gpus", before="GPUs found through NVML at init time")
    else:
        doc["gpus"] = "auto"
        why = gpu_notice or "no GPU found"
        doc.yaml_set_comment_before_after_key(
            "gpus",
            before=f"{why}; telemetry will be tried at start-up.\n"
            "To declare a GPU instead: gpus: [{id: 0, memory: 24GiB, reserve: 1GiB}]",
        )

    found = list(services)
    backends = CommentedSeq()
    for i, service in enumerate(found or _DEFAULTS):
        b = CommentedMap()
        b["name"] = service.kind
        b["proxyPort"] = 5001 + i
        b["upstream"] = service.upstream
        b["unloadStrategy"] = _STRATEGY[service.kind]
        if service.kind == "llamacpp":
            b["classifier"] = "llamacpp"
            b.yaml_add_eol_comment("llama-server has no unload endpoint", "unloadStrategy")
        if len(gpus) == 1:
            b["gpu"] = 0
        backends.append(b)
        note = f"found: {service.evidence}" if found else "not found running at init time"
        b.yaml_add_eol_comment(note, "name")
    doc["backends"] = backends
    doc.yaml_set_comment_before_after_key(
        "backends",
        before="One entry per GPU service. Optional per backend: vram, priority, pinned,\n"
        "gpuPaths, maxConcurrency, healthPath, idleTimeout, sleepLevel (vllm),\n"
        "progress (comments: SSE comments while a streaming request waits),\n"
        "models (else discovered): [llama3:8b, {name: qwen2.5:14b, aliases: [reasoner]}].\n"
        "Under policy: budget, what must never share the GPU (backends or declared models):\n"
        "exclusiveWith: [comfyui], and per model {name: llama3:70b, vram: 40GiB,\n"
        "pinned: true, exclusiveWith: [qwen2.5:14b]}.",
    )
    doc.yaml_set_start_comment(HEADER)
    return doc


def render(doc: CommentedMap) -> str:
    yaml = YAML(typ="rt")
    yaml.indent(mapping=2, sequence=4, offset=2)
    out = io.StringIO()
    yaml.dump(doc, out)
    return out.getvalue()
