"""What one scheduler event costs as the queue grows: the pure Scheduler, no I/O, no broker.

    .venv/bin/python bench/scheduler_cost.py                      # the full table (~1 min)
    .venv/bin/python bench/scheduler_cost.py --sizes 10,100 --backends 2 --policies exclusive

The world is the one issue 16 measured: ``B`` backends on one GPU, one of them (the owner)
resident and busy with two leases, ``N`` requests queued round-robin over the others, which
wait for it (its ``holdTime`` runs; under ``policy: budget`` each backend declares 60% of the
GPU, so no two fit together). From that steady state, each event below is fed many times and
the state put back after each (untimed), so every sample sees ``N`` queued:

- enqueue: a new request for a waiting backend (then cancelled, untimed);
- tick: the clock moves and nothing is due (the broker ticks at every deadline);
- release: one of the owner's two leases ends (then a new one is admitted, untimed);
- cancel: a queued client leaves, from a random place in the queue (then re-queued, untimed);
- swap: the end of a swap, on a copy of the world where the owner drained and was sent to
  unload: its ``unloaded``, then the target's ``loaded``, which admits the target's first
  requests (``maxConcurrency`` 4) and plans the next swap. Each starts with the CPU caches
  cold (64 MiB written first), as they are after the seconds a real swap takes: otherwise a
  small world's copy stays in cache and a large one's does not, which the ratio would read as
  the scheduler's cost.

Each figure is the median over ``--reps`` batches of the CPU time (``time.process_time_ns``,
less the cost of reading that clock) per event, in µs; the last column is the ratio of the
10,000-queued figure to the 100-queued one (flat: close to 1). Timings on a shared machine are
noisy; read the ratios.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from replay_report import git_rev  # (bench/ is on the path, as these run)

from gpubroker.scheduling.effects import Unload, WaitIdle
from gpubroker.scheduling.scheduler import BackendSpec, Scheduler

GPU = "0"
CAP = 24 * 2**30
HOLD = 10.0
EVENTS = ("enqueue", "tick", "release", "cancel", "swap")
Policy = Literal["exclusive", "budget"]


@dataclass
class World:
    """A scheduler in the steady state above, and what it needs to be fed more."""

    sched: Scheduler
    backends: list[str]
    owner_leases: list[int]
    queued: list[int]  # leases waiting, in no particular order
    lease_backend: dict[int, str]
    now: float = 1.0
    next_lease: int = 1_000_000_000

    def lease(self) -> int:
        self.next_lease += 1
        return self.next_lease

    def waiting_backend(self, i: int) -> str:
        return self.backends[1 + i % (len(self.backends) - 1)]

    def step(self) -> float:
        self.now += 1e-6  # time moves, but the hold (and every queue timeout) stays ahead
        return self.now


def build(policy: Policy, backends: int, queued: int) -> World:
    need = int(CAP * 0.6) if policy == "budget" else None
    names = [f"b{i}" for i in range(backends)]
    specs = [BackendSpec(n, gpus=(GPU,), need=need, max_concurrency=4) for n in names]
    sched = Scheduler(specs, capacities={GPU: CAP}, policy=policy, hold_time=HOLD)
    for n in names:
        sched.reconciled(n, n == names[0], 0.0)
    world = World(sched, names, [], [], {})
    for _ in range(2):
        lease = world.lease()
        sched.request(lease, names[0], world.step())
        world.owner_leases.append(lease)
    for i in range(queued):
        lease = world.lease()
        backend = world.waiting_backend(i)
        sched.request(lease, backend, world.step())
        world.queued.append(lease)
        world.lease_backend[lease] = backend
    assert sched.queued() == queued and sched.in_flight(names[0]) == 2
    return world


def clock_cost() -> int:
    """Nanoseconds one pair of clock reads adds to a sample."""
    samples = []
    for _ in range(2000):
        t0 = time.process_time_ns()
        samples.append(time.process_time_ns() - t0)
    return int(statistics.median(samples))


def measure(world: World, event: str, count: int, rng: random.Random, overhead: int) -> float:
    """Mean µs of ``count`` ``event``s fed to ``world`` (the state restored after each)."""
    sched = world.sched
    spent = 0
    clock = time.process_time_ns
    if event == "swap":
        for _ in range(count):
            copy_ = copy.deepcopy(world)
            bytearray(64 << 20)  # caches cold, as after the seconds a swap takes, at any size
            spent += swap_once(copy_, clock) - overhead
        return spent / count / 1000
    for i in range(count):
        now = world.step()
        if event == "enqueue":
            lease, backend = world.lease(), world.waiting_backend(i)
            t0 = clock()
            sched.request(lease, backend, now)
            spent += clock() - t0
            sched.cancel(lease, now)
        elif event == "tick":
            t0 = clock()
            sched.tick(now)
            spent += clock() - t0
        elif event == "release":
            lease = world.owner_leases.pop(0)
            t0 = clock()
            sched.released(lease, now)
            spent += clock() - t0
            fresh = world.lease()
            sched.request(fresh, world.backends[0], now)
            world.owner_leases.append(fresh)
        elif event == "cancel":
            place = rng.randrange(len(world.queued))
            lease = world.queued[place]
            t0 = clock()
            sched.cancel(lease, now)
            spent += clock() - t0
            fresh = world.lease()
            backend = world.lease_backend.pop(lease)
            sched.request(fresh, backend, now)
            world.queued[place] = fresh
            world.lease_backend[fresh] = backend
        else:
            raise ValueError(event)
        spent -= overhead
    return spent / count / 1000


def swap_once(world: World, clock: Callable[[], int]) -> int:
    """Drain the owner of (a copy of) ``world`` untimed; time the swap's end."""
    sched = world.sched
    world.now += HOLD + 1  # the hold is over
    effects = []
    for lease in world.owner_leases:
        effects += sched.released(lease, world.now)
    wait = next(e for e in effects if isinstance(e, WaitIdle))
    unload = next(
        e for e in sched.idle(wait.swap, wait.backend, world.now) if isinstance(e, Unload)
    )
    plan = sched.plans[unload.swap]
    assert plan.target is not None
    t0 = clock()
    sched.unloaded(unload.swap, unload.backend, None, world.now)
    sched.loaded(unload.swap, plan.target, None, world.now)
    return clock() - t0


