"""The event bus and the typed events: publishing never fails for a subscriber's sake, and each
kind's ``to_json()`` is the wire form ``/events`` has always sent."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import fields
from typing import Any

import pytest

from gpubroker import events as ev
from gpubroker.vram import MiB

# Each kind's wire keys, in order, as the broker, supervisor, monitor and SSE sent them before
# events were typed (beyond event/backend/at/request/elapsedMs, which every kind may carry, and
# a lease step's caller/model, sent only when known: see the test of them below).
WIRE: dict[str, list[str]] = {
    "queued": ["position"],
    "admitted": ["queueMs"],
    "refused": ["status", "reason"],
    "first_byte": [],
    "released": [],
    "left": [],
    "jobs": ["count", "running", "pending"],
    "shutting_down": [],
    "reconciled": ["state"],
    "swap_started": ["victims", "swap", "requests", "reason"],  # reason: added with units
    "draining": ["active", "swap"],
    "unloading": ["swap"],
    "sleeping": ["swap"],
    "freed": ["swap", "holding", "measured", "mib"],
    "unload_failed": ["error", "swap", "holding"],
    "loading": ["swap"],
    "waking": ["swap"],
    "load_failed": ["error", "swap"],
    "swap_failed": ["swap", "failures"],
    "swap_abandoned": ["swap"],
    "swapped": ["evicted", "total_ms", "swap", "drainMs", "unloadMs", "loadMs", "totalMs"],
    "warning": ["code", "subject", "message"],
    "warning_cleared": ["code", "subject"],
    "config_reloaded": ["added", "removed", "changed", "needsRestart", "summary"],
    "worker_starting": ["pid"],
    "worker_progress": ["elapsedMs"],
    "worker_ready": ["pid", "startMs"],
    "worker_adopted": ["pid"],
    "worker_failed": ["error"],
    "worker_exited": ["code"],
    "worker_crashed": ["code", "restartIn"],
    "worker_stopping": ["pid"],
    "worker_stopped": ["signal", "ms"],  # the stop report, spread
    "preload": ["target", "state", "error"],
}


def example(kind: type[ev.WireEvent]) -> ev.WireEvent:
    """One event of ``kind`` with every field filled in."""
    values: dict[str, Any] = {"backend": "a", "at": 100.0}
    for f in fields(kind):
        if f.name in values or f.name in ("lease", "elapsed", "caller", "model"):
            continue
        t = str(f.type)
        if "tuple" in t:
            values[f.name] = ("b",) if "str" in t else (7,)
        elif "Mapping" in t:
            values[f.name] = {"signal": "SIGTERM", "ms": 12.0}
        elif t.startswith("float"):
            values[f.name] = 0.25
        elif t.startswith("bool"):
            values[f.name] = True
        elif t.startswith("int"):
            values[f.name] = 3
        else:
            values[f.name] = "x"
    return kind(**values)


@pytest.mark.parametrize("kind", [k for k in ev.WIRE_KINDS if k is not ev.Dropped], ids=str)
def test_every_kind_sends_todays_wire_keys(kind: type[ev.WireEvent]) -> None:
    assert kind.kind in WIRE, f"{kind.kind}: add its wire shape here"
    wire = example(kind).to_json()
    assert list(wire) == ["event", "backend", "at", *WIRE[kind.kind]]
    assert wire["event"] == kind.kind and wire["backend"] == "a" and wire["at"] == 100.0


def test_every_kind_is_listed_once() -> None:
    kinds = [k.kind for k in ev.WIRE_KINDS]
    assert len(kinds) == len(set(kinds)) and set(kinds) == {*WIRE, "dropped"}


def test_request_and_elapsed_come_before_the_kinds_own_fields() -> None:
    e = ev.Admitted(backend="a", at=1.0, lease=4, elapsed=0.01234, queued=0.5)
    assert e.to_json() == {
        "event": "admitted",
        "backend": "a",
        "at": 1.0,
        "request": 4,
        "elapsedMs": 12.3,
        "queueMs": 500.0,
    }
    assert list(e.to_json()) == ["event", "backend", "at", "request", "elapsedMs", "queueMs"]


LEASE_STEPS = (ev.Queued, ev.Admitted, ev.LeaseRefused, ev.Released, ev.Left)


@pytest.mark.parametrize("kind", LEASE_STEPS, ids=str)
def test_a_lease_step_carries_its_caller_and_model_last_and_only_when_known(
    kind: type[ev.WireEvent],
) -> None:
    assert issubclass(kind, ev.LeaseStep)
    plain = example(kind)
    assert "caller" not in plain.to_json() and "model" not in plain.to_json()
    who = dataclasses.replace(plain, caller="nightly-job")  # type: ignore[type-var]
    assert list(who.to_json()) == ["event", "backend", "at", *WIRE[kind.kind], "caller"]
    assert who.to_json()["caller"] == "nightly-job"
    both = dataclasses.replace(plain, caller="ci", model="llama3:8b")  # type: ignore[type-var]
    assert list(both.to_json())[-2:] == ["caller", "model"]
    assert both.to_json()["model"] == "llama3:8b"


def test_only_lease_steps_carry_a_caller() -> None:
    steps = {k for k in ev.WIRE_KINDS if issubclass(k, ev.LeaseStep)}
    assert steps == set(LEASE_STEPS)


def test_units_become_the_wire_units() -> None:
    freed = ev.Freed(backend="a", swap=1, holding=False, measured=True, held=int(2.6 * MiB))
    assert (
        freed.to_json()["mib"] == 3
        and ev.Freed(backend="a", swap=1, holding=False, measured=False, held=None).to_json()["mib"]
        is None
    )
    swapped = ev.Swapped(
        backend="a", swap=2, evicted=("b",), drain=0.1, unload=0.2, load=0.3, total=0.6
    ).to_json()
    assert swapped["evicted"] == ["b"] and swapped["total_ms"] == swapped["totalMs"] == 600.0
    assert ev.WorkerProgress(backend="a", waited=1.2345).to_json()["elapsedMs"] == 1234
    assert ev.WorkerReady(backend="a", pid=9, took=1.23456).to_json()["startMs"] == 1234.6
    assert ev.WorkerCrashed(backend="a", code=1, restart_in=0.5).to_json()["restartIn"] == 0.5
    assert ev.Dropped(count=5, at=2.0).to_json() == {"event": "dropped", "count": 5, "at": 2.0}
    assert ev.BrokerShuttingDown(at=3.0).to_json() == {
        "event": "shutting_down",
        "backend": None,
        "at": 3.0,
    }


def test_a_failing_subscriber_neither_raises_nor_stops_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = ev.EventBus()
    got: list[ev.Event] = []

    def broken(event: ev.Event) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    event = ev.Released(backend="a", lease=1)
    with caplog.at_level(logging.ERROR, "gpubroker.events"):
        bus.publish(event)
    assert got == [event]
    assert "Released" in caplog.text and "boom" in caplog.text


def test_unsubscribe_stops_delivery_and_is_idempotent() -> None:
    bus = ev.EventBus()
    got: list[ev.Event] = []
    unsubscribe = bus.subscribe(got.append)
    assert len(bus) == 1
    unsubscribe()
    unsubscribe()
    bus.publish(ev.BrokerShuttingDown())
    assert got == [] and len(bus) == 0


def test_on_wire_passes_only_wire_events_in_wire_form() -> None:
    bus = ev.EventBus()
    got: list[dict[str, Any]] = []
    bus.subscribe(ev.on_wire(got.append))
    bus.publish(ev.Measured(backend="a", per_gpu={"0": 5}))
    bus.publish(ev.Unmanaged(per_gpu={"0": 5}))  # each sample's, like Measured: not streamed
    bus.publish(ev.WorkerGone(backend="a"))
    bus.publish(ev.Left(backend="a", lease=2, at=1.0))
    assert got == [{"event": "left", "backend": "a", "at": 1.0, "request": 2}]


def test_a_measurement_totals_like_the_broker_did() -> None:
    assert ev.Measured(backend="a", per_gpu={"0": 1, "1": 2}).total == 3
    assert ev.Measured(backend="a", per_gpu={"0": 1, "1": None}).total is None
    assert ev.Measured(backend="a", per_gpu={}).total is None
    assert ev.Unmanaged(per_gpu={"0": 1, "1": 2}).total == 3
    assert ev.Unmanaged(per_gpu={}).total == 0


def test_a_subscriber_gets_only_the_kinds_it_names_and_their_subclasses() -> None:
    bus = ev.EventBus()
    swaps: list[ev.Event] = []
    wire: list[ev.Event] = []
    everything: list[ev.Event] = []
    bus.subscribe(swaps.append, (ev.Swapped,))
    bus.subscribe(wire.append, (ev.WireEvent,))
    bus.subscribe(everything.append)
    measured = ev.Measured(backend="a", per_gpu={"0": 1})
    admitted = ev.Admitted(backend="a", lease=1, queued=0.0)
    swapped = ev.Swapped(backend="a", swap=1, evicted=("b",), drain=0, unload=0, load=0, total=0)
    for event in (measured, admitted, swapped):
        bus.publish(event)
    assert swaps == [swapped]
    assert wire == [admitted, swapped]
    assert everything == [measured, admitted, swapped]
    late: list[ev.Event] = []
    unsubscribe = bus.subscribe(late.append, (ev.Admitted,))  # after the kinds were looked up
    bus.publish(admitted)
    unsubscribe()
    bus.publish(admitted)
    assert late == [admitted]


def test_a_model_units_swap_step_names_the_model_last_and_only_when_set() -> None:
    plain = ev.Draining(backend="ollama", swap=2, active=0)
    assert "model" not in plain.to_json()
    unit = dataclasses.replace(plain, model="llama3:latest")
    assert list(unit.to_json())[-1] == "model" and unit.to_json()["model"] == "llama3:latest"
