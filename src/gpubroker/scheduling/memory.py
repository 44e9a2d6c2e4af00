"""What the broker remembers across a restart: the state file's ``broker`` section.

Kept: the last ``HISTORY`` swaps (the status page's and ``status --watch``'s history), the swap
count (``swapCount``, ``gpubroker_swaps``) and each backend's request counters (``gpu``,
``passthrough``, ``refused``, ``upstream_errors``: ``gpubroker_requests``,
``gpubroker_refusals``, ``gpubroker_upstream_errors``), so those totals continue across a
restart rather than falling to zero. Not kept: what is true only of a running process (leases,
the queue, residency: that is read from the services again at start, ``Broker.reconcile``), and
uptime. A backend no longer configured is dropped; a record that does not parse is dropped with
one log line.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from gpubroker.scheduling.effects import SwapInfo, SwapRecord
from gpubroker.statefile import Section, is_time

log = logging.getLogger("gpubroker.scheduling.broker")

COUNTERS = ("gpu", "passthrough", "refused", "upstream_errors")
LOOK_EVERY = 5.0  # seconds between looks at whether the counters moved


class Memory:
    """The broker's section: restores the history and counters an earlier run left into the
    broker's own ``history`` and ``counters`` (it keeps them, this reads them at each save), and
    tells the state file when they change: a swap at once (:meth:`swapped`), the counters at
    most every ``LOOK_EVERY`` (:meth:`keep`), so nothing is added to the lease path."""

    def __init__(
        self,
        section: Section,
        history: deque[SwapRecord],
        counters: dict[str, dict[str, int]],
        swaps_now: Callable[[], int],
    ) -> None:
        self.section = section
        self.history = history
        self.counters = counters
        self.swaps_now = swaps_now
        got = decode(section.loaded, counters, history.maxlen or 50)
        history.extend(got.history)
        self.before = got.swaps  # swaps of earlier runs: swapCount continues
        for backend, values in got.counters.items():
            counters[backend].update(values)
        section.provide(self.encode)

    def encode(self) -> dict[str, Any]:
        return encode(self.history, self.before + self.swaps_now(), self.counters)

    def swapped(self) -> None:
        self.section.changed()

    def _fingerprint(self) -> tuple[int, int, float]:
        total = sum(sum(c.values()) for c in self.counters.values())
        return total, self.swaps_now(), self.history[0].at if self.history else 0.0

    async def keep(self) -> None:
        seen = self._fingerprint()
        while True:
            await anyio.sleep(LOOK_EVERY)
            now = self._fingerprint()
            if now != seen:
                seen = now
                self.section.changed()


@dataclass(slots=True)
class Remembered:
    """What an earlier run left: its swaps (newest first), its swap count and its counters."""

    history: list[SwapRecord] = field(default_factory=list)
    swaps: int = 0
    counters: dict[str, dict[str, int]] = field(default_factory=dict)


def encode(
    history: Iterable[SwapRecord], swaps: int, counters: Mapping[str, Mapping[str, int]]
) -> dict[str, Any]:
    return {
        "swaps": swaps,
        "counters": {b: dict(c) for b, c in counters.items()},
        "history": [
            {
                "at": r.at,
                "target": r.info.target,
                "evicted": list(r.info.evicted),
                "drain": r.info.drain_s,
                "unload": r.info.unload_s,
                "load": r.info.load_s,
                "failures": list(r.info.failures),
                "reason": r.info.reason,
            }
            for r in history
        ],
    }


def decode(data: Any, backends: Iterable[str], limit: int) -> Remembered:
    """The section as saved, for the backends configured now; anything malformed is left out."""
    out = Remembered()
    if data is None:
        return out
    if not isinstance(data, Mapping):
        log.warning("state file: the broker section is not an object; ignored")
        return out
    names = set(backends)
    swaps = data.get("swaps")
    if isinstance(swaps, int) and not isinstance(swaps, bool) and swaps >= 0:
        out.swaps = swaps
    counters = data.get("counters")
    if isinstance(counters, Mapping):
        for backend, values in counters.items():
            if backend in names and isinstance(values, Mapping):
                out.counters[backend] = {
                    k: v
                    for k, v in values.items()
                    if k in COUNTERS and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                }
    history = data.get("history")
    bad, why = 0, ""
    for raw in history if isinstance(history, list) else []:
        try:
            out.history.append(_record(raw))
        except (TypeError, ValueError) as exc:
            bad, why = bad + 1, why or str(exc)
        if len(out.history) >= limit:
            break
    if bad:  # one line, however many: a file of junk must not flood the log at each start
        log.warning("state file: %d swap(s) of the history ignored (the first: %s)", bad, why)
    return out


def _record(raw: Any) -> SwapRecord:
    if not isinstance(raw, Mapping):
        raise ValueError("not an object")
    at = raw.get("at")
    times = [raw.get(k) for k in ("drain", "unload", "load")]
    if not is_time(at) or not all(is_time(t) for t in times):
        raise ValueError("its times are not numbers")
    target = raw.get("target")
    evicted, failures = raw.get("evicted"), raw.get("failures", [])
    if target is not None and not isinstance(target, str):
        raise ValueError(f"target {target!r}")
    for name, items in (("evicted", evicted), ("failures", failures)):
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"{name} is not a list of strings")
    assert isinstance(evicted, list) and isinstance(failures, list)
    drain, unload, load = (float(t) for t in times)  # type: ignore[arg-type]
    info = SwapInfo(
        target,
        tuple(evicted),
        drain,
        unload,
        load,
        tuple(failures),
        str(raw.get("reason", "request")),
    )
    return SwapRecord(float(at), info)
