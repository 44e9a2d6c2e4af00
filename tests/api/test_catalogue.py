"""The catalogue on its own: which backend a shared model goes to, and how discovery copes with
a backend that is down or that accepts and never answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from gpubroker.api import catalogue as catalogue_module
from gpubroker.api.catalogue import Catalogue
from gpubroker.config.model import BackendConfig
from gpubroker.errors import ModelNotFound
from gpubroker.scheduling.scheduler import State
from gpubroker.testing import make_config

pytestmark = pytest.mark.anyio


class Fixed:
    """A Residency whose answers the test sets."""

    def __init__(self, states: Mapping[str, State] | None = None) -> None:
        self.states = dict(states or {})

    def state(self, backend: str) -> State:
        return self.states.get(backend, State.ABSENT)


def backends(**specs: Mapping[str, Any]) -> tuple[BackendConfig, ...]:
    return make_config(specs).backends


class Lists:
    """``/v1/models`` answers per mock host: a list of ids, or None for a refused connection."""

    def __init__(self, **models: list[str] | None) -> None:
        self.models = dict(models)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        names = self.models[request.url.host]
        if names is None:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"data": [{"id": n} for n in names]})


def client_with(lists: Lists, hosts: list[str]) -> httpx.AsyncClient:
    mock = httpx.MockTransport(lists)
    return httpx.AsyncClient(mounts={f"http://{h}": mock for h in hosts}, trust_env=False)


@asynccontextmanager
async def running(
    configs: tuple[BackendConfig, ...],
    client: httpx.AsyncClient,
    residency: Fixed | None = None,
    costs: Mapping[str, int] | None = None,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Catalogue]:
    extra = {} if clock is None else {"clock": clock}
    cat = Catalogue(
        configs,
        client=client,
        refresh_every=3600,
        residency=residency or Fixed(),
        costs=costs or {},
        **extra,
    )
    async with client, anyio.create_task_group() as tg:
        tg.start_soon(cat.run)
        try:
            yield cat
        finally:
            tg.cancel_scope.cancel()


async def test_a_model_goes_to_a_reachable_backend_before_one_that_is_down() -> None:
    lists = Lists(a=["m", "only-a"], b=["m"])
    configs = backends(a={"upstream": "http://a"}, b={"upstream": "http://b"})
    async with running(configs, client_with(lists, ["a", "b"])) as cat:
        await cat.refresh()
        assert (await cat.resolve("m")).backend == "a"  # both up: config order
        lists.models["a"] = None  # a goes down; it keeps its last known list
        await cat.refresh()
        assert not cat.reachable("a") and cat.reachable("b")
        assert (await cat.resolve("m")).backend == "b"
        listed = {name: (route.backend, up) for name, route, up in await cat.listing()}
        assert listed == {"m": ("b", True), "only-a": ("a", False)}
        assert (await cat.resolve("only-a")).backend == "a"  # still named: /proxy/ may wake it


async def test_unreachable_outranks_residency_and_cost() -> None:
    lists = Lists(a=["m"], b=["m"])
    configs = backends(a={"upstream": "http://a"}, b={"upstream": "http://b"})
    resident_a = Fixed({"a": State.RESIDENT, "b": State.ABSENT})
    client = client_with(lists, ["a", "b"])
    async with running(configs, client, resident_a, costs={"a": 1, "b": 3}) as cat:
        await cat.refresh()
        assert (await cat.resolve("m")).backend == "a"
        lists.models["a"] = None
        await cat.refresh()
        assert (await cat.resolve("m")).backend == "b"


async def test_the_preference_order_resident_asleep_cheapest_then_config_order() -> None:
    names = ["a", "b", "c", "d"]
    lists = Lists(**{n: ["m"] for n in names})
    configs = backends(**{n: {"upstream": f"http://{n}"} for n in names})
    states = Fixed({n: State.ABSENT for n in names})
    costs = {"a": 3, "b": 2, "c": 1, "d": 1}
    async with running(configs, client_with(lists, names), states, costs) as cat:
        await cat.refresh()

        def order() -> list[str]:
            return [r.backend for r in cat.routes("m")]

        assert order() == ["c", "d", "b", "a"]  # all to be loaded: cheapest, then config order
        states.states["a"] = State.ASLEEP
        assert order() == ["a", "c", "d", "b"]  # asleep wakes before any cold load
        states.states["b"] = State.LOADING
        assert order() == ["b", "a", "c", "d"]  # already coming in counts as resident
        states.states["d"] = State.RESIDENT
        states.states["b"] = State.RESIDENT
        assert order() == ["d", "b", "a", "c"]  # among the resident, the cheapest


@asynccontextmanager
async def blackhole() -> AsyncIterator[str]:
    """A TCP port that accepts and never answers: a slow failure, not a refused one."""

    async def hold(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await anyio.sleep_forever()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, hold)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def test_unknown_models_do_not_each_wait_out_a_blackholed_backend() -> None:
    lists = Lists(up=["m"])
    async with blackhole() as dead:
        configs = backends(dead={"upstream": dead}, up={"upstream": "http://up"})
        async with running(configs, client_with(lists, ["up"])) as cat:
            assert catalogue_module.DISCOVERY_TIMEOUT >= 5  # the first reads hang this long
            with anyio.fail_after(2.5):  # one short wait for the reads under way, not 5 s
                with pytest.raises(ModelNotFound):
                    await cat.resolve("nope")
            with anyio.fail_after(0.5):  # the read is still hanging: nothing more to wait for
                with pytest.raises(ModelNotFound):
                    await cat.resolve("nope either")
            with anyio.fail_after(0.5):
                assert (await cat.resolve("m")).backend == "up"


async def test_a_new_model_on_a_healthy_backend_resolves_while_another_is_blackholed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(catalogue_module, "UNKNOWN_REFRESH_EVERY", 0.2)
    lists = Lists(up=[])
    async with blackhole() as dead:
        configs = backends(dead={"upstream": dead}, up={"upstream": "http://up"})
        async with running(configs, client_with(lists, ["up"])) as cat:
            await anyio.sleep(0.3)  # up has been read; dead's read hangs on
            lists.models["up"] = ["new"]
            with anyio.fail_after(1.0):
                assert (await cat.resolve("new")).backend == "up"
