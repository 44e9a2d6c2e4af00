"""Does placing models one by one earn its keep? Replay a day of traffic against the pure
scheduler under our rule and the peers' rules, on a simulated clock (issue 14's proof).

    .venv/bin/python bench/replay.py                  # every trace and policy, ~15 s
    .venv/bin/python bench/replay.py --traces H -v    # the household, with who was evicted
    .venv/bin/python bench/replay.py --markdown       # the tables as the README shows them

No sockets: :class:`~gpubroker.scheduling.scheduler.Scheduler` is fed each request's arrival
and end, the clock's deadlines and telemetry every 2 s (what each unit really holds, what
nobody owns), and its effects are carried out on the simulated world of ``replay_world``:
a WaitIdle is answered at once (the scheduler emits it once a victim's leases drained), an
Unload takes the service's unload time (Ollama 0.5 s, ComfyUI ``/free`` 1 s, a vLLM sleep 1 s)
and a Load its wake time (vLLM 2 s; 0 for Ollama and ComfyUI, which load on request: an 8B
model ~5 s, a 14B ~8 s, an embedder ~1 s, SDXL ~4 s, Flux ~15 s, after admission). The numbers
and their sources are in ``replay_traces``; the services' own memory management, pinned to
their source, in ``replay_world``. The GPU counts an OOM whenever an allocation finds less
really free than it takes (really loaded = each service's true sizes, not the declared ones).

A request's *wait* runs from its arrival until its compute starts: its queue wait, then the
load of its model and, for ComfyUI, which runs one job at a time, the jobs ahead of it (at
backend level a workflow waits there rather than in the broker's queue). The table gives swaps
(the scheduler's plans that evicted something, plus the loads for which a service unloaded
models of its own: Ollama's scheduler, ComfyUI's cache), p50/p95/max wait, OOMs, refusals
(queue timeout, never fits) and the seconds spent loading. Policies, all on the same traces
through the same Scheduler (only the unit layout and the victim rule differ; the broker's
defaults: ``holdTime`` 10 s, ``minResidency`` 3 s under budget and 0 under exclusive,
``priorityAging`` 30 s, ``queueTimeout`` 120 s):

- ours: model units (an Ollama model each; ComfyUI one unit whose requests ask what their
  workflow's files take, ``need``/``fresh`` as ``scheduling/units.py`` computes them) under
  budget with ``choose_victims``;
- ours-backend: today's budget, one unit per backend at its declared ``vram`` (Ollama: the
  largest model + margin; ComfyUI: its heaviest workflow);
- exclusive (OneGPU4All): one backend resident at a time;
- llama-swap: one model process resident at a time (its default group, ``swap: true``,
  ``exclusive: true``: internal/router/group.go ``groupSwapper.EvictionFor``,
  mostlygeek/llama-swap@0bdb372);
- lru, ollama, lemonade: model units under budget, with the peers' victim rules
  (``replay_rules``, each citing where it comes from).

Every budget policy is told what nobody owns (Ollama and Lemonade read the free VRAM too); the
exclusive ones are not, as OneGPU4All and llama-swap are not. Pins (Ollama's keep_alive -1,
Lemonade's ``pinned``) hold for every policy but the exclusive ones, where a pinned unit would
be the whole GPU. Not modelled: keep-alive and idle timeouts (a service keeps what it loaded
until told, or until it needs the room), Lemonade's per-type count limit, partial offload to
the CPU (an OOM here), contention between requests computing at once.

Targets (issue 14), checked at the end; the exit status is 1 when one is missed: on the
household trace, against ours-backend, at least 2x fewer swaps and 2x lower p95 wait, 0 OOMs
and max wait within ``replay_report.MAX_WAIT`` (the queueTimeout); on every trace ours wins
or ties every other policy (swaps, p95 wait, OOMs, refusals), and where it does not the reason
is printed.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

from replay_report import Result, git_rev, table, verdicts
from replay_rules import lemonade, lru, ollama
from replay_traces import TRACES, Backend, Request, Trace
from replay_world import GPU, Clock, Service

from gpubroker.scheduling.effects import Admit, Effect, Load, Refuse, SwapDone, Unload, WaitIdle
from gpubroker.scheduling.scheduler import BackendSpec, Chooser, Scheduler
from gpubroker.scheduling.victims import choose_victims

GPU_KEY = "0"
TELEMETRY_S = 2.0  # Config.telemetry_interval's default
Rule = Literal["ours", "lru", "ollama", "lemonade"]


@dataclass(frozen=True, slots=True)
class Policy:
    key: str
    layout: Literal["models", "backend"]
    sched: Literal["budget", "exclusive"]
    rule: Rule
    what: str


POLICIES = (
    Policy("ours", "models", "budget", "ours", "model units, budget, choose_victims"),
    Policy("ours-backend", "backend", "budget", "ours", "today's budget: one unit per backend"),
    Policy("exclusive", "backend", "exclusive", "ours", "OneGPU4All: one backend at a time"),
    Policy("llama-swap", "models", "exclusive", "ours", "one model process at a time"),
    Policy("lru", "models", "budget", "lru", "LRU until it fits (issue: Ollama, LM Studio)"),
    Policy("ollama", "models", "budget", "ollama", "Ollama's sched.go order"),
    Policy("lemonade", "models", "budget", "lemonade", "Lemonade: idle time / load time"),
)


@dataclass
class Record:
    req: Request
    admit: float | None = None
    wait: float | None = None
    outcome: str = "pending"  # served | refused:<code> | failed


class Run:
    """One trace under one policy: the scheduler, the world, and what happened."""

    def __init__(self, trace: Trace, policy: Policy, telemetry: float = TELEMETRY_S) -> None:
        self.trace = trace
        self.policy = policy
        self.telemetry = telemetry
        self.clock = Clock()
        self.gpu = GPU(trace.capacity)
        self.services = {
            b.name: Service(b, self.gpu, self.clock, self._started, self._failed)
            for b in trace.backends
        }
        specs = [s for b in trace.backends for s in self._specs(b)]
        budget = policy.sched == "budget"
        self.sched = Scheduler(
            specs,
            capacities={GPU_KEY: trace.capacity},
            policy=policy.sched,
            queue_timeout=120.0,
            hold_time=10.0,
            min_residency=3.0 if budget else 0.0,
            aging=30.0,
            choose=self._chooser(policy.rule),
        )
        for s in specs:
            self.sched.reconciled(s.name, False)
        self.records = [Record(r) for r in trace.requests]
        self.cache: dict[str, dict[str, int]] = {}  # the broker's view of ComfyUI's files
        self.swaps = 0
        self.victims: Counter[str] = Counter()
        self.outstanding = len(self.records)
        self.armed: float | None = None
        self.spins = 0
        self._last_tick: float | None = None

    # --- layout ----------------------------------------------------------------------------

    def _specs(self, b: Backend) -> list[BackendSpec]:
        pin = self.policy.sched == "budget"  # under exclusive a pinned unit would be the GPU
        whole_pin = pin and set(b.pinned) == {i.name for i in b.items}
        if self.policy.layout == "backend" or b.kind == "whole":
            spec = BackendSpec(b.name, need=b.declared, pinned=whole_pin, cost=b.cost)
            return [replace(spec, sleeps=b.sleeps)]
        if b.kind == "comfyui":  # sized by what its workflows' files take
            return [BackendSpec(b.name, need=None, cost=b.cost, source="unknown")]
        models = [
            BackendSpec(
                f"{b.name}/{i.name}",
                need=i.declared,
                group=b.name,
                model=i.name,
                pinned=pin and i.name in b.pinned,
                cost=b.cost,
            )
            for i in b.items
        ]
        return [BackendSpec(b.name, cost=b.cost), *models]  # its own unit, then its models

    def _place(self, req: Request) -> tuple[str, int | None, int | None]:
        """The request's unit, ``need`` and ``fresh``, as the broker's ``Units.place`` has them."""
        b = self.trace.backend(req.backend)
        if self.policy.layout == "backend":
            return b.name, None, None
        if b.kind == "ollama":
            return f"{b.name}/{req.item}", req.need, None
        if b.kind == "comfyui":  # Units._place_files: cached + own, or own alone when freed
            own = b.item(req.item).declared
            others = sum(v for f, v in self.cache.get(b.name, {}).items() if f != req.item)
            return b.name, own + others, (own if others else None)
        return b.name, req.need, None

    def _items(self, unit: str) -> tuple[Service, list[str] | None]:
        """The service behind ``unit`` and the items its unload frees (None: all)."""
        backend, _, model = unit.partition("/")
        return self.services[backend], ([model] if model else None)

    def _chooser(self, rule: Rule) -> Chooser:
        def busy(unit: str) -> bool:
            return self.sched.in_flight(unit) > 0

        def load_s(unit: str) -> float:
            service, items = self._items(unit)
            if items is None:
                return service.last_load_s or 1.0
            return service.b.item(items[0]).load_s

        if rule == "lru":
            return lru
        if rule == "ollama":
            return ollama(busy)
        if rule == "lemonade":
            return lemonade(load_s, busy)
        return choose_victims

    # --- driving ---------------------------------------------------------------------------

    def run(self) -> Result:
        for rid, rec in enumerate(self.records):
            self.clock.at(rec.req.at, partial(self._arrive, rid))
        for start, end, nbytes in self.trace.unowned:
            self.clock.at(start, partial(self._foreign, nbytes))
            self.clock.at(end, partial(self._foreign, 0))
        self.clock.at(self.telemetry, self._sample)
        self.clock.run()
        waits = [r.wait for r in self.records if r.outcome == "served" and r.wait is not None]
        return Result(
            trace=self.trace.key,
            policy=self.policy.key,
            requests=len(self.records),
            swaps=self.swaps + sum(s.swaps for s in self.services.values()),
            waits=waits,
            ooms=len(self.gpu.ooms),
            refused=sum(1 for r in self.records if r.outcome.startswith("refused")),
            failed=sum(1 for r in self.records if r.outcome == "failed"),
            load_s=sum(s.load_s for s in self.services.values()),
            victims=self.victims
            + Counter(
                {f"{i} (by {n})": k for n, s in self.services.items() for i, k in s.evicted.items()}
            ),
            oom_at=list(self.gpu.ooms),
            spins=self.spins,
        )

    def apply(self, effects: Sequence[Effect]) -> None:
        now = self.clock.now
        for e in effects:
            if isinstance(e, Admit):
                self._admitted(e.lease)
            elif isinstance(e, Refuse):
                self._end(e.lease, f"refused:{e.code}")
            elif isinstance(e, WaitIdle):
                self.clock.at(now, partial(self._call, self.sched.idle, e.swap, e.backend))
            elif isinstance(e, Unload):
                service, _ = self._items(e.backend)
                self.clock.at(now + service.b.unload_s, partial(self._unloaded, e))
            elif isinstance(e, Load):
                service, _ = self._items(e.backend)
                error = service.wake(now)
                self.clock.at(now + service.b.wake_s, partial(self._loaded, e, error))
            elif isinstance(e, SwapDone) and e.info.evicted:
                self.swaps += 1
                self.victims.update(e.info.evicted)
        self._arm()

    def _call(self, fn: Callable[..., list[Effect]], *args: object) -> None:
        self.apply(fn(*args, self.clock.now))

    def _arm(self) -> None:
        """Tick at the scheduler's next deadline, as the broker's clock loop does."""
        deadline = self.sched.next_deadline()
        now = self.clock.now
        if deadline is None:
            return
        if deadline <= now and self._last_tick == now:
            self.spins += 1  # the broker's loop would tick again at once, and again
            deadline = now + 0.05
        if self.armed is not None and now <= self.armed <= deadline:
            return
        self.armed = deadline
        self.clock.at(deadline, self._tick)

    def _tick(self) -> None:
        if self.armed is not None and self.clock.now < self.armed:
            return  # superseded by a sooner one that already ran
        self.armed = None
        self._last_tick = self.clock.now
        self.apply(self.sched.tick(self.clock.now))

    def _foreign(self, nbytes: int) -> None:
        self.gpu.set_foreign(nbytes, self.clock.now)

    def _arrive(self, rid: int) -> None:
        unit, need, fresh = self._place(self.records[rid].req)
        self.apply(self.sched.request(rid, unit, self.clock.now, need, fresh))

    def _admitted(self, rid: int) -> None:
        rec = self.records[rid]
        rec.admit = self.clock.now
        b = self.trace.backend(rec.req.backend)
        if b.kind == "comfyui" and self.policy.layout == "models":  # Units.admitted
            self.cache.setdefault(b.name, {})[rec.req.item] = b.item(rec.req.item).declared
        self.services[b.name].run(rid, rec.req.item, rec.req.need, self.clock.now)

    def _started(self, rid: int, start: float) -> None:
        rec = self.records[rid]
        rec.wait = start - rec.req.at  # queued, then loading (or behind ComfyUI's last job)
        self.clock.at(start + rec.req.service_s, lambda: self._finished(rid))

    def _finished(self, rid: int) -> None:
        rec = self.records[rid]
        self.services[rec.req.backend].done(rec.req.item, self.clock.now)
        self._end(rid, "served")
        self.apply(self.sched.released(rid, self.clock.now))

    def _failed(self, rid: int) -> None:
        self._end(rid, "failed")
        self.clock.at(self.clock.now, lambda: self._call(self.sched.released, rid))

    def _end(self, rid: int, outcome: str) -> None:
        self.records[rid].outcome = outcome
        self.outstanding -= 1

    def _unloaded(self, e: Unload) -> None:
        service, items = self._items(e.backend)
        service.drop(items)
        if items is None:
            self.cache.pop(service.b.name, None)  # Units.unloaded
        self.apply(self.sched.unloaded(e.swap, e.backend, None, self.clock.now))

    def _loaded(self, e: Load, error: str | None) -> None:
        self.apply(self.sched.loaded(e.swap, e.backend, error, self.clock.now))

    def _sample(self) -> None:
        """Telemetry: what each unit really holds (per model where the service says, as
        ``Units.follow`` reads Ollama's /api/ps), and what nobody owns."""
        now = self.clock.now
        effects: list[Effect] = []
        for name, service in self.services.items():
            units = self.sched.units_of(name)
            if self.policy.layout == "models" and service.b.kind == "ollama":
                for unit in units[1:]:
                    model = unit.partition("/")[2]
                    held = service.size.get(model)
                    if held:
                        effects += self.sched.measured(unit, GPU_KEY, held, now)
                    effects += self.sched.observed(unit, held is not None, now)
            else:
                effects += self.sched.measured(name, GPU_KEY, service.total() or None, now)
        effects += self.sched.unmanaged(GPU_KEY, self.gpu.foreign, now)
        self.apply(effects)
        if self.outstanding > 0 or now < self.trace.requests[-1].at:
            self.clock.at(now + self.telemetry, self._sample)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--hours", type=float, default=24.0, help="length of each trace")
    ap.add_argument("--traces", default=",".join(TRACES), help="comma-separated: H,R,P,U")
    ap.add_argument("--markdown", action="store_true", help="tables as the README shows them")
    ap.add_argument("-v", "--verbose", action="store_true", help="who each policy evicted")
    args = ap.parse_args(argv)
    keys = [k.strip().upper() for k in args.traces.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TRACES]
    if unknown:
        ap.error(f"unknown traces {unknown}; choose from {','.join(TRACES)}")
    print(f"bench/replay.py  git {git_rev()}  seed {args.seed}  {args.hours:g} h per trace")
    print()
    ok = True
    for key in keys:
        trace = TRACES[key](args.seed, args.hours)
        results = {p.key: Run(trace, p).run() for p in POLICIES}
        print("\n".join(table(trace, results, args.markdown)))
        lines, held = verdicts(trace, results, args.markdown)
        print("\n".join(lines))
        if args.verbose:
            for r in results.values():
                print(f"    {r.policy}: evicted {dict(r.victims.most_common())}")
                if r.oom_at:
                    print(f"    {r.policy}: OOMs {[(round(at), who) for at, who in r.oom_at]}")
        print()
        ok = ok and held
    print("all targets met" if ok else "a target was missed (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
