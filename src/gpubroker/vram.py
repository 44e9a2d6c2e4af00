"""Facts about GPU memory that more than one subsystem relies on, kept in one place."""

from __future__ import annotations

MiB = 2**20
GiB = 2**30

# What a backend may still hold once it has freed its memory: a CUDA context, a sleeping
# engine's weights-free state, cached graphs.
FREED_FLOOR = 512 * MiB


def freed_goal(before: int) -> int:
    """The most a backend that held ``before`` bytes may hold and still count as freed.

    A quarter of what it held, but never less than ``FREED_FLOOR``: a sleep keeps the CUDA
    context, and an unload rarely hands back every last byte. One rule for every check that
    asks whether an unload freed memory (telemetry's confirmation, the ``unload_not_freed``
    warning, ComfyUI's own reserved-VRAM figure).
    """
    return max(FREED_FLOOR, before // 4)
