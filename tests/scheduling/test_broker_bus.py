"""The broker's side of the bus: measurements it applies, workers gone it evicts, and the
scheduler's notes it publishes as typed events."""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from gpubroker import events as ev
from gpubroker.plugins.strategies.base import Strategy, StrategyContext
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler
from gpubroker.scheduling.scheduler import State
from gpubroker.testing import make_config
from gpubroker.vram import MiB

pytestmark = pytest.mark.anyio


class Counting(Strategy):
    name = "counting"

    def __init__(self, ctx: StrategyContext | None = None) -> None:
        self.unloads = 0

    async def resident(self) -> bool | None:
        return True

    async def unload(self) -> None:
        self.unloads += 1

    async def load(self) -> None:
        pass

    async def busy(self) -> bool:
        return False


def setup() -> tuple[Broker, ev.EventBus, Counting, list[ev.Event]]:
    cfg = make_config({"a": {"upstream": "http://127.0.0.1:9", "vram": "1GiB"}})
    strategy = Counting()
    bus = ev.EventBus()
    seen: list[ev.Event] = []
    bus.subscribe(seen.append)
    broker = Broker(cfg, {"a": strategy}, build_scheduler(cfg, {"a": strategy}, None), bus)
    return broker, bus, strategy, seen


async def test_a_measurement_on_the_bus_reaches_the_broker() -> None:
    broker, bus, _, _ = setup()
    bus.publish(ev.Measured(backend="a", per_gpu={"0": 5 * MiB}))
    assert broker.measured == {"a": {"0": 5 * MiB}}
    assert broker.measured_total("a") == 5 * MiB
    bus.publish(ev.Measured(backend="a", per_gpu={}))  # no GPU readings: nothing measured
    assert "a" not in broker.measured and broker.measured_total("a") is None


async def test_a_worker_gone_for_good_is_evicted_by_force() -> None:
    broker, bus, strategy, seen = setup()
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        assert broker.sched.state("a") is State.RESIDENT
        bus.publish(ev.WorkerGone(backend="a"))
        with anyio.fail_after(5):
            while broker.sched.state("a") is State.RESIDENT:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert strategy.unloads == 1
    kinds = [e.kind for e in seen if isinstance(e, ev.WireEvent)]
    assert kinds[0] == "reconciled" and "unloading" in kinds and "freed" in kinds
    freed = next(e for e in seen if isinstance(e, ev.Freed))
    wire: dict[str, Any] = freed.to_json()
    # nothing measured: the declared size, in MiB, as before
    assert (wire["measured"], wire["mib"]) == (False, 1024)


async def test_lease_steps_nobody_subscribed_to_are_logged_and_reach_a_later_subscriber(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker skips building the events nobody reads; the debug log, and a reader that
    comes later, still get every one."""
    cfg = make_config({"a": {"upstream": "http://127.0.0.1:9", "vram": "1GiB"}})
    strategy = Counting()
    bus = ev.EventBus()
    broker = Broker(cfg, {"a": strategy}, build_scheduler(cfg, {"a": strategy}, None), bus)
    released: list[ev.Event] = []
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        async with broker.lease("a", "/gpu"):  # nobody reads: nothing to see
            pass
        with caplog.at_level(logging.DEBUG, logger="gpubroker.events"):
            async with broker.lease("a", "/gpu") as logged:
                pass
        bus.subscribe(released.append, (ev.Released,))
        async with broker.lease("a", "/gpu") as read:
            pass
        tg.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records if r.name == "gpubroker.events"]
    for kind in ("Admitted", "Released"):
        assert sum(kind in m and f"lease={logged.lease}," in m for m in messages) == 1, messages
    assert [e.lease for e in released if isinstance(e, ev.Released)] == [read.lease]
