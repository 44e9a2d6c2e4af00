"""The simulated world ``bench/replay.py`` drives the scheduler against: a clock, one GPU that
counts every allocation past its capacity, and the services as they really behave.

The services load on request, as the real ones do (the broker's Load is a no-op for Ollama and
ComfyUI, and a wake for vLLM), and manage their own memory where the real ones do:

- Ollama (server/sched.go, ``processPending``/``findRunnerToUnload``, ollama/ollama@fb30760):
  one model load at a time; a model that does not fit in what the GPU really has free makes it
  unload one of its own idle models, shortest keep-alive first then by model path (a blob's
  sha256, so an arbitrary fixed order; a keep-alive of -1 sorts last), and at most
  ``defaultModelsPerGPU`` = 3 stay loaded; when its own models that would free enough are
  busy it waits for them to finish. If nothing of its own frees enough it would spill to the
  CPU or fail: counted as an OOM here, and the request fails.
- ComfyUI (comfy/model_management.py ``load_models_gpu``/``free_memory``,
  Comfy-Org/ComfyUI@a125cd8): one job at a time; a workflow's files not cached are loaded
  when the job starts, after unloading cached models it does not use (oldest first here)
  until the device's free memory, which counts other processes, covers them; ``/free`` drops
  everything.
- vLLM (``whole``): held from the broker's Load (a wake) until its Unload (a sleep).

A load allocates its true size when it starts and frees it when an unload ends.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from replay_traces import Backend, Item

OLLAMA_MAX_LOADED = 3  # server/sched.go defaultModelsPerGPU (one GPU)


class Clock:
    """A discrete-event clock: callbacks at simulated times, in time then insertion order."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn))

    def run(self) -> None:
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            self.now = t
            fn()


@dataclass
class GPU:
    """One GPU: what each service really holds, what nobody owns, and the OOMs."""

    capacity: int
    held: dict[tuple[str, str], int] = field(default_factory=dict)  # (backend, item) -> bytes
    foreign: int = 0
    ooms: list[tuple[float, str]] = field(default_factory=list)

    def used(self) -> int:
        return self.foreign + sum(self.held.values())

    def free(self) -> int:
        return self.capacity - self.used()

    def alloc(self, owner: str, item: str, nbytes: int, now: float) -> bool:
        """Take ``nbytes`` for ``owner``'s ``item``; False (and one OOM) when they are not free."""
        before = self.held.get((owner, item), 0)
        if self.used() - before + nbytes > self.capacity:
            self.ooms.append((now, f"{owner}/{item}"))
            return False
        self.held[(owner, item)] = nbytes
        return True

    def set_foreign(self, nbytes: int, now: float) -> None:
        """A process nobody owns takes (or gives back) memory; past capacity, it is its OOM."""
        if nbytes > self.foreign and self.used() - self.foreign + nbytes > self.capacity:
            self.ooms.append((now, "unowned"))
        self.foreign = nbytes

    def release(self, owner: str, item: str) -> None:
        self.held.pop((owner, item), None)


Started = Callable[[int, float], None]  # (request id, when its compute starts)
Failed = Callable[[int], None]