def run(
    policies: list[Policy], backends: list[int], sizes: list[int], reps: int, seed: int
) -> dict[tuple[str, int, str, int], float]:
    overhead = clock_cost()
    rng = random.Random(seed)
    out: dict[tuple[str, int, str, int], float] = {}
    for policy in policies:
        for b in backends:
            for n in sizes:
                world = build(policy, b, n)
                gc.collect()  # once per world: a collection evicts the caches a batch warmed
                for event in EVENTS:
                    count = 3 if event == "swap" else 40
                    samples = []
                    for _ in range(reps):
                        gc.disable()
                        try:
                            measure(world, event, 1, rng, overhead)  # warm-up, not counted
                            samples.append(measure(world, event, count, rng, overhead))
                        finally:
                            gc.enable()
                    out[(policy, b, event, n)] = statistics.median(samples)
                print(f"  {policy} {b} backends, {n} queued: done", file=sys.stderr, flush=True)
    return out


def table(results: dict[tuple[str, int, str, int], float], sizes: list[int]) -> list[str]:
    cols = [f"{n:,} queued" for n in sizes]
    ratio = 100 in sizes and 10_000 in sizes
    head = ["policy", "backends", "event", *cols] + (["10,000 / 100"] if ratio else [])
    lines = [
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + " |",
    ]
    keys = sorted({k[:3] for k in results}, key=lambda k: (k[0], k[1], EVENTS.index(k[2])))
    for policy, b, event in keys:
        row = [policy, str(b), event]
        row += [fmt(results[(policy, b, event, n)]) for n in sizes]
        if ratio:
            r = results[(policy, b, event, 10_000)] / max(results[(policy, b, event, 100)], 1e-9)
            row.append(f"{r:.1f}x")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def fmt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.1f} µs"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=ints, default=[10, 100, 1000, 10_000], help="queued")
    ap.add_argument("--backends", type=ints, default=[2, 8, 64])
    ap.add_argument("--policies", default="exclusive,budget")
    ap.add_argument("--reps", type=int, default=5, help="batches per figure (median)")
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the figures here (µs per event)")
    args = ap.parse_args(argv)
    policies: list[Policy] = []
    for p in args.policies.split(","):
        if p not in ("exclusive", "budget"):
            ap.error(f"unknown policy {p!r}: exclusive or budget")
        policies.append(p)  # type: ignore[arg-type]
    print(f"bench/scheduler_cost.py  git {git_rev()}  µs of CPU per event, median of {args.reps}")
    results = run(policies, args.backends, args.sizes, args.reps, args.seed)
    print("\n".join(table(results, args.sizes)))
    if args.json:
        rows = [
            {"policy": p, "backends": b, "event": e, "queued": n, "us": us}
            for (p, b, e, n), us in results.items()
        ]
        args.json.write_text(json.dumps({"git": git_rev(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
