"""Applying a changed config to a running broker (``gpubroker reload``, SIGHUP,
``serve --watch-config``), without dropping a connection.

One reload at a time. Everything that can fail is done first, changing nothing: the file is
read and validated as ``serve --check`` does (its error, with file, line and column, is the
answer), the plugin names are checked, the new strategies and a throwaway scheduler are built
from the new config (pure), and new proxy ports are bound. Then, in one synchronous step (no
other task runs in between, so every reader sees the old config or the new one, never half):

- backends added: a managed worker, scheduler units (may hold VRAM until their strategy says
  otherwise, asked at once), a proxy on a new port; the api port's catalogue is rebuilt;
- backends changed: units respecified for the next decisions (sizes, priorities, limits,
  rules), a new strategy where the backend's service or its handling changed, a new proxy app
  swapped in behind its port (requests in flight finish in the one they entered), a managed
  worker whose command changed restarted once its backend is idle (one whose ``upstream``
  changed while it runs is still reached where it listens until then: :meth:`_hold_moves`);
- backends removed: refused from now on (503 ``backend_removed``, Retry-After: queued ones
  too), their port closed once their in-flight responses end (up to ``shutdownGrace``), then
  unloaded as ``gpubroker unload`` would, their worker stopped and everything of them forgot;
- the timings (``queueTimeout``, ``holdTime``...) retuned.

Keys that cannot change live (:mod:`gpubroker.config.diff`) keep their running value and are
reported as needing a restart. A ``config_reloaded`` event says what changed; a reload that
fails raises a ``config_reload_failed`` warning (cleared by the next one that succeeds).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import httpx

from gpubroker import events as ev
from gpubroker.api.catalogue import Catalogue
from gpubroker.config.diff import ConfigDiff, applicable, diff
from gpubroker.config.load import load_config_file
from gpubroker.config.model import BackendConfig, Config
from gpubroker.errors import ConfigError, GPUBrokerError, WorkerError
from gpubroker.events import EventBus
from gpubroker.observe.guard import HostPolicy, ListenerGuard
from gpubroker.observe.health import HealthProbe
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.worker_routes import preload
from gpubroker.plugins.manager import Plugins, check_config_names
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.proxy.app import ProxyApp
from gpubroker.proxy.listener import Listener
from gpubroker.proxy.upstream import Upstream
from gpubroker.runtime.build import bind, build_api, make_classifier, make_strategy, proxy_view, url
from gpubroker.runtime.ports import Door, Ports
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler
from gpubroker.scheduling.footprints import FootprintBook
from gpubroker.scheduling.scheduler import Scheduler
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.workers.supervisor import Supervisor, WorkerState

log = logging.getLogger("gpubroker.runtime.reload")

POLL = 0.05  # seconds between looks at whether a backend went idle
FAILED = "config_reload_failed"
# Backend keys that only the scheduler or the proxy read: a change keeps the strategy.
KEEPS_STRATEGY = frozenset(
    {
        "vram",
        "priority",
        "pinned",
        "exclusiveWith",
        "maxConcurrency",
        "idleTimeout",
        "progress",
        "hostHeader",
        "upstreamIdleTimeout",
        "classifier",
        "gpuPaths",
    }
)


@dataclass(slots=True)
class ApiParts:
    """The api port as a reload rebuilds it: its door, its guard's policy, the client its
    catalogue reads model lists with (kept), and the scope the catalogue runs in."""

    door: Door
    policy: HostPolicy
    client: httpx.AsyncClient
    scope: anyio.CancelScope | None = None


@dataclass(slots=True)
class Parts:
    """What ``run_broker`` built, that a reload changes."""

    plugins: Plugins
    bus: EventBus
    broker: Broker
    supervisor: Supervisor
    monitor: Monitor
    health: HealthProbe
    book: FootprintBook
    ports: Ports
    snapshot: TelemetrySnapshot | None  # the first sample: GPU names and sizes
    memory_of: Callable[[BackendConfig], int | None]
    make_upstream: Callable[[BackendConfig, Config], Upstream]
    proxies: dict[str, ProxyApp]
    upstreams: dict[str, Upstream]
    urls: dict[str, str]  # Endpoints.proxies
    host: str
    ephemeral: bool
    api: ApiParts | None = None


class Reloader:
    """Applies a re-read config to the running broker (see the module docstring)."""

    def __init__(self, config: Config, parts: Parts, tg: anyio.abc.TaskGroup) -> None:
        self.config = config  # the running config, backends being removed aside
        self.parts = parts
        self._tg = tg
        self._lock = anyio.Lock()
        self._reading = anyio.Lock()  # one reload_file at a time, from its read of the file on
        self._leaving: dict[str, BackendConfig] = {}  # removed, still draining
        self._restarts: dict[str, anyio.CancelScope] = {}
        self._moves: dict[str, BackendConfig] = {}  # workers to move to a new upstream (_move)
        self._retired: list[httpx.AsyncClient | Upstream] = []  # closed when idle, or at stop
        self._failing = False  # the last reload failed: its warning stands

    # --- entry points ---------------------------------------------------------------------

    async def reload_file(self) -> dict[str, Any]:
        """Read the file the broker was started with again and apply it; the answer for
        ``POST /api/reload`` (``ok``, ``summary``, ``changes``; or ``error``)."""
        source = self.config.source
        try:
            if source is None or source == "environment":
                raise ConfigError(
                    f"this broker was not started from a config file ({source or 'defaults'}): "
                    "nothing to reload"
                )
            async with self._reading:  # read and applied in turn: never an older read last
                new = await anyio.to_thread.run_sync(load_config_file, Path(source))
                if not new.backends:
                    raise new.error("backends", "no backends to serve: add at least one")
                changes = await self.apply(new)
        except GPUBrokerError as exc:
            self._failed(str(exc))
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must not take the broker down with the reload
            log.exception("config reload failed unexpectedly")
            self._failed(f"{type(exc).__name__}: {exc}")
            return {"ok": False, "error": f"the reload failed: {type(exc).__name__}: {exc}"}
        return {"ok": True, "summary": changes.summary(), "changes": changes.to_json()}

    async def apply(self, new: Config, *, keep_moves: bool = False) -> ConfigDiff:
        """Apply ``new`` (validated already); raises a located ConfigError (or PluginError),
        having changed nothing, when it cannot be. ``keep_moves``: ``new`` is the running
        config with one worker moved (:meth:`_move`): the other moves still wait."""
        async with self._lock:
            changes = await self._apply(new, keep_moves)
        log.info("config reloaded from %s: %s", new.source, changes.summary())
        self.parts.bus.publish(
            ev.ConfigReloaded(
                backend=None,
                added=changes.added,
                removed=changes.removed,
                changed=tuple(changes.changed),
                restart=changes.restart,
                summary=changes.summary(),
            )
        )
        if self._failing:
            self._failing = False
            self.parts.bus.publish(
                ev.WarningCleared(backend=None, code=FAILED, subject=str(new.source))
            )
        return changes

    def _failed(self, error: str) -> None:
        log.warning("config reload failed, nothing changed: %s", error)
        self._failing = True
        subject = str(self.config.source)
        message = f"config reload failed, nothing changed: {error}"
        self.parts.bus.publish(
            ev.WarningRaised(backend=None, code=FAILED, subject=subject, message=message)
        )

    @property
    def running(self) -> Config:
        """What the parts see: the config, with the backends still draining after it."""
        extra = tuple(self._leaving.values())
        return replace(self.config, backends=self.config.backends + extra) if extra else self.config

    # --- one reload -----------------------------------------------------------------------

    async def _apply(self, new: Config, keep_moves: bool = False) -> ConfigDiff:
        p = self.parts
        check_config_names(new, p.plugins)
        target = applicable(self.config, new)
        changes = diff(self.config, new)  # what needs a restart is kept out of target
        if changes.empty:
            if not keep_moves:
                self._moves.clear()  # the file is what runs: a move still waiting is moot
            return changes
        target, moving = self._hold_moves(target, changes)
        index = {b.name: i for i, b in enumerate(target.backends)}
        news = {b.name: b for b in target.backends}
        for name in changes.added:
            if name in self._leaving:
                raise target.error(
                    f"backends[{index[name]}].name",
                    f"{name} is still being removed by an earlier reload; reload again once "
                    "it is gone",
                )
        fresh: dict[str, Strategy] = {}
        bound: dict[int, Listener] = {}
        try:
            for b in target.backends:
                keys = set(changes.changed.get(b.name, ()))
                renew = b.name in changes.added or bool(keys - KEEPS_STRATEGY)
                if renew or "unloadTimeout" in changes.top:
                    fresh[b.name] = make_strategy(
                        b, target, p.plugins, p.supervisor, p.memory_of(b)
                    )
            strategies = {n: fresh.get(n) or p.broker.strategies[n] for n in news}
            plan = build_scheduler(target, strategies, p.snapshot, book=p.book)
            for unit, slot in plan.slots.items():
                unknown = [g for g in slot.spec.gpus if g not in p.broker.sched.capacity]
                if unknown:
                    backend = slot.spec.backend
                    raise target.error(
                        f"backends[{index[backend]}].gpu",
                        f"GPU {', '.join(unknown)} was not planned for when the broker "
                        f"started; restart it to serve {unit} there",
                    )
            for b in target.backends:
                if b.proxy_port not in p.ports and b.proxy_port not in bound:
                    try:
                        port = 0 if p.ephemeral else b.proxy_port
                        bound[b.proxy_port] = bind(p.host, port, b.name)
                    except ConfigError as exc:
                        raise target.error(
                            f"backends[{index[b.name]}].proxyPort", exc.message
                        ) from None
        except BaseException:
            for listener in bound.values():
                listener.sock.close()
            with anyio.CancelScope(shield=True):
                for strategy in fresh.values():
                    await strategy.client.aclose()
            raise
        self._switch(target, changes, fresh, plan, bound)
        for name in [n for n in self._moves if n not in moving and not keep_moves]:
            del self._moves[name]  # moved back (or removed) by this reload: nothing to move
        for name, b in moving.items():  # after _switch: it replaces a restart pending
            self._moves[name] = b
            self._later(name, self._move(name))
        return changes

    def _hold_moves(
        self, target: Config, changes: ConfigDiff
    ) -> tuple[Config, dict[str, BackendConfig]]:
        """A managed worker whose ``upstream`` changed while its process runs (or starts)
        listens where it was started until it restarts: ``target`` keeps its old upstream for
        now (the proxy, strategy, health checks and catalogue reach it there), and the new
        one, returned by name, is applied by :meth:`_move` once the backend is idle."""
        sup, olds = self.parts.supervisor, {b.name: b for b in self.config.backends}
        moving: dict[str, BackendConfig] = {}
        held = []
        for b in target.backends:
            old = olds.get(b.name)
            if (
                old is not None
                and old.upstream != b.upstream
                and b.command is not None
                and sup.manages(b.name)
                and sup.worker(b.name).pid is not None
            ):
                moving[b.name] = b
                b = replace(b, upstream=old.upstream)
            held.append(b)
        if not moving:
            return target, moving
        return replace(target, backends=tuple(held)), moving

    async def _move(self, name: str) -> None:
        """Once ``name`` is idle: stop its worker, then apply its new ``upstream`` (a reload
        of the running config with that one change: a new proxy upstream, strategy and
        health checks), and start it there if it was running."""
        p = self.parts
        await self._until_idle(name)
        b = self._moves.pop(name, None)
        if b is None:  # a later reload took the move back
            return
        state = p.supervisor.worker(name).state
        await p.broker.forget(name)  # unloaded: the process strategy stops the worker
        await p.supervisor.stop(name)
        backends = tuple(b if x.name == name else x for x in self.config.backends)
        await self.apply(replace(self.config, backends=backends), keep_moves=True)
        if state in (WorkerState.READY, WorkerState.STARTING) and p.supervisor.manages(name):
            log.info("%s: restarting where its new upstream listens", name)
            try:
                await preload(p.broker, p.supervisor, name)
            except (WorkerError, GPUBrokerError) as exc:
                log.warning("%s: restart on its new upstream failed: %s", name, exc)

    def _switch(
        self,
        target: Config,
        changes: ConfigDiff,
        fresh: dict[str, Strategy],
        plan: Scheduler,
        bound: dict[int, Listener],
    ) -> None:
        """Everything a reload changes, at once (no await: no reader sees half of it)."""
        p = self.parts
        olds = {b.name: b for b in self.config.backends}
        news = {b.name: b for b in target.backends}
        for name in changes.removed:
            self._leaving[name] = olds[name]
        self.config = target
        running = self.running
        replaced = {n: p.broker.strategies[n] for n in fresh if n in p.broker.strategies}
        strategies = {**p.broker.strategies, **fresh}
        p.broker.reconfigure(running, strategies, plan)
        p.monitor.reconfigure(running)
        p.health.reconfigure(running)
        for name, strategy in replaced.items():
            self._retire_client(name, strategy.client)
        # managed workers
        sup = p.supervisor
        for name in changes.added:
            if news[name].command is not None:
                sup.add(news[name])
        for name in changes.changed:
            b = news[name]
            if b.command is not None and not sup.manages(name):
                sup.add(b)
            elif sup.manages(name) and b.command is None:
                self._later(name, self._restart(name, start=False))
            elif sup.manages(name) and sup.respec(name, b):
                self._later(name, self._restart(name, start=True))
        # proxies: new upstream timeouts make every backend a new upstream client
        timeouts = {"upstreamTimeout", "upstreamIdleTimeout"} & set(changes.top)
        for b in target.backends:
            if b.name in changes.added or b.name in changes.changed or timeouts:
                old = olds.get(b.name)
                self._proxy(b, old, target, strategies[b.name], bound, bool(timeouts))
        for name in changes.removed:
            pending = self._restarts.pop(name, None)  # a restart it was waiting for: moot
            if pending is not None:
                pending.cancel()
            p.broker.draining(name)
            self._tg.start_soon(self._guard, name, self._remove(olds[name]))
        for name in changes.added:
            self._tg.start_soon(self._guard, name, p.broker.welcome(name))
        if p.api is not None:
            self._rebuild_api()

    def _proxy(
        self,
        b: BackendConfig,
        old: BackendConfig | None,
        config: Config,
        strategy: Strategy,
        bound: dict[int, Listener],
        renew: bool = False,
    ) -> None:
        """``b``'s proxy app, behind its port's door (a new port, or the app swapped in)."""
        p = self.parts
        upstream = p.upstreams.get(b.name)
        moved = old is not None and (
            old.upstream != b.upstream or old.upstream_idle_timeout != b.upstream_idle_timeout
        )
        previous = p.proxies.get(b.name)
        if upstream is None or moved or renew:
            if upstream is not None and old is not None:  # once the app using it is done
                door = p.ports.door(old.proxy_port) if old.proxy_port in p.ports else None
                self._retire_client(b.name, upstream, door, previous)
            upstream = p.upstreams[b.name] = p.make_upstream(b, config)
        app = ProxyApp(proxy_view(b, strategy), make_classifier(b, p.plugins), p.broker, upstream)
        p.proxies[b.name] = app
        if b.proxy_port in p.ports:  # its own port, or one a removed backend leaves to it
            door = p.ports.door(b.proxy_port)
            door.swap(app, b.name)
            p.urls[b.name] = url(p.host, p.ports.listener(b.proxy_port).port)
        else:
            listener = bound[b.proxy_port]
            p.ports.open(b.proxy_port, listener, Door(app, b.name))
            p.urls[b.name] = url(p.host, listener.port)
        if old is not None and old.proxy_port != b.proxy_port and previous is not None:
            grace = self.config.shutdown_grace
            self._tg.start_soon(self._guard, b.name, p.ports.close(old.proxy_port, previous, grace))

    def _rebuild_api(self) -> None:
        """The api port's app and catalogue for the backends now served (the catalogue reads
        their model lists afresh)."""
        p, api = self.parts, self.parts.api
        assert api is not None
        proxies = {b.name: p.proxies[b.name] for b in self.config.backends}
        strategies = {n: p.broker.strategies[n] for n in proxies}
        app, catalogue, _ = build_api(self.config, proxies, p.broker.sched, strategies, api.client)
        api.door.swap(ListenerGuard(app, api.policy))
        self.run_catalogue(catalogue)

    def run_catalogue(self, catalogue: Catalogue) -> None:
        """Run ``catalogue`` (the one before it stops)."""
        api = self.parts.api
        assert api is not None
        if api.scope is not None:
            api.scope.cancel()
        scope = api.scope = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await catalogue.run()

        self._tg.start_soon(run)

    # --- what runs after a reload, in the background ----------------------------------------

    async def _guard(self, name: str, work: Any) -> None:
        """Run ``work`` (a coroutine about backend ``name``); a failure is logged, never
        taken out on the broker."""
        try:
            await work
        except Exception:
            log.exception("%s: finishing the reload failed", name)

    def _later(self, name: str, work: Any) -> None:
        """``work`` for ``name``'s worker, in place of any still pending from a reload before."""
        old = self._restarts.pop(name, None)
        if old is not None:
            old.cancel()
        scope = self._restarts[name] = anyio.CancelScope()

        async def run() -> None:
            with scope:
                await self._guard(name, work)
            if self._restarts.get(name) is scope:
                del self._restarts[name]

        self._tg.start_soon(run)

    async def _until_idle(self, name: str) -> None:
        while not self.parts.broker.idle(name):
            await anyio.sleep(POLL)

    async def _restart(self, name: str, *, start: bool) -> None:
        """Once ``name`` is idle, stop its worker (through the scheduler, which frees it) and,
        with ``start``, start it again on its new command; else forget it (no ``command:``)."""
        p = self.parts
        await self._until_idle(name)
        state = p.supervisor.worker(name).state
        await p.broker.forget(name)  # unloaded: the process strategy stops the worker
        await p.supervisor.stop(name)  # and when the scheduler did not count it resident
        if not start:
            await p.supervisor.retire(name)
            return
        p.supervisor.respec(name, self.config.backend(name))  # where it listens, now stopped
        if state in (WorkerState.READY, WorkerState.STARTING):
            log.info("%s: restarting on its new command", name)
            try:
                await preload(p.broker, p.supervisor, name)
            except (WorkerError, GPUBrokerError) as exc:
                log.warning("%s: restart on its new command failed: %s", name, exc)

    async def _remove(self, old: BackendConfig) -> None:
        """A removed backend: its port closes once its in-flight responses end (within
        ``shutdownGrace``), it is unloaded, its worker stopped, and it is forgotten."""
        p, name = self.parts, old.name
        grace = self.config.shutdown_grace
        app = p.proxies.get(name)
        if app is not None and old.proxy_port in p.ports:
            await p.ports.close(old.proxy_port, app, grace)
        with anyio.move_on_after(grace):  # what the service still runs for it (ComfyUI jobs)
            await self._until_idle(name)
        await p.broker.forget(name)  # unloaded: the broker plans with nothing it cannot see
        if p.supervisor.manages(name):
            await p.supervisor.retire(name)
        await self._until_idle(name)  # nothing new comes: what is left ends by itself
        p.broker.remove(name)
        del self._leaving[name]
        if p.proxies.get(name) is app:
            del p.proxies[name]
        p.urls.pop(name, None)
        strategy = p.broker.strategies.get(name)
        running = self.running
        p.broker.reconfigure(running, {n: s for n, s in p.broker.strategies.items() if n != name})
        p.monitor.reconfigure(running)
        p.health.reconfigure(running)
        upstream = p.upstreams.pop(name, None)
        with anyio.CancelScope(shield=True):
            if upstream is not None:
                await upstream.aclose()
            if strategy is not None:
                await strategy.client.aclose()
        log.info("%s: removed (drained, unloaded, port closed)", name)

    def _retire_client(
        self,
        name: str,
        client: httpx.AsyncClient | Upstream,
        door: Door | None = None,
        app: Any = None,
    ) -> None:
        """A client a reload replaced: closed once its backend is idle and no request that
        entered ``app`` (behind ``door``) is in flight, or as the broker stops, so nothing it
        still serves is cut."""
        self._retired.append(client)

        async def close() -> None:
            if door is not None and app is not None:
                await door.drained(app)
            await self._until_idle_or_gone(name)
            if client in self._retired:
                self._retired.remove(client)
                with anyio.CancelScope(shield=True):
                    await client.aclose()

        self._tg.start_soon(self._guard, name, close())

    async def _until_idle_or_gone(self, name: str) -> None:
        broker = self.parts.broker
        while name in broker.sched.slots and not broker.idle(name):
            await anyio.sleep(POLL)
        await anyio.sleep(POLL)  # a response ending now leaves its app first

    async def aclose(self) -> None:
        """The broker stopped: close what a reload replaced and nobody closed yet."""
        retired, self._retired = self._retired, []
        with anyio.CancelScope(shield=True):
            for client in retired:
                await client.aclose()
