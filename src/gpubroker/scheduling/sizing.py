"""What a unit takes on a GPU, and whether a request fits: the scheduler's arithmetic.

The base of :class:`~gpubroker.scheduling.scheduler.Scheduler` (which holds the state these
read); kept apart from the decisions (:mod:`~gpubroker.scheduling.planning`) and the events
(:mod:`~gpubroker.scheduling.scheduler`) so each module reads alone. The sums run over the
units on one GPU (:class:`~gpubroker.scheduling.unitindex.UnitIndex`), not over every unit.
"""

from __future__ import annotations

from gpubroker.config.model import Policy
from gpubroker.scheduling.slots import HOLDS_VRAM, Slot
from gpubroker.scheduling.unitindex import UnitIndex


class Sizing:
    """Sizes under the policy: the whole GPU under ``exclusive`` (or where nothing is known),
    else the largest of the declared (or learned) footprint, the requests' estimate and what
    telemetry measured."""

    slots: dict[str, Slot]
    capacity: dict[str, int | None]
    policy: Policy
    unowned: dict[str, int]  # GPU -> bytes held by processes no backend owns
    index: UnitIndex

    def size(self, backend: str, gpu: str, need: int | None = None) -> int:
        """Bytes unit ``backend`` takes on ``gpu`` when resident (the whole GPU where unknown);
        with ``need``, once a request asking for that much is admitted too.

        The largest of the declared (or learned) footprint, the estimate its requests brought
        and what telemetry measured.
        """
        cap = self.capacity[gpu]
        if self.policy == "exclusive" or cap is None:
            return cap if cap is not None else 1
        known = self._known_size(backend, gpu, need)
        if known is not None:
            return known
        # Nothing known (what it held before it left is no measure of what it will): all the
        # card has for it, which memory nobody owns is not, nor what pinned units hold.
        pinned = sum(
            self._known_size(s.name, gpu) or 0
            for s in self.index.gpu(gpu)
            if s.spec.pinned and s.name != backend and s.state in HOLDS_VRAM
        )
        return max(1, cap - self.unowned.get(gpu, 0) - pinned)

    def _known_size(self, unit: str, gpu: str, need: int | None = None) -> int | None:
        """``size`` where something is known of it (budget policy, a known capacity), else
        None."""
        slot = self.slots[unit]
        known = [n for n in (slot.spec.need, slot.estimate, need) if n is not None]
        held = slot.measured.get(gpu)
        if not known and (held is None or slot.state not in HOLDS_VRAM):
            return None
        return max([*known, held or 0])

    def footprint(self, unit: str, gpu: str) -> tuple[int, str]:
        """What ``unit`` is planned to take on ``gpu`` and where that figure comes from:
        ``declared`` (config), ``learned`` (measured on an earlier run), ``estimated`` (what its
        requests asked: a context's KV cache, a workflow's files), ``measured`` (telemetry,
        now) or ``unknown`` (the whole GPU, until something is known)."""
        size = self.size(unit, gpu)
        slot = self.slots[unit]
        if self.policy == "exclusive" or self.capacity[gpu] is None:
            return size, "exclusive"
        if slot.measured.get(gpu, 0) >= size and size:
            return size, "measured"
        if slot.estimate is not None and slot.estimate >= size:
            return size, "estimated"
        if slot.spec.need is None:
            return size, "unknown"
        shown = {"measured": "learned", "backend": "declared"}
        return size, shown.get(slot.spec.source, slot.spec.source)

    def _fresh_size(self, unit: str, gpu: str, need: int | None) -> int:
        """What ``unit`` would take on ``gpu`` loaded afresh for a request asking ``need``
        (nothing it held before counts: not its estimate, not what was measured)."""
        cap = self.capacity[gpu]
        if self.policy == "exclusive" or cap is None:
            return cap if cap is not None else 1
        known = [n for n in (self.slots[unit].spec.need, need) if n is not None]
        return max(known) if known else cap

    def _cap(self, gpu: str) -> int:
        cap = self.capacity[gpu]
        return cap if cap is not None else 1

    def used(self, gpu: str) -> int:
        """Bytes planned as taken on ``gpu``: every unit holding memory, and what nobody owns."""
        return self.unowned.get(gpu, 0) + sum(
            self.size(s.name, gpu) for s in self.index.gpu(gpu) if s.state in HOLDS_VRAM
        )

    def _fits(self, backend: str, need: int | None = None) -> bool:
        """Whether unit ``backend``, asked for ``need``, fits beside what is planned."""
        holds = self.slots[backend].state in HOLDS_VRAM
        return all(
            self.used(g) - (self.size(backend, g) if holds else 0) + self.size(backend, g, need)
            <= self._cap(g)
            for g in self.slots[backend].spec.gpus
        )

    def _room_for(self, slot: Slot, need: int | None) -> bool:
        """Whether a request asking ``need`` of the resident ``slot`` fits as it stands: it
        asks no more than the unit is sized for, or the growth fits."""
        if need is None:
            return True
        gpus = slot.spec.gpus
        if all(self.size(slot.name, g, need) <= self.size(slot.name, g) for g in gpus):
            return True
        return self._fits(slot.name, need)
