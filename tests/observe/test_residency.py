"""Each unit seen with its footprint and where that figure comes from, and every eviction with
the unit that went and why: in the status JSON, on /metrics and on the dashboard.

Model units come from a real broker and scheduler built from a budget config whose backend's
strategy frees models one by one (a small in-test one: the Ollama strategy's own per-model
support is tested with Ollama). The whole-backend path and the memory nobody owns run the whole
broker in front of the emulators, on a simulated GPU read through the ``sim`` telemetry.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_readmodel import shape_errors, wait_status

from gpubroker import events as ev
from gpubroker.cli.watch import render, render_text
from gpubroker.observe import readmodel
from gpubroker.observe.metrics import Metrics
from gpubroker.observe.schema import StatusJson
from gpubroker.plugins.strategies.base import Demand, Strategy
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler
from gpubroker.sim import GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.testing import broker_running, make_config

pytestmark = pytest.mark.anyio


class Models(Strategy):
    """A service that loads a model on request and frees one at a time; what it holds of each
    (its ``/api/ps``) is ``sizes``, which may differ from what the config declares."""

    name = "models"
    per_model = True

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes
        self.loaded: dict[str, int] = {}

    async def resident(self) -> bool | None:
        return False

    async def busy(self) -> bool:
        return False

    async def demand(self, method: str, path: str, body: bytes) -> Demand | None:
        try:
            asked = json.loads(body)
            return Demand(model=asked["model"], need=asked.get("need"))
        except (ValueError, KeyError, TypeError):
            return None

    async def load_model(self, model: str) -> None:
        self.loaded[model] = self.sizes[model]

    async def unload_model(self, model: str) -> None:
        self.loaded.pop(model, None)

    async def loaded_models(self) -> dict[str, int] | None:
        return dict(self.loaded)


class Whole(Strategy):
    """A backend freed as a whole (one unit)."""

    name = "whole"

    def __init__(self) -> None:
        self.up = False

    async def resident(self) -> bool | None:
        return False

    async def busy(self) -> bool:
        return False

    async def load(self) -> None:
        self.up = True

    async def unload(self) -> None:
        self.up = False


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[Any, float], metric: str, /, **labels: str) -> float | None:
    return found.get((metric, frozenset(labels.items())))


def units(status: StatusJson, backend: str) -> dict[str, dict[str, Any]]:
    return {u["name"]: dict(u) for u in status["backends"][backend]["units"]}


@asynccontextmanager
async def model_broker() -> AsyncIterator[tuple[Broker, Models, Metrics]]:
    """A budget broker on one 24 GiB GPU: ``m`` serves models (small declared 4 GiB, which is
    5 GiB once loaded; big declared 18 GiB), ``g`` is one 6 GiB unit."""
    cfg = make_config(
        {
            "m": {
                "upstream": "http://127.0.0.1:9",
                "models": [{"name": "small", "vram": "4GiB"}, {"name": "big", "vram": "18GiB"}],
            },
            "g": {"upstream": "http://127.0.0.1:9", "vram": "6GiB"},
        },
        policy="budget",
        minResidency=0,
        holdTime="30s",
        gpus=[{"id": 0, "memory": "24GiB"}],
    )
    models = Models({"small": 5 * GiB, "big": 18 * GiB})
    strategies: dict[str, Strategy] = {"m": models, "g": Whole()}
    bus = ev.EventBus()
    broker = Broker(cfg, strategies, build_scheduler(cfg, strategies, None), bus)
    metrics = Metrics(broker, bus)
    async with anyio.create_task_group() as tg:
        await tg.start(broker.run)
        yield broker, models, metrics
        tg.cancel_scope.cancel()


async def ask(broker: Broker, backend: str, **body: Any) -> None:
    """One GPU request, admitted and ended."""
    raw = json.dumps(body).encode() if body else None
    with anyio.fail_after(5):
        async with broker.lease(backend, "/api/chat", body=raw):
            pass


def status(broker: Broker) -> StatusJson:
    body = readmodel.read(broker).to_json()
    assert shape_errors(body, StatusJson) == []
    return body


async def test_model_units_show_their_size_its_source_and_who_evicted_them() -> None:
    async with model_broker() as (broker, models, metrics):
        before = status(broker)
        # Nothing loaded: the declared models are listed (their size is known), the backend's
        # own unit is not (it holds nothing and has models of its own).
        assert units(before, "m") == {
            "m/small": {"name": "m/small", "model": "small", "state": "absent",
                        "vramBytes": 4 * GiB, "vramSource": "declared", "measuredBytes": None,
                        "active": 0, "queued": 0},
            "m/big": {"name": "m/big", "model": "big", "state": "absent", "vramBytes": 18 * GiB,
                      "vramSource": "declared", "measuredBytes": None, "active": 0, "queued": 0},
        }  # fmt: skip
        assert [u["name"] for u in before["backends"]["g"]["units"]] == ["g"]  # its only unit

        await ask(broker, "m", model="small")
        await broker.units.follow("m")  # what the service says it holds, model by model
        await ask(broker, "g")
        after = status(broker)
        small = units(after, "m")["m/small"]
        assert (small["state"], small["vramBytes"], small["vramSource"]) == (
            "resident", 5 * GiB, "measured"  # more than declared: the measurement counts
        )  # fmt: skip
        assert small["measuredBytes"] == 5 * GiB
        assert units(after, "g")["g"] == {
            "name": "g", "model": None, "state": "resident", "vramBytes": 6 * GiB,
            "vramSource": "declared", "measuredBytes": None, "active": 0, "queued": 0,
        }  # fmt: skip
        assert after["backends"]["m"]["state"] == "resident"  # its models', not its own unit's
        board = render_text(render(after, url="http://status"), width=140).splitlines()
        (row,) = [line for line in board if "  small " in line]
        assert "resident" in row and "5.0 GiB measured" in row
        assert not [line for line in board if "  big " in line]  # absent: no line of its own
        assert "plan 11.0 GiB / 24.0 GiB" in "\n".join(board) and "unmanaged" not in "".join(board)
        assert after["gpuPlan"] == [
            {"gpu": "0", "capacityBytes": 24 * GiB, "plannedBytes": 11 * GiB,
             "unmanagedBytes": None}  # no telemetry: nothing is known of strangers
        ]  # fmt: skip

        # A request asking more of small than it was sized for: estimated, while it lasts.
        # big (18 GiB of the 24) then queues behind that lease until it ends.
        raw = json.dumps({"model": "small", "need": 7 * GiB}).encode()
        async with anyio.create_task_group() as tg, broker.lease("m", "/api/chat", body=raw):
            held = status(broker)
            tg.start_soon(partial(ask, broker, "m", model="big"))
            with anyio.fail_after(5):
                while not broker.sched.queue:
                    await anyio.sleep(0.01)
            waiting = status(broker)
        small = units(held, "m")["m/small"]
        assert (small["vramBytes"], small["vramSource"], small["active"]) == (
            7 * GiB, "estimated", 1
        )  # fmt: skip
        (lease,) = [r for r in held["liveRequests"] if r["kind"] == "lease"]
        assert (lease["backend"], lease["unit"]) == ("m", "m/small")
        assert held["backends"]["m"]["active"] == held["activeRequests"]["m"] == 1
        (entry,) = waiting["queue"]
        assert (entry["backend"], entry["unit"]) == ("m", "m/big")
        assert waiting["queuedBackends"] == ["m"]  # OneGPU4All's: one backend per waiter
        assert units(waiting, "m")["m/big"]["queued"] == 1
        assert waiting["backends"]["m"]["queued"] == 1

        swapped = status(broker)
        (swap,) = swapped["swaps"]
        # 7 GiB of small covers big's shortfall (7 + 6 + 18 > 24): it goes, g stays
        assert (swap["evicted"], swap["to"], swap["reason"]) == (["m/small"], "m/big", "request")

        evicted = await broker.evict("m")  # admin: big goes, by name
        assert evicted is not None and evicted.evicted == ("m/big",)
        assert models.loaded == {}  # the service was told: small for big, then big
        last = status(broker)
        assert (last["swaps"][0]["evicted"], last["swaps"][0]["reason"]) == (["m/big"], "admin")
        swaps = render_text(render(last, url="http://status"), width=140)
        assert "m/big → - " in swaps and "m/small → m/big " in swaps
        (admin,) = [line for line in swaps.splitlines() if "m/big → -" in line]
        assert "│ admin " in admin
        found = samples(metrics.render().decode())

    # A unit that went is counted once, under its backend and model, with its swap's reason.
    evictions = {k: v for k, v in found.items() if k[0] == "gpubroker_evictions_total" and v}
    small = {"backend": "m", "model": "small", "reason": "request"}
    assert value(found, "gpubroker_evictions_total", **small) == 1
    assert len(evictions) == 2
    assert value(found, "gpubroker_evictions_total", backend="m", model="big", reason="admin") == 1
    assert value(found, "gpubroker_evictions_total", backend="m", model="", reason="idle") == 0
    # big is gone, small went for it: nothing of m holds memory, its units say so; g does
    assert value(found, "gpubroker_unit_state", backend="m", model="big", state="absent") == 1
    assert value(found, "gpubroker_unit_state", backend="m", model="", state="absent") == 1
    assert value(found, "gpubroker_unit_vram_bytes", backend="m", model="big",
                 source="declared") is None  # fmt: skip
    assert value(found, "gpubroker_unit_vram_bytes", backend="g", model="",
                 source="declared") == 6 * GiB  # fmt: skip
    assert value(found, "gpubroker_unit_state", backend="g", model="", state="resident") == 1
    assert not [k for k in found if k[0] == "gpubroker_unmanaged_vram_bytes"]  # unknown: left out
    assert value(found, "gpubroker_backend_state", backend="m", state="absent") == 1  # as before


async def test_whole_backends_and_the_memory_nobody_owns_as_telemetry_sees_them() -> None:
    gpu = SimGPU(16 * GiB)
    gpu.allocate("stranger", 2 * GiB)  # a process no backend owns
    a = GenericEmulator(gpu, 3 * GiB, owner="a")
    b = GenericEmulator(gpu, 6 * GiB, owner="b")
    async with running(a.app) as ua, running(b.app) as ub, running(gpu_app(gpu)) as g:

        def generic(url: str, vram: str) -> dict[str, Any]:
            return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload",
                    "vram": vram}  # fmt: skip

        cfg = make_config(
            {"a": generic(ua, "4GiB"), "b": generic(ub, "5GiB")},
            policy="budget",
            minResidency=0,
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            for name in ("a", "b"):  # 4 + 5 of 16, with 2 held by the stranger: both fit
                r = await client.post(ep.proxies[name] + "/generate", json={})
                assert r.status_code == 200, r.text
            both = await wait_status(
                client,
                ep.status_url,
                lambda s: (
                    s["gpuPlan"][0]["unmanagedBytes"] == 2 * GiB
                    and s["backends"]["b"]["units"][0]["vramSource"] == "measured"
                ),
            )
            gpu.allocate("stranger", 4 * GiB + GiB // 2)  # 4 + 6 + 6.5 > 16: one must go
            gone = await wait_status(client, ep.status_url, lambda s: bool(s["swaps"]))
            found = samples((await client.get(ep.status_url + "/metrics")).text)
    assert shape_errors(both, StatusJson) == [] and shape_errors(gone, StatusJson) == []
    assert both["backends"]["a"]["units"] == [
        {"name": "a", "model": None, "state": "resident", "vramBytes": 4 * GiB,
         "vramSource": "declared", "measuredBytes": 3 * GiB, "active": 0, "queued": 0},
    ]  # fmt: skip
    (ub_unit,) = both["backends"]["b"]["units"]
    assert (ub_unit["vramBytes"], ub_unit["measuredBytes"]) == (6 * GiB, 6 * GiB)  # > declared
    assert both["gpuPlan"] == [
        {"gpu": "0", "capacityBytes": 16 * GiB, "plannedBytes": 12 * GiB,
         "unmanagedBytes": 2 * GiB},
    ]  # fmt: skip
    (swap,) = gone["swaps"]
    assert swap["reason"] == "unmanaged" and swap["to"] is None
    assert swap["evicted"] in (["a"], ["b"])
    (victim,) = swap["evicted"]
    (kept,) = {"a", "b"} - {victim}
    assert gone["backends"][victim]["state"] == "absent"
    assert gone["gpuPlan"][0]["unmanagedBytes"] == 6 * GiB + GiB // 2
    board = render_text(render(gone, url=ep.status_url), width=140)
    assert "unmanaged 6.5 GiB" in board
    (line,) = [row for row in board.splitlines() if f"│ {victim} → - " in row]
    assert "│ unmanaged " in line
    unmanaged = {"backend": victim, "model": "", "reason": "unmanaged"}
    assert value(found, "gpubroker_evictions_total", **unmanaged) == 1
    assert value(found, "gpubroker_unmanaged_vram_bytes", gpu="0") == 6 * GiB + GiB // 2
    plan = gone["gpuPlan"][0]  # the same figures per GPU as the status JSON
    assert value(found, "gpubroker_gpu_capacity_bytes", gpu="0") == plan["capacityBytes"]
    assert value(found, "gpubroker_gpu_planned_bytes", gpu="0") == plan["plannedBytes"]
    assert value(found, "gpubroker_unit_state", backend=victim, model="", state="absent") == 1
    kept_source = "declared" if kept == "a" else "measured"
    kept_size = 4 * GiB if kept == "a" else 6 * GiB
    labels = {"backend": kept, "model": "", "source": kept_source}
    assert value(found, "gpubroker_unit_vram_bytes", **labels) == kept_size
    assert not [
        k for k in found if k[0] == "gpubroker_unit_vram_bytes" and k[1] >= {("backend", victim)}
    ]  # it holds nothing now: no footprint series
