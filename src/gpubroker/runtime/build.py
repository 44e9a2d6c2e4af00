"""Factories the composition root builds each part with, at start-up and again on a reload."""

from __future__ import annotations

import dataclasses

import httpx

from gpubroker.api.app import ApiApp
from gpubroker.api.catalogue import Catalogue, is_ollama
from gpubroker.api.keys import ApiKeys
from gpubroker.api.occupancy import Occupancy
from gpubroker.config.model import BackendConfig, Config
from gpubroker.errors import ConfigError
from gpubroker.plugins.classifiers.base import Classifier, RouteClassifier
from gpubroker.plugins.manager import Plugins
from gpubroker.plugins.strategies.base import Strategy, StrategyContext
from gpubroker.proxy.app import ProxyApp
from gpubroker.proxy.listener import Listener, listen
from gpubroker.scheduling.scheduler import Scheduler
from gpubroker.scheduling.units import per_model
from gpubroker.workers.supervisor import Supervisor


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


def bind(host: str, port: int, what: str) -> Listener:
    """Listen now; a port that cannot be had is a ConfigError naming what it was for."""
    try:
        return listen(host, port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}"
        ) from None


def build_api(
    config: Config,
    proxies: dict[str, ProxyApp],
    sched: Scheduler,
    strategies: dict[str, Strategy],
    client: httpx.AsyncClient | None = None,
) -> tuple[ApiApp, Catalogue, httpx.AsyncClient]:
    """The apiPort app, its model catalogue, and the client both read model lists with
    (``client``: the one a reload keeps, else a new one)."""
    if client is None:
        client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False)
    catalogue = Catalogue(
        config.backends,
        client=client,
        refresh_every=config.model_refresh,
        residency=sched,
        costs={name: type(s).eviction_cost for name, s in strategies.items()},
    )
    keys = ApiKeys(config.api_keys)
    occupancy = Occupancy(
        sched,
        per_model=[n for n, s in strategies.items() if per_model(config, s)],
        ollama=[b.name for b in config.backends if is_ollama(b)],
    )
    app = ApiApp(
        proxies,
        catalogue,
        keys,
        body_limit=config.api_body_limit,
        client=client,
        occupancy=occupancy,
    )
    return app, catalogue, client


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
