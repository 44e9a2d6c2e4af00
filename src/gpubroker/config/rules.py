"""The residency rules between backends and models: ``exclusiveWith`` and ``pinned``.

A name in ``exclusiveWith`` (on a backend, or on a model in its ``models:``) is a backend's name
or a model name/alias some backend declares; it resolves to a :class:`UnitRef`. A backend's
rule holds for each of its units (itself, or each of its models where the backend places model
by model), so a pinned backend pins its models too. The relation is symmetric: one side naming
the other is enough. ``check_residency`` refuses, at load, what could never be meant:

- a name nobody declares (discovered models are not known at load, so they cannot be named);
- a name that could mean two things (a model two backends declare, a backend and a model);
- a unit exclusive with itself (a backend naming itself or one of its own models, a model
  naming itself or its own backend): it could never be resident;
- two pinned units exclusive with each other: never both resident, yet neither evictable.

``exclusions`` is the resolved, symmetric relation, for the scheduler's domains to turn into
unit names. Imports only the config model and ``errors``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gpubroker.config.model import BackendConfig, Config
from gpubroker.errors import ConfigError

Fail = Callable[[str, str], ConfigError]  # (keypath, message) -> the located error


@dataclass(frozen=True, slots=True, order=True)
class UnitRef:
    """What a name in ``exclusiveWith`` stands for: a whole backend (``model`` None) or one
    model a backend declares, by its declared ``name`` (an alias resolves to it)."""

    backend: str
    model: str | None = None

    def __str__(self) -> str:  # the unit's name when the backend places model by model
        return self.backend if self.model is None else f"{self.backend}/{self.model}"


class _Index:
    """Every name ``exclusiveWith`` may use, and what is pinned."""

    def __init__(self, backends: Sequence[BackendConfig]) -> None:
        self.backends = {b.name: b for b in backends}
        self.models: dict[str, list[UnitRef]] = {}  # name or alias -> where it is declared
        self.pinned_models: dict[str, list[str]] = {}  # backend -> its pinned models
        for b in backends:
            for m in b.models or ():
                for name in m.names:
                    self.models.setdefault(name, []).append(UnitRef(b.name, m.name))
                if m.pinned:
                    self.pinned_models.setdefault(b.name, []).append(m.name)

    def resolve(self, name: str) -> UnitRef | str:
        """The unit ``name`` stands for, or why it stands for none (a message)."""
        sites = self.models.get(name, [])
        if name in self.backends and sites:
            return (
                f"{name!r} is both a backend and a model declared under {sites[0].backend}, "
                "so exclusiveWith cannot tell which is meant; rename one of them"
            )
        if name in self.backends:
            return UnitRef(name)
        if len(sites) > 1:
            owners = " and ".join(s.backend for s in sites)
            return (
                f"model {name!r} is declared under {owners}, so exclusiveWith cannot tell which "
                f"is meant; name the backend instead ({owners})"
            )
        if sites:
            return sites[0]
        return self._unknown(name)

    def _unknown(self, name: str) -> str:
        known = [*self.backends, *self.models]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        models = ", ".join(self.models) if self.models else (
            "none (only models listed under a backend's `models:` can be named)"
        )  # fmt: skip
        return (
            f"unknown name {name!r} in exclusiveWith{hint}; backends are "
            f"{', '.join(self.backends)}; declared models are {models}"
        )

    def why_pinned(self, ref: UnitRef) -> str | None:
        """Why some unit of ``ref`` may never be evicted, or None."""
        backend = self.backends[ref.backend]
        if ref.model is None:
            if backend.pinned:
                return f"backend {ref.backend!r} is pinned"
            pinned = self.pinned_models.get(ref.backend)
            return f"backend {ref.backend!r} has pinned model {pinned[0]!r}" if pinned else None
        if ref.model in self.pinned_models.get(ref.backend, ()):
            return f"model {str(ref)!r} is pinned"
        if backend.pinned:
            return f"model {str(ref)!r} is pinned with its backend"
        return None


def _declarations(backends: Sequence[BackendConfig]) -> list[tuple[UnitRef, str, str]]:
    """Every ``exclusiveWith`` entry: (who declares it, the name, its keypath)."""
    out: list[tuple[UnitRef, str, str]] = []
    for i, b in enumerate(backends):
        for j, name in enumerate(b.exclusive_with):
            out.append((UnitRef(b.name), name, f"backends[{i}].exclusiveWith[{j}]"))
        for k, m in enumerate(b.models or ()):
            for j, name in enumerate(m.exclusive_with):
                path = f"backends[{i}].models[{k}].exclusiveWith[{j}]"
                out.append((UnitRef(b.name, m.name), name, path))
    return out


def _self_reference(owner: UnitRef, target: UnitRef, name: str) -> str | None:
    """Why ``owner`` naming ``target`` makes a unit exclusive with itself, or None."""
    if owner.backend != target.backend:
        return None
    if owner.model is None and target.model is None:
        return (
            f"backend {owner.backend!r} names itself: a unit exclusive with itself could "
            "never be resident"
        )
    if owner.model is None:
        return (
            f"backend {owner.backend!r} names its own model {name!r}: the backend's "
            f"exclusiveWith holds for each of its models, {target.model!r} included, which "
            "cannot be exclusive with itself; put exclusiveWith on the models that must not "
            f"share the GPU with {target.model!r}"
        )
    if target.model is None:
        return (
            f"model {owner.model!r} names its own backend {name!r}, which includes the model "
            "itself, and a unit exclusive with itself could never be resident; name the "
            "backend's other models instead"
        )
    if owner.model == target.model:
        as_ = "" if name == owner.model else f" (as {name!r})"
        return (
            f"model {owner.model!r} names itself{as_}: a unit exclusive with itself could "
            "never be resident"
        )
    return None  # a sibling model of the same backend: meaningful


def check_residency(backends: Sequence[BackendConfig], fail: Fail) -> None:
    """Raise the located error of the first ``exclusiveWith`` entry that cannot be meant."""
    index = _Index(backends)
    for owner, name, path in _declarations(backends):
        target = index.resolve(name)
        if isinstance(target, str):
            raise fail(path, target)
        why = _self_reference(owner, target, name)
        if why:
            raise fail(path, why)
        pinned_owner, pinned_target = index.why_pinned(owner), index.why_pinned(target)
        if pinned_owner and pinned_target:
            raise fail(
                path,
                f"{pinned_owner} and {pinned_target}: exclusive, they could never both be "
                "resident, yet neither may be evicted; unpin one or drop this entry",
            )


def exclusions(backends: Sequence[BackendConfig]) -> Mapping[UnitRef, frozenset[UnitRef]]:
    """The symmetric ``exclusiveWith`` relation of a checked config: each ref that takes part
    and the refs it must never be resident beside (whole backends stay whole refs)."""
    index = _Index(backends)
    out: dict[UnitRef, set[UnitRef]] = {}
    for owner, name, _ in _declarations(backends):
        target = index.resolve(name)
        if isinstance(target, str):  # not a checked config: nothing to resolve
            raise ValueError(target)
        out.setdefault(owner, set()).add(target)
        out.setdefault(target, set()).add(owner)
    return {ref: frozenset(refs) for ref, refs in out.items()}


def residency_notes(cfg: Config) -> tuple[str, ...]:
    """One line when the rules are set but ``policy: exclusive`` makes them moot."""
    models = [m for b in cfg.backends for m in b.models or ()]
    used = [
        key
        for key, present in (
            ("exclusiveWith", any(b.exclusive_with for b in cfg.backends)
             or any(m.exclusive_with for m in models)),
            ("pinned models", any(m.pinned for m in models)),
        )
        if present
    ]  # fmt: skip
    if cfg.policy != "exclusive" or not used:
        return ()
    return (
        f"note: {' and '.join(used)} change nothing under policy: exclusive (one backend "
        "holds the GPU at a time); they apply under policy: budget",
    )


def preload_ref(backends: Sequence[BackendConfig], entry: str) -> UnitRef | str:
    """What a ``preload:`` entry names: a backend, or ``backend/model`` (a model the backend
    declares, by name or alias, resolved to its name; any model where the backend declares none,
    its models being discovered from the service); else why it names nothing (a message)."""
    index = _Index(backends)
    name, _, model = entry.partition("/")
    if name not in index.backends:
        known = list(index.backends)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown backend {name!r} in preload{hint}; backends are {', '.join(known)}"
    if not model:
        return UnitRef(name) if "/" not in entry else f"{entry!r} names no model after the /"
    declared = index.backends[name].models
    if declared is None:
        return UnitRef(name, model)
    for m in declared:
        if model in m.names:
            return UnitRef(name, m.name)
    names = [n for m in declared for n in m.names]
    close = difflib.get_close_matches(model, names, n=1)
    hint = f" (did you mean {name}/{close[0]}?)" if close else ""
    return (
        f"{name} declares no model {model!r}{hint}; its models are {', '.join(names)} "
        "(a backend that declares none takes any model name)"
    )


def check_preload(backends: Sequence[BackendConfig], entries: Sequence[str], fail: Fail) -> None:
    """Raise the located error of the first ``preload:`` entry that names nothing, or a unit
    named twice."""
    seen: dict[UnitRef, int] = {}
    for i, entry in enumerate(entries):
        ref = preload_ref(backends, entry)
        if isinstance(ref, str):
            raise fail(f"preload[{i}]", ref)
        if ref in seen:
            raise fail(f"preload[{i}]", f"{str(ref)!r} is also preload[{seen[ref]}]")
        seen[ref] = i
