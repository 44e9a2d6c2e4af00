"""Which units share a GPU, which may never be resident together, which may time out idle.

The scheduler asks these on every pump (what a GPU holds, who conflicts with a target, whose
idle timeout is due); walking every unit for each was the per-event cost that grew with the
number of backends rather than with the queue. Each list keeps the order of the scheduler's
``slots`` (the order units were added), because the decisions read them in that order (the
victims of a plan, the candidates the victim rule breaks ties among).

What a unit added or removed must update (``Scheduler.add_unit`` does the first; a reload's
``remove_backend``/``respec`` use the second):

- a unit added last: :meth:`UnitIndex.add` (O(units): its conflicts are looked up both ways);
- a unit removed, or its spec replaced with other ``gpus``, ``exclusive`` or
  ``idle_timeout``: :meth:`UnitIndex.rebuild` from the slots as they now are (O(units²),
  rare). A spec replaced with only a new ``need`` (``learned``) changes nothing here.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpubroker.scheduling.slots import BackendSpec, Slot


def conflicts(a: BackendSpec, b: BackendSpec) -> bool:
    """Whether ``a`` and ``b`` may never be resident together (either side names it)."""
    return (
        bool({b.name, b.backend} & a.exclusive or {a.name, a.backend} & b.exclusive)
        and a.name != b.name
    )


class UnitIndex:
    """Units by GPU, by conflict and by idle timeout, each in the slots' order."""

    def __init__(self, slots: Mapping[str, Slot]) -> None:
        self.on_gpu: dict[str, list[Slot]] = {}
        self.partners: dict[str, list[Slot]] = {}  # unit -> units it may not be resident with
        self.idlers: list[Slot] = []  # units with an idle timeout
        self.rebuild(slots)

    def rebuild(self, slots: Mapping[str, Slot]) -> None:
        """Index ``slots`` afresh (after a unit was removed or its spec replaced)."""
        self.on_gpu = {}
        self.partners = {}
        self.idlers = []
        placed: list[Slot] = []
        for slot in slots.values():
            self._place(slot, placed)
            placed.append(slot)

    def add(self, slot: Slot, slots: Mapping[str, Slot]) -> None:
        """Index ``slot``, just added after every other of ``slots``."""
        self._place(slot, [s for s in slots.values() if s is not slot])

    def _place(self, slot: Slot, before: list[Slot]) -> None:
        spec = slot.spec
        for gpu in dict.fromkeys(spec.gpus):
            self.on_gpu.setdefault(gpu, []).append(slot)
        mine = self.partners.setdefault(spec.name, [])
        for other in before:
            if conflicts(spec, other.spec):
                mine.append(other)
                self.partners.setdefault(other.name, []).append(slot)
        if spec.idle_timeout is not None:
            self.idlers.append(slot)

    def gpu(self, gpu: str) -> list[Slot]:
        """The units on ``gpu``."""
        return self.on_gpu.get(gpu, [])