class Service:
    """A backend's service as it really behaves (see the module docstring)."""

    def __init__(
        self, backend: Backend, gpu: GPU, clock: Clock, started: Started, failed: Failed
    ) -> None:
        self.b = backend
        self.gpu = gpu
        self.clock = clock
        self.started = started
        self.failed = failed
        self.held: dict[str, float] = {}  # item -> last used (cached, loaded)
        self.size: dict[str, int] = {}  # item -> bytes held
        self.in_use: Counter[str] = Counter()
        self.waiting: dict[str, list[int]] = {}  # Ollama: item -> requests waiting for its load
        self.loads: deque[tuple[str, int]] = deque()  # Ollama's loader / ComfyUI's job queue
        self.busy = False
        self.jobs: deque[tuple[int, str]] = deque()  # ComfyUI: (request, item)
        self.load_s = 0.0  # total seconds spent loading
        self.last_load_s: float | None = None  # Lemonade's load_duration of the last load
        self.evicted: Counter[str] = Counter()  # items it unloaded by itself to make room
        self.swaps = 0  # loads for which it did so

    # --- what it holds -----------------------------------------------------------------------

    def total(self) -> int:
        return sum(self.size.values())

    def _drop(self, item: str) -> None:
        self.held.pop(item, None)
        self.size.pop(item, None)
        self.gpu.release(self.b.name, item)

    def drop(self, items: list[str] | None = None) -> None:
        """The broker's Unload ended: ``items`` (all when None) are freed."""
        for item in list(self.held) if items is None else items:
            self._drop(item)

    def wake(self, now: float) -> str | None:
        """The broker's Load: a ``whole`` service takes its memory now; others load later."""
        if self.b.kind != "whole":
            return None
        item = self.b.items[0]
        if not self.gpu.alloc(self.b.name, item.name, item.true, now):
            return "out of memory"
        self.held[item.name] = now
        self.size[item.name] = item.true
        self.load_s += self.b.wake_s
        return None

    # --- requests ------------------------------------------------------------------------------

    def run(self, rid: int, item: str, need: int | None, now: float) -> None:
        """An admitted request reached the service."""
        if self.b.kind == "whole":
            self.in_use[item] += 1
            self.started(rid, now)
        elif self.b.kind == "comfyui":
            self.jobs.append((rid, item))
            self._next_job(now)
        else:
            self._ollama(rid, item, need, now)

    def done(self, item: str, now: float) -> None:
        """A request's compute ended."""
        self.in_use[item] -= 1
        if item in self.size:
            self.held[item] = now
        if self.b.kind == "comfyui":
            self.busy = False
            self._next_job(now)
        elif self.b.kind == "ollama":
            self._next_load(now)  # a load may wait for this model to go idle

    def _evict(self, items: list[str]) -> None:
        """Items the service unloads by itself to make room for a load."""
        for item in items:
            self._drop(item)
            self.evicted[item] += 1
        if items:
            self.swaps += 1

    # --- Ollama ----------------------------------------------------------------------------------

    def _ollama(self, rid: int, item: str, need: int | None, now: float) -> None:
        want = max(self.b.item(item).true, need or 0)
        if item in self.waiting:  # its load is queued or running
            self.waiting[item].append(rid)
            return
        if item in self.size and self.size[item] >= want:
            self.in_use[item] += 1
            self.held[item] = now
            self.started(rid, now)
            return
        self.waiting[item] = [rid]
        self.loads.append((item, want))
        self._next_load(now)

    def _ollama_order(self, name: str) -> tuple[bool, str]:
        return (name in self.b.pinned, hashlib.sha256(name.encode()).hexdigest())

    def _next_load(self, now: float) -> None:
        if self.busy or not self.loads:
            return
        item, want = self.loads[0]
        reload = item in self.size  # asked with a longer context: reloaded once it is idle
        if reload and self.in_use[item]:
            return
        mine = sorted(
            (i for i in self.size if i not in self.waiting and i != item), key=self._ollama_order
        )
        idle = [i for i in mine if not self.in_use[i]]
        going: list[str] = []

        def short() -> bool:
            freed = sum(self.size[i] for i in going) + (self.size[item] if reload else 0)
            loaded = len(self.size) - len(going) - reload
            return self.gpu.free() + freed < want or loaded >= OLLAMA_MAX_LOADED

        while idle and short():
            going.append(idle.pop(0))
        if short() and len(going) < len(mine):
            return  # its busy models would make room: wait for them (done() retries)
        self.loads.popleft()
        self.busy = True
        self._evict(going)
        spent = self.b.unload_s * (len(going) + reload)
        if reload:
            self._drop(item)
        waiters = self.waiting[item]
        if not self.gpu.alloc(self.b.name, item, want, now):
            del self.waiting[item]
            self.busy = False
            for rid in waiters:
                self.failed(rid)
            self._next_load(now)
            return
        self.held[item] = now
        self.size[item] = want
        took = spent + self.b.item(item).load_s
        self.load_s += self.b.item(item).load_s
        self.last_load_s = self.b.item(item).load_s
        self.clock.at(now + took, lambda: self._loaded(item))

    def _loaded(self, item: str) -> None:
        now = self.clock.now
        self.busy = False
        for rid in self.waiting.pop(item, []):
            self.in_use[item] += 1
            self.started(rid, now)
        self.held[item] = now
        self._next_load(now)

    # --- ComfyUI ---------------------------------------------------------------------------------

    def _next_job(self, now: float) -> None:
        if self.busy or not self.jobs:
            return
        rid, item = self.jobs.popleft()
        self.busy = True
        load = 0.0
        if item not in self.size:
            it: Item = self.b.item(item)
            cached = sorted((i for i in self.size if i != item), key=lambda i: self.held[i])
            going: list[str] = []
            while cached and self.gpu.free() + sum(self.size[i] for i in going) < it.true:
                going.append(cached.pop(0))
            self._evict(going)
            if not self.gpu.alloc(self.b.name, item, it.true, now):
                self.busy = False
                self.failed(rid)
                self._next_job(now)
                return
            self.size[item] = it.true
            load = it.load_s
            self.load_s += load
            self.last_load_s = load
        self.held[item] = now
        self.in_use[item] += 1
        self.started(rid, now + load)
