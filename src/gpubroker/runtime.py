"""The composition root: the one place that builds and wires, then serves every port from one
event loop, with a graceful stop.

Everything is passed in through constructors; nothing is assigned onto another object after it
is built. News travels up the :class:`~gpubroker.events.EventBus`, calls go down::

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
    status     = StatusApp(broker, bus, monitor, health)               Metrics(bus), /events(bus)
    catalogue  = Catalogue(backends, residency=sched (read-only))      only with apiPort
    api        = ApiApp(proxies, catalogue, ApiKeys)                   hands requests to proxies

Subscribers of the bus: the broker (Measured, Unmanaged, WorkerGone), the monitor's alerts (freed),
metrics (admitted, first_byte, swapped, unload_failed, refused) and each ``/events`` reader.

Order of shutdown, decided here rather than by Hypercorn's own signal handlers: stop accepting,
let in-flight responses finish (up to ``shutdownGrace``), then stop the broker's tasks and close
the upstream clients.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import anyio
import httpx

from gpubroker.api.app import ApiApp
from gpubroker.api.catalogue import Catalogue, Residency
from gpubroker.api.keys import ApiKeys
from gpubroker.config.load import state_path
from gpubroker.config.model import BackendConfig, Config
from gpubroker.errors import ConfigError
from gpubroker.events import EventBus
from gpubroker.observe.guard import HostPolicy, ListenerGuard
from gpubroker.observe.health import HealthProbe
from gpubroker.observe.monitor import Monitor
from gpubroker.observe.status import StatusApp
from gpubroker.plugins.classifiers.base import Classifier, RouteClassifier
from gpubroker.plugins.manager import Plugins, check_config_names, choose_source
from gpubroker.plugins.strategies.base import Strategy, StrategyContext
from gpubroker.proxy.app import ProxyApp
from gpubroker.proxy.listener import Listener, listen, serve
from gpubroker.proxy.upstream import Upstream
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler, capacities
from gpubroker.scheduling.footprints import FootprintBook
from gpubroker.statefile import StateFile
from gpubroker.telemetry.gpus import backend_gpus
from gpubroker.telemetry.sampler import Sampler
from gpubroker.workers.supervisor import Supervisor

log = logging.getLogger("gpubroker.runtime")


@dataclass(slots=True)
class Endpoints:
    """Where a running broker listens (ports may be ephemeral in tests and the demo)."""

    status_url: str
    proxies: dict[str, str] = field(default_factory=dict)
    broker: Broker | None = None
    monitor: Monitor | None = None
    bus: EventBus | None = None  # every event, typed (``events.on_wire`` gives the SSE form)
    api_url: str | None = None  # the one endpoint for every model (``apiPort``), if set


def make_strategy(
    backend: BackendConfig,
    config: Config,
    plugins: Plugins,
    supervisor: Supervisor | None = None,
    gpu_memory: int | None = None,
) -> Strategy:
    client = httpx.AsyncClient(
        base_url=backend.upstream,
        timeout=httpx.Timeout(min(config.unload_timeout, 30.0)),
        trust_env=False,
    )
    ctx = StrategyContext(
        backend=backend,
        client=client,
        unload_timeout=config.unload_timeout,
        supervisor=supervisor,
        gpu_memory=gpu_memory,
    )
    return plugins.strategies[backend.unload_strategy].cls(ctx)


def proxy_view(backend: BackendConfig, strategy: Strategy) -> BackendConfig:
    """The backend as its proxy sees it: ``hostHeader`` from the config, else the strategy's."""
    return dataclasses.replace(
        backend, host_header=backend.host_header or type(strategy).host_header
    )


def make_classifier(backend: BackendConfig, plugins: Plugins) -> Classifier:
    if backend.gpu_paths is not None:
        return RouteClassifier(backend.gpu_paths)
    return plugins.classifiers[backend.classifier_name].cls()


