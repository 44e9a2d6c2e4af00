"""What changed between the config a broker runs and the file it re-read, and what of that a
running broker can apply (``gpubroker reload``, SIGHUP, ``serve --watch-config``).

Applied live: backends added, removed or changed (but for their ``gpu:``), and the top-level
timings in :data:`LIVE_TOP`. Everything else (the ports and address of the broker's own
listeners, who may call them, the policy, the GPUs, telemetry, plugins, where state is kept,
and any key this module does not name, so a key added later is safe by default) is reported as
needing a restart and keeps its running value: :func:`applicable` is the config that runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from gpubroker.config.keys import BACKEND_KEYS, TOP_KEYS
from gpubroker.config.model import BackendConfig, Config

LIVE_TOP = frozenset(
    {
        "queue_timeout",
        "unload_timeout",
        "hold_time",
        "min_residency",
        "priority_aging",
        "upstream_timeout",
        "upstream_idle_timeout",
        "shutdown_grace",
    }
)
"""Top-level settings a running broker takes at once (for its next decisions)."""
RESTART_BACKEND = frozenset({"gpu"})
"""Backend keys that need a restart: the scheduler's GPU domains are fixed at start-up."""
_IGNORED = frozenset({"backends", "source", "locations"})

_TOP_NAMES = {f.attr: key for key, f in TOP_KEYS.items()}
_BACKEND_NAMES = {f.attr: key for key, f in BACKEND_KEYS.items()}


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """Backends ``added``/``removed``; ``changed``: backend -> the file keys that changed;
    ``top``: live top-level keys that changed; ``restart``: keys that changed and wait for a
    restart (``bind``, ``backends[ollama].gpu``). Key names are the file's own."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: dict[str, tuple[str, ...]] = field(default_factory=dict)
    top: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to apply (restart-only changes may still be waiting)."""
        return not (self.added or self.removed or self.changed or self.top)

    def to_json(self) -> dict[str, Any]:
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "changed": {name: list(keys) for name, keys in self.changed.items()},
            "settings": list(self.top),
            "needsRestart": list(self.restart),
        }

    def summary(self) -> str:
        """One line for the log and the CLI."""
        parts = []
        if self.added:
            parts.append("added " + ", ".join(self.added))
        if self.removed:
            parts.append("removed " + ", ".join(self.removed))
        for name, keys in self.changed.items():
            parts.append(f"changed {name} ({', '.join(keys)})")
        if self.top:
            parts.append("settings " + ", ".join(self.top))
        text = "; ".join(parts) or "nothing changed"
        if self.restart:
            text += "; needs a restart: " + ", ".join(self.restart)
        return text


def _changed(old: Any, new: Any, names: Iterable[str]) -> list[str]:
    return [n for n in names if getattr(old, n) != getattr(new, n)]


def _attrs(obj: Any) -> list[str]:
    return [f.name for f in fields(obj) if f.name not in _IGNORED]


def diff(old: Config, new: Config) -> ConfigDiff:
    """What changed from ``old`` (running) to ``new`` (the file re-read)."""
    top = _changed(old, new, _attrs(old))
    live = tuple(_TOP_NAMES.get(a, a) for a in top if a in LIVE_TOP)
    restart = [_TOP_NAMES.get(a, a) for a in top if a not in LIVE_TOP]
    olds = {b.name: b for b in old.backends}
    news = {b.name: b for b in new.backends}
    changed: dict[str, tuple[str, ...]] = {}
    for name in olds.keys() & news.keys():
        keys = _changed(olds[name], news[name], _attrs(olds[name]))
        restart += [
            f"backends[{name}].{_BACKEND_NAMES.get(a, a)}" for a in keys if a in RESTART_BACKEND
        ]
        applied = tuple(_BACKEND_NAMES.get(a, a) for a in keys if a not in RESTART_BACKEND)
        if applied:
            changed[name] = applied
    order = [b.name for b in new.backends]
    return ConfigDiff(
        added=tuple(n for n in order if n not in olds),
        removed=tuple(b.name for b in old.backends if b.name not in news),
        changed={n: changed[n] for n in order if n in changed},
        top=live,
        restart=tuple(restart),
    )


def applicable(old: Config, new: Config) -> Config:
    """The config a running broker moves to: ``new``, with every key that needs a restart
    kept at its running value (:func:`diff` of ``old`` and this lists only what applies)."""
    keep = {a: getattr(old, a) for a in _attrs(old) if a not in LIVE_TOP}
    olds = {b.name: b for b in old.backends}
    backends = tuple(_keep_backend(olds[b.name], b) if b.name in olds else b for b in new.backends)
    return replace(new, backends=backends, **keep)


def _keep_backend(old: BackendConfig, new: BackendConfig) -> BackendConfig:
    return replace(new, **{a: getattr(old, a) for a in RESTART_BACKEND})
