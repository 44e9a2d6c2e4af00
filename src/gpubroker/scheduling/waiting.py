"""Why a queued lease waits, in a few words for the client: ``queued 2nd behind comfyui``.

The proxy sends this line as an SSE comment once a second to a streaming request that waits
(``progress: comments``). It is read from the scheduler's own state (its queue, its plans, what
holds the GPU), so it says what the broker is doing, never a guess; pure, like the scheduler.
"""

from __future__ import annotations

from gpubroker.scheduling.scheduler import HOLDS_VRAM, Scheduler, State


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, …, 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def wait_note(sched: Scheduler, lease: int, now: float) -> str | None:
    """What ``lease`` waits for (None when it waits no more: admitted, refused or gone).

    A swap brings in its backend: ``swapping ollama→vllm (unloading ollama), 3.1 s``, or
    ``loading vllm, 0.4 s`` when nothing had to go. Else it is in line:
    ``queued 2nd behind comfyui, 1.0 s``, behind what holds its GPUs (or its own backend's
    requests in flight, when ``maxConcurrency`` is what it waits for).
    """
    waiter = sched.queue.get(lease)
    place = sched.queue.position(lease)
    if waiter is None or place is None:
        return None
    slot = sched.slots[waiter.backend]
    plan = sched.plans.get(slot.plan) if slot.plan is not None else None
    if plan is not None and plan.target == waiter.backend:
        took = f"{now - plan.started:.1f} s"
        if not plan.victims:
            return f"loading {waiter.backend}, {took}"
        gone = "+".join(plan.victims)
        if plan.unloaded_at is not None:
            phase = f"loading {waiter.backend}"
        elif plan.drained_at is not None or plan.unload_started:
            phase = f"unloading {gone}"
        else:
            phase = f"draining {gone}"
        return f"swapping {gone}→{waiter.backend} ({phase}), {took}"
    waited = f"{now - waiter.since:.1f} s"
    if slot.state is State.RESIDENT:  # admitting, but full: its own requests go first
        return f"queued {ordinal(place)} behind {slot.busy} in flight on {slot.name}, {waited}"
    gpus = set(slot.spec.gpus)
    holders = [
        s.name
        for s in sched.slots.values()
        if s is not slot and s.state in HOLDS_VRAM and gpus & set(s.spec.gpus)
    ]
    behind = f" behind {', '.join(holders)}" if holders else ""
    return f"queued {ordinal(place)}{behind}, {waited}"
