"""A simulated GPU: a byte counter that refuses to over-commit, the way CUDA does.

Emulated services allocate on it when they load a model and free when they unload, so a broker
test can tell from ``oom_count`` whether the broker ever let two services over-commit the card.
Everything runs on one event loop and nothing here awaits, so no lock is needed.
"""

from __future__ import annotations

from typing import Any

MiB = 1024**2
GiB = 1024**3

_FIRST_PID = 4100
"""Fake pids start here: high enough to look like real host pids, stable per owner."""


class OutOfMemory(Exception):
    """An allocation did not fit; the message reads like PyTorch's CUDA OOM error."""

    def __init__(self, message: str, *, owner: str, requested: int, free: int) -> None:
        super().__init__(message)
        self.owner = owner
        self.requested = requested
        self.free = free


class SimGPU:
    """Allocations per ``(owner, tag)`` on a card of ``capacity`` bytes.

    ``owner`` stands for a process (one pid each in :meth:`snapshot`), ``tag`` for what it holds
    there (a model name, ``"weights"``, ``"kv_cache"``...), so a service can free one model and
    keep another.
    """

    def __init__(
        self,
        capacity: int,
        name: str = "Simulated GPU",
        uuid: str = "GPU-sim-00000000-0000-0000-0000-000000000000",
        index: int = 0,
    ) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.name = name
        self.uuid = uuid
        self.index = index
        self._capacity = capacity
        self._allocations: dict[tuple[str, str], int] = {}
        self._pids: dict[str, int] = {}
        self.oom_count = 0
        """How many allocations were refused; behind a working broker this stays 0."""
        self.peak_used = 0
        """The highest ``used`` ever reached."""

    @property
    def total(self) -> int:
        return self._capacity

    @property
    def used(self) -> int:
        return sum(self._allocations.values())

    @property
    def free_bytes(self) -> int:
        return self._capacity - self.used

    def allocate(self, owner: str, nbytes: int, tag: str = "weights") -> None:
        """Add ``nbytes`` to ``(owner, tag)``; raise :class:`OutOfMemory` if it does not fit."""
        if nbytes < 0:
            raise ValueError("nbytes must not be negative")
        used = self.used
        free = self._capacity - used
        if nbytes > free:
            self.oom_count += 1
            raise OutOfMemory(
                f"CUDA out of memory. Tried to allocate {nbytes / MiB:.2f} MiB "
                f"(GPU {self.index}; {self._capacity / GiB:.2f} GiB total capacity; "
                f"{used / MiB:.2f} MiB already allocated; {free / MiB:.2f} MiB free)",
                owner=owner,
                requested=nbytes,
                free=free,
            )
        self.pid(owner)
        key = (owner, tag)
        self._allocations[key] = self._allocations.get(key, 0) + nbytes
        self.peak_used = max(self.peak_used, used + nbytes)

    def free(self, owner: str, tag: str | None = None) -> int:
        """Release ``(owner, tag)``, or everything ``owner`` holds; return the bytes released."""
        keys = [k for k in self._allocations if k[0] == owner and (tag is None or k[1] == tag)]
        return sum(self._allocations.pop(k) for k in keys)

    def held(self, owner: str, tag: str | None = None) -> int:
        """Bytes held by ``owner`` (under ``tag`` only, when given)."""
        return sum(n for (o, t), n in self._allocations.items() if o == owner and tag in (None, t))

    def by_owner(self) -> dict[str, int]:
        """Bytes per owner, only owners that hold something."""
        totals: dict[str, int] = {}
        for (owner, _tag), nbytes in self._allocations.items():
            totals[owner] = totals.get(owner, 0) + nbytes
        return {o: n for o, n in totals.items() if n > 0}

    def pid(self, owner: str) -> int:
        """The fake host pid of ``owner``: assigned on first sight, stable afterwards."""
        return self._pids.setdefault(owner, _FIRST_PID + len(self._pids))

    def snapshot(self) -> dict[str, Any]:
        """What NVML would report: totals in bytes and one entry per process holding memory."""
        used = self.used
        return {
            "name": self.name,
            "uuid": self.uuid,
            "index": self.index,
            "total": self._capacity,
            "used": used,
            "free": self._capacity - used,
            "processes": [
                {"owner": owner, "pid": self.pid(owner), "used": nbytes}
                for owner, nbytes in self.by_owner().items()
            ],
        }

    def __repr__(self) -> str:
        return f"SimGPU({self.name!r}, used={self.used}, total={self._capacity})"
