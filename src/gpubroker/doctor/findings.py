"""What a check reports, and the JSON ``gpubroker doctor --json`` prints.

``--json`` prints a JSON array, one object per finding, in the order the checks are listed::

    {"check": "vllm", "severity": "error", "backend": "vllm",
     "message": "vLLM runs without VLLM_SERVER_DEV_MODE=1: ...",
     "fix": "start vLLM with VLLM_SERVER_DEV_MODE=1 ...",
     "facts": {"url": "http://127.0.0.1:8000", "version": "0.33.0", "devMode": false}}

``check`` names the family (``config``, ``gpu``, ``ports``, ``command``, ``upstream``,
``ollama``, ``vllm``, ``comfyui``, ``llamacpp``); ``severity`` is ``error`` (gpubroker cannot
work as configured: the exit code is 1), ``warning`` (it works, worse than it could),
``info`` (worth knowing) or ``ok``; ``backend`` is null for findings about the whole set-up;
``fix`` is null where nothing needs changing; ``facts`` holds what was read (versions, ports,
pids, device types), in camelCase, and may grow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info", "ok"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a check found: how bad, what, and what to change (``fix``)."""

    check: str
    severity: Severity
    message: str
    fix: str | None = None
    backend: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "severity": self.severity,
            "backend": self.backend,
            "message": self.message,
            "fix": self.fix,
            "facts": dict(self.facts),
        }


def exit_code(findings: Iterable[Finding]) -> int:
    """0 when nothing is an error, else 1."""
    return 1 if any(f.severity == "error" for f in findings) else 0
