"""The composition root: the one place that builds and wires, then serves every port from one
event loop, with a graceful stop.

Everything is passed in through constructors; nothing is assigned onto another object after it
is built (a reload changes the parts through their own methods: ``reconfigure``, ``respec``,
``Door.swap``...). News travels up the :class:`~gpubroker.events.EventBus`, calls go down::

    sampler    = Sampler(telemetry source)
    bus        = EventBus()
    supervisor = Supervisor(config, bus, telemetry=sampler.latest)     publishes worker_*,
                                                                        WorkerGone
    strategies = {backend: Strategy(StrategyContext(.., supervisor))}
    book       = FootprintBook(state dir), loaded                      learned footprints
    sched      = build_scheduler(config, strategies, first sample,     pure, no I/O
                                 book)
    health     = HealthProbe(config, supervisor)                       .results, read-only
    monitor    = Monitor(config, sched (read-only), sampler, bus,      publishes Measured,
                         health.results, roots=supervisor.roots)        Unmanaged, warning,
                                                                        warning_cleared
    broker     = Broker(config, strategies, sched, bus, supervisor,    publishes lease/swap events;
                        confirm_freed=monitor | None, book)             applies Measured, Unmanaged,
                                                                        WorkerGone
    proxies    = {backend: ProxyApp(.., broker, Upstream)}
    status     = StatusApp(broker, bus, monitor, health, reload)       Metrics(bus), /events(bus)
    catalogue  = Catalogue(backends, residency=sched (read-only))      only with apiPort
    api        = ApiApp(proxies, catalogue, ApiKeys,                   hands requests to proxies
                        Occupancy(sched (read-only)))                  residency in /v1/models
    reloader   = Reloader(config, parts)                               applies a re-read config

Subscribers of the bus: the broker (Measured, Unmanaged, WorkerGone), the monitor's alerts (freed),
metrics (admitted, first_byte, swapped, unload_failed, refused) and each ``/events`` reader.

Every port is served behind a :class:`~gpubroker.runtime.ports.Door`, so a reload
(:mod:`~gpubroker.runtime.reload`, ``Endpoints.reload``) can swap a backend's app, open a port
for a backend added and close one removed, without dropping a connection.

Order of shutdown, decided here rather than by Hypercorn's own signal handlers: stop accepting,
let in-flight responses finish (up to ``shutdownGrace``), then stop the broker's tasks and close
the upstream clients.

The package: ``build`` (the factories), ``ports`` (the listening ports and their doors),
``reload`` (a changed config applied live); this module wires them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio

from gpubroker.config.load import state_path
from gpubroker.config.model import BackendConfig, Config
from gpubroker.events import EventBus
from gpubroker.observe.guard import HostPolicy, ListenerGuard
from gpubroker.observe.health import HealthProbe
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.status import StatusApp
from gpubroker.plugins.manager import Plugins, check_config_names, choose_source
from gpubroker.proxy.app import ProxyApp
from gpubroker.proxy.listener import Listener, serve
from gpubroker.proxy.upstream import Upstream
from gpubroker.runtime.build import (
    bind,
    build_api,
    make_classifier,
    make_strategy,
    proxy_view,
    url,
)
from gpubroker.runtime.ports import Door, Ports
from gpubroker.runtime.reload import ApiParts, Parts, Reloader
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler, capacities
from gpubroker.scheduling.footprints import FootprintBook
from gpubroker.statefile import StateFile
from gpubroker.telemetry.gpus import backend_gpus
from gpubroker.telemetry.sampler import Sampler
from gpubroker.workers.supervisor import Supervisor

__all__ = ["Endpoints", "make_classifier", "make_strategy", "proxy_view", "run_broker"]

log = logging.getLogger("gpubroker.runtime")


@dataclass(slots=True)
class Endpoints:
    """Where a running broker listens (ports may be ephemeral in tests and the demo)."""

    status_url: str
    proxies: dict[str, str] = field(default_factory=dict)  # kept current by reloads
    broker: Broker | None = None
    monitor: Monitor | None = None
    bus: EventBus | None = None  # every event, typed (``events.on_wire`` gives the SSE form)
    api_url: str | None = None  # the one endpoint for every model (``apiPort``), if set
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None
    """Read the config file again and apply it (``POST /api/reload``'s answer)."""


def make_upstream(backend: BackendConfig, config: Config) -> Upstream:
    """The proxy's HTTP client for ``backend`` (``Upstream`` is looked up here at each call:
    ``bench/proxy.py`` swaps it for its A/B runs)."""
    idle = config.upstream_idle_timeout
    return Upstream(
        backend.upstream,
        response_timeout=config.upstream_timeout,
        idle_timeout=idle
        if backend.upstream_idle_timeout is None
        else backend.upstream_idle_timeout,
    )


async def run_broker(
    config: Config,
    plugins: Plugins,
    shutdown: anyio.Event,
    *,
    ephemeral_ports: bool = False,
    task_status: anyio.abc.TaskStatus[Endpoints] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown`` is set, then drain and return.

    With ``ephemeral_ports`` every port is chosen by the OS (tests, ``gpubroker demo``).
    """
    check_config_names(config, plugins)
    source, notice = await choose_source(config, plugins)
    if notice:
        log.warning("telemetry: %s; the broker runs on declared VRAM sizes", notice)
    sampler = Sampler(source, notice=notice)
    first = await sampler.sample()  # bounded; GPU sizes and UUIDs for the scheduler's domains

    bus = EventBus()
    state = StateFile.in_dir(state_path(config, os.environ))  # what a restart must not forget
    await state.load()  # a corrupt file is ignored, logged
    # the monitor's samples: the supervisor never reads the GPUs itself
    supervisor = Supervisor(config, bus=bus, telemetry=lambda: sampler.latest, state=state)
    seen = first if first.gpus else None
    caps = capacities(config, seen, less_reserve=False)  # what a service itself sees

    def memory_of(b: BackendConfig) -> int | None:
        sizes = [caps.get(g) for g in backend_gpus(b, seen)]
        return sum(n for n in sizes if n is not None) if all(sizes) and sizes else None

    strategies = {
        b.name: make_strategy(b, config, plugins, supervisor, memory_of(b)) for b in config.backends
    }
    book = FootprintBook.for_config(config, os.environ)
    await book.load()  # footprints learned on earlier runs: a corrupt file is ignored, logged
    sched = build_scheduler(config, strategies, seen, book=book)
    unknown = [g for g, cap in sched.capacity.items() if cap is None]
    if config.policy == "budget" and unknown:
        log.warning(
            "policy budget: no capacity known for GPU %s (no telemetry reading and no `gpus:` "
            "memory declared); backends there take turns as under exclusive",
            ", ".join(unknown),
        )
    health = HealthProbe(config, supervisor)
    monitor = Monitor(config, sched, sampler, bus, health=health.results, roots=supervisor.roots)
    broker = Broker(
        config,
        strategies,
        sched,
        bus,
        supervisor=supervisor,
        confirm_freed=monitor if sampler.source.name != "none" else None,
        footprints=book,
        state=state,
    )
    upstreams = {b.name: make_upstream(b, config) for b in config.backends}
    proxies = {
        b.name: ProxyApp(
            proxy_view(b, strategies[b.name]),
            make_classifier(b, plugins),
            broker,
            upstreams[b.name],
        )
        for b in config.backends
    }
    reloader: Reloader | None = None  # made once the ports serve (it opens and closes them)

    async def reload_file() -> dict[str, Any]:
        assert reloader is not None  # POST /api/reload is served only once the ports are
        return await reloader.reload_file()

    status = StatusApp(broker, bus, monitor, health, reload=reload_file)
    api = None
    if config.api_port is not None:
        api = build_api(config, dict(proxies), sched, strategies)
    host = config.bind
    listeners: dict[Any, Listener] = {}
    try:
        listeners["status"] = bind(host, 0 if ephemeral_ports else config.status_port, "statusPort")
        for b in config.backends:
            listeners[b.proxy_port] = bind(host, 0 if ephemeral_ports else b.proxy_port, b.name)
        if api is not None and config.api_port is not None:
            listeners["api"] = bind(host, 0 if ephemeral_ports else config.api_port, "apiPort")
        api_url = url(host, listeners["api"].port) if api is not None else None
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)  # leftovers adopted or stopped before reconciling
            await tg.start(broker.run)
            tg.start_soon(broker.preload_all, config.preload)  # made resident before requests
            stopped = anyio.Event()
            server = partial(
                serve,
                graceful_timeout=config.shutdown_grace,
                header_timeout=config.header_timeout,
                client_idle_timeout=config.client_idle_timeout,
                server=config.server,
            )

            async def serve_all(*, task_status: anyio.abc.TaskStatus[Ports]) -> None:
                async with anyio.create_task_group() as servers:
                    ports = Ports(servers, server)
                    for key in list(listeners):
                        listener = listeners.pop(key)
                        if key == "status":
                            ports.open(key, listener, Door(status.app), own_headers=True)
                        elif key == "api":
                            assert api is not None  # our own listener: pages kept out as on
                            guard = ListenerGuard(
                                api[0], HostPolicy(config.bind, config.allowed_hosts)
                            )
                            ports.open(key, listener, Door(guard))
                        else:
                            b = next(b for b in config.backends if b.proxy_port == key)
                            ports.open(key, listener, Door(proxies[b.name], b.name))
                    task_status.started(ports)
                stopped.set()

            urls = {b.name: url(host, listeners[b.proxy_port].port) for b in config.backends}
            status_url = url(host, listeners["status"].port)
            ports = await tg.start(serve_all)
            api_parts = None
            if api is not None:
                policy = HostPolicy(config.bind, config.allowed_hosts)
                api_parts = ApiParts(ports.door("api"), policy, api[2])
            parts = Parts(
                plugins=plugins,
                bus=bus,
                broker=broker,
                supervisor=supervisor,
                monitor=monitor,
                health=health,
                book=book,
                ports=ports,
                snapshot=seen,
                memory_of=memory_of,
                make_upstream=make_upstream,
                proxies=proxies,
                upstreams=upstreams,
                urls=urls,
                host=host,
                ephemeral=ephemeral_ports,
                api=api_parts,
            )
            reloader = Reloader(config, parts, tg)
            endpoints = Endpoints(
                status_url=status_url,
                proxies=urls,
                broker=broker,
                monitor=monitor,
                bus=bus,
                api_url=api_url,
                reload=reload_file,
            )

            async def refuse_when_stopping() -> None:
                await shutdown.wait()
                broker.close()
                ports.stop_all()

            tg.start_soon(refuse_when_stopping)
            tg.start_soon(monitor.run)
            tg.start_soon(health.run)
            if api is not None:
                reloader.run_catalogue(api[1])
            task_status.started(endpoints)
            await stopped.wait()
            tg.cancel_scope.cancel()
    finally:
        for listener in listeners.values():
            listener.sock.close()
        with anyio.CancelScope(shield=True):
            for upstream in upstreams.values():
                await upstream.aclose()
            for strategy in broker.strategies.values():
                await strategy.client.aclose()
            if reloader is not None:
                await reloader.aclose()
            if api is not None:
                await api[2].aclose()
            await sampler.close()
