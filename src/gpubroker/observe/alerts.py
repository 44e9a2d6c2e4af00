"""The warnings engine: what an operator should look at, each with a stable code and a since.

Rules look at one set of :class:`Facts` (gathered once per telemetry sample) and keep what is
still true; an alert keeps its first ``since`` while it lasts, so "down for 3 minutes" is
honest. Pure: no I/O, every time passed in, so each rule is tested with plain data.

Codes (stable; dashboards and scripts may match on them):

- ``backend_down``: the upstream's health probe fails.
- ``unmanaged_gpu_process``: a process holds GPU memory and no backend owns it.
- ``gpu_near_full``: a GPU's memory is used past ``gpuNearFull``.
- ``pinned-to-wrong-GPU``: a backend's process runs on a GPU it is not set to (a backend with
  ``gpu:``, or a managed worker, which gpubroker pins to its ``gpu:``, GPU 0 by default).
- ``vram_mismatch``: a backend's declared ``vram`` is far from what it really holds.
- ``unload_not_freed``: after an unload the backend still holds more than it may
  (:func:`gpubroker.vram.freed_goal`).
- ``telemetry_failed``: the GPUs could not be read this time (e.g. NVML's GPU is lost).
- ``preload_failed``: a ``preload:`` target failed to load, or was skipped (it did not fit);
  it clears once its backend is resident.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gpubroker.config.model import BackendConfig
from gpubroker.config.units import format_size
from gpubroker.observe.attribution import Attribution
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.vram import GiB, MiB, freed_goal

UNMANAGED_MIN = 256 * MiB  # smaller strangers (a desktop's compositor) are not worth a warning
UNLOAD_GRACE = 3.0  # seconds a service may take to hand memory back after saying it unloaded
MISMATCH_MIN = GiB  # declared and measured may differ by this much, or a quarter, unremarked
PINNED_TO_WRONG_GPU = "pinned-to-wrong-GPU"
# Every code a warning may carry (the list above): /metrics exports one series per code.
ALERT_CODES = (
    "backend_down",
    "unmanaged_gpu_process",
    "gpu_near_full",
    PINNED_TO_WRONG_GPU,
    "vram_mismatch",
    "unload_not_freed",
    "telemetry_failed",
    "preload_failed",
)


@dataclass(frozen=True, slots=True)
class Alert:
    code: str
    subject: str  # what it is about: a backend name, "GPU 0", "pid 4242 on GPU 0", …
    message: str
    since: float  # wall-clock seconds
    backend: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "subject": self.subject,
            "backend": self.backend,
            "message": self.message,
            "since": self.since,
        }


@dataclass(frozen=True, slots=True)
class Facts:
    """What the rules look at, gathered once per sample."""

    now: float
    snapshot: TelemetrySnapshot
    attribution: Attribution
    backends: Sequence[BackendConfig]
    states: Mapping[str, str]  # backend -> scheduler state ("resident", "absent", …)
    gpus: Mapping[str, tuple[str, ...]]  # backend -> the GPU keys it is configured for
    health: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # resident model unit -> (backend, the model's declared vram, bytes measured for it)
    models: Mapping[str, tuple[str, int, int]] = field(default_factory=dict)
    split: frozenset[str] = frozenset()  # backends placed model by model
    preload: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # target -> backend, why


def _gib(nbytes: int) -> str:
    return format_size(nbytes)


def _mismatch(declared: int, measured: int) -> bool:
    """A declared size telemetry contradicts: off by a quarter (and MISMATCH_MIN), and not far
    below it (that is more likely a service that unloaded itself: keep_alive)."""
    return abs(measured - declared) >= max(MISMATCH_MIN, declared / 4) and (
        measured >= declared / 4
    )


def _suggest(measured: int) -> str:
    """A ``vram:`` a little above what was measured, in half GiB."""
    return f"{math.ceil(measured * 1.05 / (GiB / 2)) / 2:g}GiB"


class Alerts:
    """Keeps the active alerts between evaluations; one per broker."""

    def __init__(self, near_full: float = 0.95) -> None:
        self.near_full = near_full
        self.active: dict[tuple[str, str], Alert] = {}
        self._last_good: dict[str, tuple[float, float]] = {}  # backend -> (latency ms, at)
        self._unloads: dict[str, tuple[float, int | None]] = {}  # backend -> (at, held before)

    def unloaded(self, backend: str, at: float, held_before: int | None) -> None:
        """The broker freed ``backend`` at ``at``; later samples should show its memory gone."""
        self._unloads[backend] = (at, held_before)

    def current(self) -> list[Alert]:
        return sorted(self.active.values(), key=lambda a: (a.since, a.code, a.subject))

    def evaluate(self, facts: Facts) -> tuple[list[Alert], list[Alert]]:
        """Apply every rule; returns the alerts just raised and those just cleared."""
        found: dict[tuple[str, str], tuple[str, str | None]] = {}

        def add(code: str, subject: str, message: str, backend: str | None = None) -> None:
            found[(code, subject)] = (message, backend)

        self._health(facts, add)
        for target, (owner, why) in facts.preload.items():
            if facts.states.get(owner) != "resident":
                add("preload_failed", target, f"preload of {target} {why}", owner or None)
        if facts.snapshot.error:
            add("telemetry_failed", "telemetry", f"GPU telemetry failed: {facts.snapshot.error}")
        else:
            self._gpus(facts, add)
            self._processes(facts, add)
            self._sizes(facts, add)
            self._unload(facts, add)
        raised, cleared = [], []
        for key in list(self.active):
            if key not in found:
                cleared.append(self.active.pop(key))
        for key, (message, backend) in found.items():
            old = self.active.get(key)
            if old is None:
                self.active[key] = Alert(key[0], key[1], message, facts.now, backend)
                raised.append(self.active[key])
            elif old.message != message:
                self.active[key] = replace(old, message=message)
        return raised, cleared

    # --- rules ----------------------------------------------------------------------------

    def _health(self, facts: Facts, add: Any) -> None:
        for b in facts.backends:
            h = facts.health.get(b.name)
            if not h:
                continue
            if h.get("status") == "up":
                self._last_good[b.name] = (h.get("latencyMs", 0.0), h.get("checkedAt", facts.now))
                continue
            if h.get("status") != "down":
                continue
            why = h.get("error") or (f"HTTP {h['code']}" if "code" in h else "no answer")
            last = self._last_good.get(b.name)
            tail = (
                f"; last good probe took {last[0]:.0f} ms, {facts.now - last[1]:.0f}s ago"
                if last
                else "; no probe has succeeded since the broker started"
            )
            add("backend_down", b.name, f"{b.name} fails its health probe ({why}){tail}", b.name)

    def _gpus(self, facts: Facts, add: Any) -> None:
        for g in facts.snapshot.gpus:
            if not g.memory_total or g.memory_used is None:
                continue
            share = g.memory_used / g.memory_total
            if share >= self.near_full:
                add(
                    "gpu_near_full",
                    f"GPU {g.index}",
                    f"GPU {g.index} memory is {share:.0%} used ({_gib(g.memory_used)} of "
                    f"{_gib(g.memory_total)})",
                )

    def _processes(self, facts: Facts, add: Any) -> None:
        for p in facts.attribution.processes:
            label = f"pid {p.pid}" + (f" ({p.name})" if p.name else "")
            if p.owner is None:
                if not p.visible or (p.used is not None and p.used < UNMANAGED_MIN):
                    continue
                held = "an unknown amount" if p.used is None else _gib(p.used)
                add(
                    "unmanaged_gpu_process",
                    f"pid {p.pid} on GPU {p.gpu}",
                    f"{label} holds {held} on GPU {p.gpu} and belongs to no backend "
                    "(gpubroker cannot free it; a service in a container shows up this way)",
                )
                continue
            backend = next((b for b in facts.backends if b.name == p.owner), None)
            if backend is None or not (backend.gpu or backend.command):
                continue  # no `gpu:` and not ours to pin: wherever it runs is fine
            wanted = facts.gpus.get(p.owner, ())
            if p.gpu in wanted:
                continue
            fix = (
                "gpubroker pins it with CUDA_VISIBLE_DEVICES: does its command choose a device "
                "itself?"
                if backend.command
                else "pin it with CUDA_VISIBLE_DEVICES=<GPU UUID>"
            )
            add(
                PINNED_TO_WRONG_GPU,
                f"{p.owner} on GPU {p.gpu}",
                f"{p.owner} is set to GPU {', '.join(wanted)} but its {label} runs on GPU "
                f"{p.gpu}; {fix}",
                p.owner,
            )

    def _sizes(self, facts: Facts, add: Any) -> None:
        for b in facts.backends:
            measured = facts.attribution.total(b.name)
            if facts.states.get(b.name) != "resident" or b.vram is None or not measured:
                continue
            if b.name in facts.split:
                continue  # placed model by model: each model's own figure is compared below
            if _mismatch(b.vram, measured):
                add(
                    "vram_mismatch",
                    b.name,
                    f"{b.name} declares vram {_gib(b.vram)} but holds {_gib(measured)}; "
                    f"set `vram: {_suggest(measured)}`",
                    b.name,
                )
        for unit, (backend, declared, measured) in sorted(facts.models.items()):
            if _mismatch(declared, measured):
                add(
                    "vram_mismatch",
                    unit,
                    f"{unit} declares vram {_gib(declared)} but holds {_gib(measured)}; set "
                    f"`vram: {_suggest(measured)}` on that model under {backend}'s models:",
                    backend,
                )

    def _unload(self, facts: Facts, add: Any) -> None:
        for b in facts.backends:
            record = self._unloads.get(b.name)
            if record is None:
                continue
            if facts.states.get(b.name) not in ("absent", "asleep"):
                del self._unloads[b.name]  # it was brought back: nothing left to check
                continue
            at, before = record
            if facts.snapshot.taken_at < at + UNLOAD_GRACE:
                continue
            now_held = facts.attribution.total(b.name)
            if now_held is None or now_held <= freed_goal(before or b.vram or 0):
                del self._unloads[b.name]
                continue
            add(
                "unload_not_freed",
                b.name,
                f"{b.name} was unloaded {facts.now - at:.0f}s ago but still holds "
                f"{_gib(now_held)}" + (f" of {_gib(before)}" if before else ""),
                b.name,
            )