def _bind(host: str, port: int, what: str) -> Listener:
    try:
        return listen(host, port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}"
        ) from None


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
    upstreams = {
        b.name: Upstream(
            b.upstream,
            response_timeout=config.upstream_timeout,
            idle_timeout=(
                config.upstream_idle_timeout
                if b.upstream_idle_timeout is None
                else b.upstream_idle_timeout
            ),
        )
        for b in config.backends
    }
    proxies = {
        b.name: ProxyApp(
            proxy_view(b, strategies[b.name]),
            make_classifier(b, plugins),
            broker,
            upstreams[b.name],
        )
        for b in config.backends
    }
    status = StatusApp(broker, bus, monitor, health)
    api: tuple[ApiApp, Catalogue, httpx.AsyncClient] | None = None
    if config.api_port is not None:
        api = _build_api(config, proxies, sched, strategies)
    host = config.bind
    listeners: dict[str, Listener] = {}
    try:
        listeners["status"] = _bind(
            host, 0 if ephemeral_ports else config.status_port, "statusPort"
        )
        for b in config.backends:
            listeners[b.name] = _bind(host, 0 if ephemeral_ports else b.proxy_port, b.name)
        if api is not None and config.api_port is not None:
            listeners["api"] = _bind(host, 0 if ephemeral_ports else config.api_port, "apiPort")
        api_url = _url(host, listeners["api"].port) if api is not None else None
        async with anyio.create_task_group() as tg:
            await tg.start(supervisor.run)  # leftovers adopted or stopped before reconciling
            await tg.start(broker.run)
            tg.start_soon(broker.preload_all, config.preload)  # made resident before requests
            stopped = anyio.Event()

            async def serve_all() -> None:
                grace = config.shutdown_grace
                async with anyio.create_task_group() as servers:
                    apps: list[tuple[str, Any]] = [("status", status.app), *proxies.items()]
                    if api is not None:  # our own listener: web pages kept out as on statusPort
                        policy = HostPolicy(config.bind, config.allowed_hosts)
                        apps.append(("api", ListenerGuard(api[0], policy)))
                    for name, app in apps:
                        run = partial(
                            serve,
                            graceful_timeout=grace,
                            own_headers=name == "status",
                            header_timeout=config.header_timeout,
                            client_idle_timeout=config.client_idle_timeout,
                        )
                        servers.start_soon(run, app, listeners.pop(name), shutdown.wait)
                stopped.set()

            endpoints = Endpoints(
                status_url=_url(host, listeners["status"].port),
                proxies={b.name: _url(host, listeners[b.name].port) for b in config.backends},
                broker=broker,
                monitor=monitor,
                bus=bus,
                api_url=api_url,
            )

            async def refuse_when_stopping() -> None:
                await shutdown.wait()
                broker.close()

            tg.start_soon(serve_all)
            tg.start_soon(refuse_when_stopping)
            tg.start_soon(monitor.run)
            tg.start_soon(health.run)
            if api is not None:
                tg.start_soon(api[1].run)
            task_status.started(endpoints)
            await stopped.wait()
            tg.cancel_scope.cancel()
    finally:
        for listener in listeners.values():
            listener.sock.close()
        with anyio.CancelScope(shield=True):
            for upstream in upstreams.values():
                await upstream.aclose()
            for strategy in strategies.values():
                await strategy.client.aclose()
            if api is not None:
                await api[2].aclose()
            await sampler.close()


def _build_api(
    config: Config,
    proxies: dict[str, ProxyApp],
    sched: Residency,
    strategies: dict[str, Strategy],
) -> tuple[ApiApp, Catalogue, httpx.AsyncClient]:
    """The apiPort app, its model catalogue, and the client both read model lists with."""
    client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False)
    catalogue = Catalogue(
        config.backends,
        client=client,
        refresh_every=config.model_refresh,
        residency=sched,
        costs={name: type(s).eviction_cost for name, s in strategies.items()},
    )
    keys = ApiKeys(config.api_keys)
    app = ApiApp(proxies, catalogue, keys, body_limit=config.api_body_limit, client=client)
    return app, catalogue, client


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
