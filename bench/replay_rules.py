"""The peers' victim rules, as choosers for :class:`~gpubroker.scheduling.scheduler.Scheduler`.

Each is ``(shortfall, candidates, now) -> names | None`` like
:func:`~gpubroker.scheduling.victims.choose_victims`, so every policy runs through the same
scheduler and only the rule differs. All of them keep what the scheduler's own rules protect
(a pinned unit, one inside its minimum residency): the peers have their equivalents (Ollama's
``keep_alive: -1``, Lemonade's ``pinned``, LM Studio's manually loaded models). None of them
spares a victim the others already cover: they evict one at a time until the new one fits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from gpubroker.scheduling.scheduler import Chooser
from gpubroker.scheduling.victims import Candidate


def _take(shortfall: int, ordered: Sequence[Candidate]) -> list[str] | None:
    """The first candidates, in order, until ``shortfall`` is covered (None: it never is)."""
    if shortfall <= 0:
        return []
    chosen: list[str] = []
    freed = 0
    for c in ordered:
        if freed >= shortfall:
            break
        chosen.append(c.name)
        freed += c.frees
    return chosen if freed >= shortfall else None


def _movable(candidates: Sequence[Candidate]) -> list[Candidate]:
    return [c for c in candidates if not c.pinned and not c.protected]


def lru(shortfall: int, candidates: Sequence[Candidate], now: float = 0.0) -> list[str] | None:
    """Least recently used first, regardless of priority or cost, until it fits: the rule our
    issue ascribes to Ollama across its models and to LM Studio (LM Studio's documented
    default, Auto-Evict, is stricter still: it unloads every previously JIT-loaded model before
    loading a new one, https://lmstudio.ai/docs/api/ttl-and-auto-evict, i.e. one at a time)."""
    return _take(shortfall, sorted(_movable(candidates), key=lambda c: (c.last_used, c.name)))


def ollama(busy: Callable[[str], bool]) -> Chooser:
    """Ollama's own order (server/sched.go ``findRunnerToUnload`` with ``ByDurationAndName``,
    ollama/ollama@fb30760): an idle runner first, shortest keep-alive first (all equal at the
    default 5 min), then by model path — a blob's sha256, so in effect an arbitrary fixed
    order, not recency; one at a time until the new model fits."""

    def choose(shortfall: int, candidates: Sequence[Candidate], now: float) -> list[str] | None:
        def key(c: Candidate) -> tuple[bool, str]:
            return (busy(c.name), hashlib.sha256(c.name.encode()).hexdigest())

        return _take(shortfall, sorted(_movable(candidates), key=key))

    return choose


def lemonade(load_s: Callable[[str], float], busy: Callable[[str], bool]) -> Chooser:
    """Lemonade's eviction engine (src/cpp/server/eviction_engine.cpp ``evaluate_servers``,
    lemonade-sdk/lemonade@e385039): score = idle time / (last load duration x weight factor,
    1 by default; a load never timed counts 1 s); the highest score goes first, a model serving
    a request is not a candidate (``IN_USE``) unless nothing idle frees enough here."""

    def choose(shortfall: int, candidates: Sequence[Candidate], now: float) -> list[str] | None:
        def score(c: Candidate) -> tuple[bool, float, str]:
            idle = max(0.0, now - c.last_used)
            return (busy(c.name), -idle / max(load_s(c.name), 1e-3), c.name)

        return _take(shortfall, sorted(_movable(candidates), key=score))

    return choose
