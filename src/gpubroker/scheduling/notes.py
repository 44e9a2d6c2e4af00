"""The scheduler's notes as the typed events a watcher sees: the one place its words are renamed.

``unloading`` of a service that sleeps is ``sleeping``; ``unloaded`` is ``freed`` (with the
bytes it held as the unload began: measured, else declared) or ``unload_failed``; ``loading``
from sleep is ``waking``; ``swap_started`` gains the leases queued for its target. The broker
stamps and publishes what :func:`note_event` names.
"""

from __future__ import annotations

from typing import Any, cast

from gpubroker import events as ev
from gpubroker.scheduling.effects import Note
from gpubroker.scheduling.scheduler import Scheduler


def note_event(
    note: Note, sched: Scheduler, held: int | None
) -> tuple[type[ev.WireEvent], dict[str, Any]]:
    """The event class for ``note`` and its fields (less the backend, lease and stamps).

    ``held``: for ``unloaded``, the bytes measured as its unload began (None: not measured;
    then its footprint as the scheduler knows it).
    """
    name, d = note.backend, note.detail
    swap = d.get("swap")
    event: type[ev.WireEvent]
    fields: dict[str, Any] = {}
    match note.kind:
        case "reconciled":
            event, fields = ev.Reconciled, {"state": d["state"]}
        case "queued":
            event, fields = ev.Queued, {"position": d["position"]}
        case "released":
            event = ev.Released
        case "left":
            event = ev.Left
        case "swap_started":
            queued = tuple(w.lease for w in sched.queue.of(name)) if name else ()
            event = ev.SwapStarted
            fields = {
                "victims": tuple(cast(list[str], d["victims"])),
                "requests": queued,
                "reason": d.get("reason", "request"),
            }
        case "draining":
            event, fields = ev.Draining, {"active": d["active"]}
        case "unloading":
            assert name is not None
            event = ev.Sleeping if sched.slots[name].spec.sleeps else ev.Unloading
        case "unloaded":
            assert name is not None
            fields = {"holding": d["holding"]}
            if d.get("error"):
                event, fields["error"] = ev.UnloadFailed, d["error"]
            else:
                event = ev.Freed
                fields["measured"] = held is not None
                fields["held"] = held if held is not None else sched.slots[name].spec.need
        case "loading":
            event = ev.Waking if d.get("wake") else ev.Loading
        case "load_failed":
            event, fields = ev.SwapLoadFailed, {"error": d["error"]}
        case "swap_failed":
            event, fields = ev.SwapFailed, {"failures": tuple(cast(list[str], d["failures"]))}
        case "swap_abandoned":
            event = ev.SwapAbandoned
        case other:
            raise ValueError(f"a scheduler note with no event: {other!r}")
    if swap is not None:
        fields["swap"] = swap
    return event, fields
