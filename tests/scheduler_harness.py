"""Drives a Scheduler with a fake clock: records effects, carries out I/O when a test says so."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpubroker.scheduling.effects import Admit, Effect, Load, Unload, WaitIdle
from gpubroker.scheduling.scheduler import Scheduler


@dataclass
class Harness:
    sched: Scheduler
    now: float = 0.0
    effects: list[Effect] = field(default_factory=list)

    def feed(self, effects: list[Effect]) -> list[Effect]:
        self.effects += effects
        return effects

    def request(self, lease: int, backend: str) -> list[Effect]:
        return self.feed(self.sched.request(lease, backend, self.now))

    def release(self, lease: int) -> list[Effect]:
        return self.feed(self.sched.released(lease, self.now))

    def pending(self, kind: type) -> list:
        return [e for e in self.effects if isinstance(e, kind)]

    def admitted(self) -> list[int]:
        return [e.lease for e in self.effects if isinstance(e, Admit)]

    def unloads(self) -> list[str]:
        return [e.backend for e in self.effects if isinstance(e, Unload)]

    def run_io(self) -> None:
        """Carry out every outstanding idle check, unload and load, in order (instant services),
        including those the outcomes start in turn."""
        done = 0
        while done < len(self.effects):
            e = self.effects[done]
            done += 1
            if isinstance(e, WaitIdle):
                self.feed(self.sched.idle(e.swap, e.backend, self.now))
            elif isinstance(e, Unload):
                self.feed(self.sched.unloaded(e.swap, e.backend, None, self.now))
            elif isinstance(e, Load):
                self.feed(self.sched.loaded(e.swap, e.backend, None, self.now))
