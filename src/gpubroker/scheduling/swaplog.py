"""A swap's phases in the log, at info: what it frees and why, each victim's unload and how long
it took, the load, and the end with its phase timings.

The broker hands every scheduler note and every finished plan here; the same lines serve the
text log and ``--log-format json`` (``extra=``: ``backend``, ``unit``, ``model``, ``swap``,
``phase``, ``duration_ms``...). A few lines per swap, never per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gpubroker.scheduling.effects import Note, SwapDone
from gpubroker.scheduling.scheduler import Scheduler

log = logging.getLogger("gpubroker.swap")


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class SwapLog:
    """Times each victim's unload and the target's load from the notes that start and end them."""

    def __init__(self, sched: Scheduler, clock: Callable[[], float]) -> None:
        self._sched = sched
        self._clock = clock
        self._began: dict[tuple[object, str], float] = {}

    def _names(self, unit: str | None) -> dict[str, object]:
        if unit is None or unit not in self._sched.slots:
            return {"backend": None}
        spec = self._sched.slots[unit].spec
        names: dict[str, object] = {"backend": spec.backend, "unit": unit}
        if spec.model is not None:
            names["model"] = spec.model
        return names

    def note(self, note: Note) -> None:
        """Log the phase a scheduler note starts or ends (notes of no phase are left out)."""
        d, unit = note.detail, note.backend
        swap = d.get("swap")
        extra: dict[str, object] = {"swap": swap, **self._names(unit)}
        if note.kind == "swap_started":
            victims = [str(v) for v in d.get("victims") or ()]  # type: ignore[attr-defined]
            extra.update(phase="start", victims=victims, reason=d.get("reason", "request"))
            log.info(
                "swap %s: for %s, freeing %s (%s)",
                swap,
                unit or "nothing",
                ", ".join(victims) or "nothing",
                extra["reason"],
                extra=extra,
            )
        elif note.kind in ("unloading", "loading") and unit is not None:
            self._began[(swap, unit)] = self._clock()
            if note.kind == "loading":
                extra.update(phase="load", wake=bool(d.get("wake")))
                log.info(
                    "swap %s: %s %s", swap, "waking" if d.get("wake") else "loading", unit,
                    extra=extra,
                )  # fmt: skip
        elif note.kind == "unloaded" and unit is not None:
            took = self._took(swap, unit)
            error = d.get("error")
            extra.update(phase="unload", duration_ms=took, error=error, holding=d.get("holding"))
            if error:
                log.info("swap %s: unloading %s failed after %s ms", swap, unit, took, extra=extra)
            else:
                log.info("swap %s: %s unloaded in %s ms", swap, unit, took, extra=extra)
        elif note.kind == "load_failed" and unit is not None:
            took = self._took(swap, unit)
            extra.update(phase="load_failed", duration_ms=took, error=d.get("error"))
            log.warning(
                "swap %s: loading %s failed after %s ms: %s", swap, unit, took, d.get("error"),
                extra=extra,
            )  # fmt: skip
        elif note.kind in ("swap_failed", "swap_abandoned"):
            extra.update(phase=note.kind.removeprefix("swap_"))
            log.info("swap %s %s (for %s)", swap, extra["phase"], unit or "nothing", extra=extra)
            self._forget(swap)

    def done(self, effect: SwapDone) -> None:
        """Log a finished plan with its total and each phase's share."""
        info = effect.info
        self._forget(effect.swap)
        extra: dict[str, object] = {
            "swap": effect.swap,
            **self._names(info.target),
            "phase": "done",
            "evicted": list(info.evicted),
            "duration_ms": _ms(info.total_s),
            "drain_ms": _ms(info.drain_s),
            "unload_ms": _ms(info.unload_s),
            "load_ms": _ms(info.load_s),
            "reason": info.reason,
        }
        if info.failures:
            extra["failures"] = list(info.failures)
        log.info(
            "swap %s done: %s ready in %s ms (drain %s, unload %s, load %s ms)",
            effect.swap,
            info.target or "nothing",
            extra["duration_ms"],
            extra["drain_ms"],
            extra["unload_ms"],
            extra["load_ms"],
            extra=extra,
        )

    def _took(self, swap: object, unit: str) -> int | None:
        began = self._began.pop((swap, unit), None)
        return None if began is None else _ms(self._clock() - began)

    def _forget(self, swap: object) -> None:
        for key in [k for k in self._began if k[0] == swap]:
            del self._began[key]
