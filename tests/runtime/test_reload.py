"""A reload of the config file under a running broker: real files, real sockets, emulated
services on one simulated GPU. Nothing a client has in flight is dropped; a broken file
changes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gpubroker import events as ev
from gpubroker.config.load import load_config_file
from gpubroker.runtime import Endpoints
from gpubroker.runtime.watch import watch_config
from gpubroker.scheduling.scheduler import State
from gpubroker.sim import GenericEmulator, GiB, OllamaEmulator, SimGPU, running
from gpubroker.testing import broker_running
from processes import FAKE, alive, free_port, port_open

pytestmark = pytest.mark.anyio


def generic(name: str, upstream: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "proxyPort": port,
        "upstream": upstream,
        "unloadStrategy": "generic",
        "unloadEndpoint": "/unload",
        "loadEndpoint": "/load",
        "healthPath": "/health",
        **extra,
    }


def managed(port: int, at: int, *args: str, name: str = "w", **extra: Any) -> dict[str, Any]:
    """A managed fake worker (``FAKE`` with ``args``) on proxy port ``port``, listening at
    ``at``."""
    return {
        "name": name,
        "proxyPort": port,
        "upstream": f"http://127.0.0.1:{at}",
        "unloadStrategy": "process",
        "classifier": "generic",
        "healthPath": "/health",
        "command": [*FAKE, *args],
        **extra,
    }


def write(path: Path, backends: list[dict[str, Any]], **top: Any) -> Path:
    """The config file (JSON is YAML too)."""
    path.write_text(json.dumps({"telemetry": "none", **top, "backends": backends}, indent=2))
    return path


@asynccontextmanager
async def serving(path: Path) -> AsyncIterator[Endpoints]:
    async with broker_running(load_config_file(path)) as ep:
        yield ep


async def reload(ep: Endpoints) -> dict[str, Any]:
    assert ep.reload is not None
    return await ep.reload()


async def sse(client: httpx.AsyncClient, url: str, tokens: int) -> list[str]:
    """One streamed generation; every data line it brought."""
    lines: list[str] = []
    body = {"tokens": tokens, "format": "sse"}
    async with client.stream("POST", url + "/generate", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
    return lines


def complete(lines: list[str], tokens: int) -> bool:
    return lines[-1] == "[DONE]" and [json.loads(x)["index"] for x in lines[:-1]] == list(
        range(tokens)
    )


async def until(check: Callable[[], bool], limit: float = 10.0) -> None:
    with anyio.fail_after(limit):
        while not check():
            await anyio.sleep(0.02)


def refused(url: str) -> bool:
    """Nothing listens there any more (a connect, which the kernel answers by itself)."""
    return not port_open(httpx.URL(url).port or 80)


async def test_a_stream_in_flight_survives_a_reload_that_adds_a_backend(tmp_path: Path) -> None:
    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, token_interval=0.02, owner="a")
    b_emu = GenericEmulator(gpu, 2 * GiB, owner="b")
    async with running(a_emu.app) as a, running(b_emu.app) as b:
        path = write(tmp_path / "gpubroker.yaml", [generic("a", a, 21001)])
        async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
            seen: list[ev.Event] = []
            assert ep.bus is not None
            ep.bus.subscribe(seen.append, (ev.ConfigReloaded,))
            async with anyio.create_task_group() as tg:
                got: list[list[str]] = []

                async def stream() -> None:
                    got.append(await sse(client, ep.proxies["a"], 100))

                tg.start_soon(stream)
                await until(lambda: a_emu.inflight > 0)
                write(path, [generic("a", a, 21001, priority=3), generic("b", b, 21002)])
                answer = await reload(ep)
                assert answer["ok"], answer
                assert answer["changes"]["added"] == ["b"]
                assert answer["changes"]["changed"] == {"a": ["priority"]}
                assert a_emu.inflight == 1  # still streaming, on the same connection
            assert complete(got[0], 100)
            assert ep.broker is not None and ep.broker.sched.slots["a"].spec.priority == 3
            response = await client.post(ep.proxies["b"] + "/generate", json={"tokens": 2})
            assert response.status_code == 200 and b_emu.loaded
            status = (await client.get(ep.status_url + "/api/status")).json()
            assert set(status["backends"]) == {"a", "b"}
            assert [e.added for e in seen if isinstance(e, ev.ConfigReloaded)] == [("b",)]


async def test_a_removed_backend_finishes_its_response_then_its_port_closes(
    tmp_path: Path,
) -> None:
    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, owner="a")
    b_emu = GenericEmulator(gpu, 2 * GiB, token_interval=0.02, owner="b")
    async with running(a_emu.app) as a, running(b_emu.app) as b:
        both = [generic("a", a, 21001), generic("b", b, 21002)]
        path = write(tmp_path / "gpubroker.yaml", both, shutdownGrace="20s")
        async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
            b_url = ep.proxies["b"]
            async with anyio.create_task_group() as tg:
                got: list[list[str]] = []

                async def stream() -> None:
                    got.append(await sse(client, b_url, 100))

                tg.start_soon(stream)
                await until(lambda: b_emu.inflight > 0)
                write(path, [generic("a", a, 21001)], shutdownGrace="20s")
                answer = await reload(ep)
                assert answer["ok"] and answer["changes"]["removed"] == ["b"]
                late = await client.post(b_url + "/generate", json={"tokens": 2})
                assert late.status_code == 503
                assert late.json()["error"] == "backend_removed"
                assert late.headers["retry-after"] == "5"
                assert b_emu.inflight == 1  # still streaming on the port that refuses others
            assert complete(got[0], 100)
            await until(lambda: refused(b_url))
            assert ep.broker is not None
            await until(lambda: "b" not in ep.broker.sched.slots)
            assert "b" not in ep.proxies and not b_emu.loaded  # unloaded before it was forgot
            assert b_emu.unload_with_inflight == 0
            response = await client.post(ep.proxies["a"] + "/generate", json={"tokens": 2})
            assert response.status_code == 200


async def test_a_queued_request_for_a_removed_backend_is_refused_not_left_hanging(
    tmp_path: Path,
) -> None:
    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, token_interval=0.02, owner="a")
    b_emu = GenericEmulator(gpu, 2 * GiB, owner="b")
    async with running(a_emu.app) as a, running(b_emu.app) as b:
        both = [generic("a", a, 21001), generic("b", b, 21002)]
        path = write(tmp_path / "gpubroker.yaml", both, holdTime="20s", queueTimeout="60s")
        async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
            assert ep.broker is not None
            broker = ep.broker
            async with anyio.create_task_group() as tg:
                got: list[Any] = []

                async def stream() -> None:
                    got.append(await sse(client, ep.proxies["a"], 60))

                async def queued() -> None:
                    got.append(await client.post(ep.proxies["b"] + "/generate", json={}))

                tg.start_soon(stream)
                await until(lambda: a_emu.inflight > 0)
                tg.start_soon(queued)  # exclusive: waits for a, which holds the GPU
                await until(lambda: broker.sched.queued("b") == 1)
                write(path, [generic("a", a, 21001)], holdTime="20s", queueTimeout="60s")
                assert (await reload(ep))["ok"]
                await until(lambda: len(got) == 1)
                refusal = got[0]
                assert refusal.status_code == 503
                assert refusal.json()["error"] == "backend_removed"
                assert a_emu.inflight == 1  # a's stream goes on meanwhile
            assert complete(got[1], 60)
            assert not b_emu.loaded


async def test_a_changed_size_decides_the_next_placement(tmp_path: Path) -> None:
    gpu = SimGPU(10 * GiB)
    a_emu = GenericEmulator(gpu, 4 * GiB, owner="a")
    b_emu = GenericEmulator(gpu, 4 * GiB, owner="b")
    top = {"policy": "budget", "gpus": [{"id": 0, "memory": "10GiB"}], "minResidency": "0s"}
    async with running(a_emu.app) as a, running(b_emu.app) as b:

        def backends(b_vram: str) -> list[dict[str, Any]]:
            return [generic("a", a, 21001, vram="4GiB"), generic("b", b, 21002, vram=b_vram)]

        path = write(tmp_path / "gpubroker.yaml", backends("4GiB"), **top)
        async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
            assert ep.broker is not None
            sched = ep.broker.sched

            async def use(name: str) -> httpx.Response:
                return await client.post(ep.proxies[name] + "/generate", json={"tokens": 1})

            assert (await use("a")).status_code == 200
            assert (await use("b")).status_code == 200
            assert sched.state("a") is State.RESIDENT  # 4 + 4 fit in 10: side by side
            await ep.broker.evict("b")
            write(path, backends("7GiB"), **top)
            answer = await reload(ep)
            assert answer["changes"]["changed"] == {"b": ["vram"]}
            assert sched.slots["b"].spec.need == 7 * GiB
            assert (await use("a")).status_code == 200
            assert sched.state("a") is State.RESIDENT
            response = await use("b")  # 4 + 7 no longer fit: a makes room
            assert response.status_code == 200
            assert "evicted=a" in response.headers.get("x-gpubroker-swap", "")
            assert sched.state("a") is not State.RESIDENT and not a_emu.loaded


async def test_a_broken_file_changes_nothing_and_says_where(tmp_path: Path) -> None:
    gpu = SimGPU(24 * GiB)
    emu = GenericEmulator(gpu, 2 * GiB)
    async with running(emu.app) as a:
        path = write(tmp_path / "gpubroker.yaml", [generic("a", a, 21001)])
        async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
            assert ep.broker is not None and ep.bus is not None
            warnings: list[ev.Event] = []
            ep.bus.subscribe(warnings.append, (ev.WarningRaised, ev.WarningCleared))
            before = ep.broker.config
            path.write_text(
                "telemetry: none\nbackends:\n  - name: a\n    proxyPort: 21001\n"
                f"    upstream: {a}\n    unloadStrategy: generic\n    priorty: 2\n"
            )
            answer = await reload(ep)
            assert not answer["ok"]
            assert answer["error"].startswith(f"{path}:7:5: backends[0].priorty: unknown key")
            assert ep.broker.config is before
            assert [e.code for e in warnings if isinstance(e, ev.WarningRaised)] == [
                "config_reload_failed"
            ]
            write(path, [generic("a", a, 21001, unloadStrategy="nosuch")])
            answer = await reload(ep)  # valid YAML, but no plugin has that strategy
            assert f"{path}:" in answer["error"] and "unknown strategy 'nosuch'" in answer["error"]
            assert ep.broker.config is before
            response = await client.post(ep.proxies["a"] + "/generate", json={"tokens": 1})
            assert response.status_code == 200
            write(path, [generic("a", a, 21001)])
            answer = await reload(ep)
            assert answer == {
                "ok": True,
                "summary": "nothing changed",
                "changes": {
                    "added": [],
                    "removed": [],
                    "changed": {},
                    "settings": [],
                    "needsRestart": [],
                },
            }
            assert isinstance(warnings[-1], ev.WarningCleared)


async def test_keys_that_need_a_restart_are_reported_and_the_rest_applied(
    tmp_path: Path,
) -> None:
    gpu = SimGPU(24 * GiB)
    emu = GenericEmulator(gpu, 2 * GiB)
    async with running(emu.app) as a:
        path = write(tmp_path / "gpubroker.yaml", [generic("a", a, 21001)])
        async with serving(path) as ep:
            assert ep.broker is not None
            write(
                path,
                [generic("a", a, 21001, maxConcurrency=2)],
                statusPort=free_port(),
                queueTimeout="45s",
            )
            answer = await reload(ep)
            assert answer["ok"]
            assert answer["changes"]["needsRestart"] == ["statusPort"]
            assert answer["changes"]["settings"] == ["queueTimeout"]
            assert "needs a restart: statusPort" in answer["summary"]
            assert ep.broker.sched.queue_timeout == 45.0
            assert ep.broker.sched.slots["a"].spec.max_concurrency == 2
            assert ep.broker.config.status_port == 5102  # kept until a restart
            before = ep.broker.strategies["a"]
            write(path, [generic("a", a, 21001, unloadStrategy="ollama", classifier="generic")])
            answer = await reload(ep)
            assert answer["changes"]["changed"] == {
                "a": ["unloadStrategy", "classifier", "maxConcurrency"]
            }
            assert type(ep.broker.strategies["a"]).name == "ollama"  # a new instance
            await until(lambda: before.client.is_closed)  # the old one's client, once idle


async def test_a_changed_command_restarts_the_managed_worker_once_idle(tmp_path: Path) -> None:
    port, other = free_port(), free_port()

    def worker(*args: str, name: str = "w", at: int = port) -> dict[str, Any]:
        return managed(21001 if name == "w" else 21002, at, *args, name=name)

    path = write(tmp_path / "gpubroker.yaml", [worker()])
    async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
        assert ep.broker is not None and ep.broker.supervisor is not None
        sup = ep.broker.supervisor
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with anyio.create_task_group() as tg:
            done: list[str] = []

            async def stream() -> None:
                url = ep.proxies["w"] + "/v1/chat/completions"
                async with client.stream("POST", url, json=chat) as response:
                    done.append((await response.aread()).decode())

            tg.start_soon(stream)
            await until(lambda: sup.workers["w"].pid is not None and not ep.broker.idle("w"))
            first = sup.workers["w"].pid
            write(path, [worker("--token-interval", "0.001")])
            answer = await reload(ep)
            assert answer["changes"]["changed"] == {"w": ["command"]}
            assert sup.workers["w"].pid == first  # busy: not yet
        assert done[0].rstrip().endswith("data: [DONE]")  # the stream was not cut
        await until(lambda: sup.workers["w"].pid not in (None, first), limit=20)
        await until(lambda: sup.workers["w"].state.value == "ready", limit=20)
        assert "--token-interval" in sup.workers["w"].argv
        assert first is not None and not alive(first)
        response = await client.post(ep.proxies["w"] + "/v1/chat/completions", json=chat)
        assert response.status_code == 200
        # a managed worker added, running, then removed: stopped, never left running
        write(path, [worker("--token-interval", "0.001"), worker(name="v", at=other)])
        assert (await reload(ep))["changes"]["added"] == ["v"]
        response = await client.post(ep.proxies["v"] + "/v1/chat/completions", json=chat)
        pid = sup.workers["v"].pid
        assert response.status_code == 200 and pid is not None
        write(path, [worker("--token-interval", "0.001")])
        assert (await reload(ep))["changes"]["removed"] == ["v"]
        await until(lambda: "v" not in sup.workers, limit=20)
        assert not alive(pid)


async def test_watching_the_file_reloads_on_an_edit(tmp_path: Path) -> None:
    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, owner="a")
    b_emu = GenericEmulator(gpu, 2 * GiB, owner="b")
    async with running(a_emu.app) as a, running(b_emu.app) as b:
        path = write(tmp_path / "gpubroker.yaml", [generic("a", a, 21001)])
        async with serving(path) as ep, anyio.create_task_group() as tg:
            assert ep.reload is not None
            tg.start_soon(lambda: watch_config(path, ep.reload, interval=0.05))  # type: ignore[arg-type]
            await anyio.sleep(0.2)
            assert "b" not in ep.proxies
            write(path, [generic("a", a, 21001), generic("b", b, 21002)])
            await until(lambda: "b" in ep.proxies)
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(ep.proxies["b"] + "/generate", json={"tokens": 1})
            assert response.status_code == 200
            tg.cancel_scope.cancel()


async def test_the_reload_verb_passes_the_admin_gate(tmp_path: Path) -> None:
    gpu = SimGPU(24 * GiB)
    emu = GenericEmulator(gpu, 2 * GiB)
    token = "s3cret-admin-token"
    async with running(emu.app) as a:
        path = write(tmp_path / "gpubroker.yaml", [generic("a", a, 21001)], adminToken=token)
        async with serving(path) as ep, httpx.AsyncClient(timeout=10) as client:
            url = ep.status_url + "/api/reload"
            assert (await client.post(url, json={})).status_code == 401
            form = await client.post(
                url, content=b"x", headers={"authorization": f"Bearer {token}"}
            )
            assert form.status_code == 415  # a web page's form cannot reload it either
            answer = await client.post(url, json={}, headers={"authorization": f"Bearer {token}"})
            assert answer.status_code == 200 and answer.json()["summary"] == "nothing changed"


async def test_the_api_port_routes_to_backends_as_the_reloaded_file_lists_them(
    tmp_path: Path,
) -> None:
    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, owner="a")
    b_emu = GenericEmulator(gpu, 2 * GiB, owner="b")
    async with running(a_emu.app) as a, running(b_emu.app) as b:
        one = [generic("a", a, 21001, models=["alpha"])]
        path = write(tmp_path / "gpubroker.yaml", one, apiPort=21100)
        async with serving(path) as ep, httpx.AsyncClient(timeout=10) as client:
            assert ep.api_url is not None

            async def models() -> set[str]:
                listing = (await client.get(ep.api_url + "/v1/models")).json()
                return {m["id"] for m in listing["data"]}

            async def chat(model: str) -> httpx.Response:
                body = {"model": model, "messages": []}
                return await client.post(ep.api_url + "/v1/chat/completions", json=body)

            assert await models() == {"alpha"}
            two = [*one, generic("b", b, 21002, models=["beta"])]
            write(path, two, apiPort=21100)
            assert (await reload(ep))["ok"]
            assert await models() == {"alpha", "beta"}
            assert (await chat("beta")).headers["x-gpubroker-backend"] == "b"
            write(path, [generic("b", b, 21002, models=["beta"])], apiPort=21100)
            assert (await reload(ep))["changes"]["removed"] == ["a"]
            assert await models() == {"beta"}
            assert (await chat("alpha")).status_code == 404  # model_not_found, not a dead port


async def test_models_found_while_running_follow_their_backends_new_settings(
    tmp_path: Path,
) -> None:
    gpu = SimGPU(24 * GiB)
    emu = OllamaEmulator(gpu, {"small:latest": 2 * GiB})
    top = {"policy": "budget", "gpus": [{"id": 0, "memory": "24GiB"}]}
    async with running(emu.app) as o:

        def ollama(**extra: Any) -> list[dict[str, Any]]:
            entry = {"name": "ollama", "proxyPort": 21001, "upstream": o, **extra}
            return [{**entry, "unloadStrategy": "ollama"}]

        path = write(tmp_path / "gpubroker.yaml", ollama(), **top)
        async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
            assert ep.broker is not None
            body = {"model": "small:latest", "prompt": "hi", "stream": False}
            response = await client.post(ep.proxies["ollama"] + "/api/generate", json=body)
            assert response.status_code == 200
            unit = "ollama/small:latest"
            assert unit in ep.broker.sched.slots  # found on first use, not in the file
            write(path, ollama(priority=5, maxConcurrency=3), **top)
            assert (await reload(ep))["ok"]
            spec = ep.broker.sched.slots[unit].spec
            assert (spec.priority, spec.max_concurrency) == (5, 3)


async def test_a_port_handed_from_a_removed_backend_to_a_new_one_stays_open(
    tmp_path: Path,
) -> None:
    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, token_interval=0.02, owner="a")
    c_emu = GenericEmulator(gpu, 2 * GiB, owner="c")
    async with running(a_emu.app) as a, running(c_emu.app) as c:
        path = write(tmp_path / "gpubroker.yaml", [generic("a", a, 21001)])
        async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
            url = ep.proxies["a"]
            async with anyio.create_task_group() as tg:
                got: list[list[str]] = []

                async def stream() -> None:
                    got.append(await sse(client, url, 100))

                tg.start_soon(stream)
                await until(lambda: a_emu.inflight > 0)
                write(path, [generic("c", c, 21001)])
                answer = await reload(ep)
                assert answer["changes"]["added"] == ["c"]
                assert answer["changes"]["removed"] == ["a"]
                assert ep.proxies["c"] == url and a_emu.inflight == 1
                response = await client.post(url + "/generate", json={"tokens": 1})
                assert response.status_code == 200 and c_emu.loaded  # c's now
                assert "evicted=a" in response.headers["x-gpubroker-swap"]  # once a's ended
                assert a_emu.unload_with_inflight == 0
            assert complete(got[0], 100)
            assert ep.broker is not None
            await until(lambda: "a" not in ep.broker.sched.slots)
            assert not refused(url)


async def test_a_changed_detach_restarts_the_worker_tied_or_detached_as_asked(
    tmp_path: Path,
) -> None:
    port = free_port()

    def worker(**extra: Any) -> dict[str, Any]:
        return managed(free_port(), port, **extra)

    spec = worker()
    path = write(tmp_path / "gpubroker.yaml", [spec], stateDir=str(tmp_path / "state"))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
        assert ep.broker is not None and ep.broker.supervisor is not None
        sup = ep.broker.supervisor
        url = ep.proxies["w"] + "/v1/chat/completions"
        assert (await client.post(url, json=chat)).status_code == 200
        first = sup.workers["w"].pid
        assert first is not None and sup.workers["w"].tied
        write(path, [{**spec, "detach": True}], stateDir=str(tmp_path / "state"))
        assert (await reload(ep))["changes"]["changed"] == {"w": ["detach"]}
        await until(lambda: sup.workers["w"].pid not in (None, first), limit=20)
        await until(lambda: sup.workers["w"].state.value == "ready", limit=20)
        second = sup.workers["w"].pid
        assert not alive(first) and not sup.workers["w"].tied
        assert sup.records["w"].detach and sup.records["w"].pid == second
        assert (await client.post(url, json=chat)).status_code == 200
        write(path, [spec], stateDir=str(tmp_path / "state"))
        assert (await reload(ep))["changes"]["changed"] == {"w": ["detach"]}
        await until(lambda: sup.workers["w"].pid not in (None, second), limit=20)
        await until(lambda: sup.workers["w"].state.value == "ready", limit=20)
        assert second is not None and not alive(second) and sup.workers["w"].tied


@pytest.mark.parametrize("when", ["ready", "starting"])
async def test_a_managed_worker_moved_to_another_port_is_served_where_it_listens(
    tmp_path: Path, when: str
) -> None:
    """A reload that changes a running (or starting) worker's ``upstream`` (its port) while a
    request is in flight: that request and those that come meanwhile reach the worker where it
    listens (the old port, until its restart on the new one), never a refused connection (502)
    at a port nothing opened, nor a start that waits for health where nothing will answer."""
    old, new = free_port(), free_port()

    def worker(at: int) -> dict[str, Any]:
        return managed(21011, at, "--tokens", "60", "--start-delay", "0.5")

    path = write(tmp_path / "gpubroker.yaml", [worker(old)])
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
        assert ep.broker is not None and ep.broker.supervisor is not None
        sup = ep.broker.supervisor
        url = ep.proxies["w"] + "/v1/chat/completions"
        codes: list[int] = []

        async def ask() -> None:
            codes.append((await client.post(url, json=chat)).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await until(lambda: sup.workers["w"].state.value == when and not ep.broker.idle("w"))
            first = sup.workers["w"].pid
            write(path, [worker(new)])
            assert (await reload(ep))["changes"]["changed"] == {"w": ["upstream"]}
            await ask()  # while the first is still in flight: the worker listens on `old`
        assert codes == [200, 200]
        await until(lambda: sup.workers["w"].pid not in (None, first), limit=20)
        await until(lambda: sup.workers["w"].state.value == "ready", limit=20)
        assert sup.workers["w"].port == new
        assert (await client.post(url, json=chat)).status_code == 200


async def test_a_move_taken_back_before_the_worker_was_idle_leaves_it_where_it_runs(
    tmp_path: Path,
) -> None:
    old, new = free_port(), free_port()

    def worker(at: int) -> dict[str, Any]:
        return managed(21012, at, "--tokens", "60")

    path = write(tmp_path / "gpubroker.yaml", [worker(old)])
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    async with serving(path) as ep, httpx.AsyncClient(timeout=30) as client:
        assert ep.broker is not None and ep.broker.supervisor is not None
        sup = ep.broker.supervisor
        url = ep.proxies["w"] + "/v1/chat/completions"
        codes: list[int] = []

        async def ask() -> None:
            codes.append((await client.post(url, json=chat)).status_code)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await until(lambda: sup.workers["w"].state.value == "ready" and not ep.broker.idle("w"))
            first = sup.workers["w"].pid
            write(path, [worker(new)])
            assert (await reload(ep))["changes"]["changed"] == {"w": ["upstream"]}
            write(path, [worker(old)])
            assert (await reload(ep))["ok"]  # taken back while the request still runs
        assert codes == [200]
        await anyio.sleep(0.5)  # the idle restart that no longer has a reason
        assert sup.workers["w"].pid == first and sup.workers["w"].port == old
        assert (await client.post(url, json=chat)).status_code == 200


async def test_two_reloads_at_once_end_on_the_file_as_last_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload whose read of the file was slow (SIGHUP and --watch-config together, a second
    `gpubroker reload`) never applies its older content over a newer one applied meanwhile."""
    import time

    from gpubroker.runtime import reload as reload_module

    gpu = SimGPU(24 * GiB)
    a_emu = GenericEmulator(gpu, 2 * GiB, owner="a")
    async with running(a_emu.app) as a:
        port = free_port()
        path = write(tmp_path / "gpubroker.yaml", [generic("a", a, port, priority=1)])
        real = reload_module.load_config_file
        calls: list[int] = []

        def load(p: Path) -> Any:
            calls.append(1)
            config = real(p)
            if len(calls) == 1:
                time.sleep(0.5)  # the first read is slow (in its thread)
            return config

        monkeypatch.setattr(reload_module, "load_config_file", load)
        async with serving(path) as ep:
            assert ep.broker is not None
            write(path, [generic("a", a, port, priority=2)])
            async with anyio.create_task_group() as tg:
                tg.start_soon(reload, ep)  # reads priority 2, slowly
                await until(lambda: bool(calls))
                write(path, [generic("a", a, port, priority=3)])
                tg.start_soon(reload, ep)  # reads priority 3 after it
            assert ep.broker.config.backend("a").priority == 3
