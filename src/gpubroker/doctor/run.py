"""Run every check at once, each bounded in time, and list the findings in a stable order.

A config that does not load is the one finding (nothing else can be checked without it).
Otherwise the checks run concurrently: the config's own warnings, NVML then the declared sizes
against the cards, the broker's ports, managed workers' commands, and one check per upstream. An
upstream gets :data:`HTTP_TIMEOUT` per request and none after one failed, so a dead or hung
service costs that much however many there are; :data:`CHECK_LIMIT` caps a whole check (a slow
walk of ``/proc`` included), and a check that runs out of time says so.
``on_slow`` hears which checks are still running after :data:`SLOW` seconds (the CLI prints it
on stderr).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from gpubroker.config.load import resolve_config
from gpubroker.config.model import BackendConfig, Config
from gpubroker.doctor import gpu, ports, setup
from gpubroker.doctor.findings import Finding
from gpubroker.doctor.services import check_backend, kind_of
from gpubroker.errors import ConfigError, GPUBrokerError

HTTP_TIMEOUT = 1.5  # seconds for one request to an upstream (a dead one gets one request)
CHECK_LIMIT = 5.0  # seconds one check may take in all, its process lookups included
SLOW = 1.0  # seconds after which the checks still running are named on ``on_slow``


def load(path: Path | None) -> tuple[Config | None, list[Finding]]:
    """The config ``serve`` would use, and what is wrong with loading it."""
    try:
        cfg = resolve_config(path)
    except ConfigError as exc:
        return None, [
            Finding(
                "config",
                "error",
                str(exc),
                "correct the file where it points (`gpubroker serve --check` says the same)",
            )
        ]
    where = cfg.source or "defaults"
    found = [
        Finding(
            "config",
            "ok",
            f"{where}: {len(cfg.backends)} backend(s), policy {cfg.policy}",
            facts={"source": cfg.source, "backends": [b.name for b in cfg.backends]},
        )
    ]
    if not cfg.backends:
        found.append(
            Finding("config", "error", "no backends to serve", "add one (`gpubroker init`)")
        )
        return cfg, found
    from gpubroker.plugins.manager import check_config_names, create_plugins

    try:
        check_config_names(cfg, create_plugins(cfg.disable_plugins))
    except GPUBrokerError as exc:
        found.append(
            Finding("config", "error", str(exc), "name an installed one (`gpubroker plugins`)")
        )
    return cfg, found


@dataclass(frozen=True, slots=True)
class _Check:
    label: str
    limit: float
    run: Callable[[], Awaitable[list[Finding]]]
    backend: BackendConfig | None = None


async def diagnose(
    cfg: Config,
    *,
    on_slow: Callable[[list[str]], None] | None = None,
    check_limit: float = CHECK_LIMIT,
    http_timeout: float = HTTP_TIMEOUT,
) -> list[Finding]:
    """Every finding about ``cfg``'s set-up, in the order of the checks (never raises)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(http_timeout), trust_env=False) as client:

        async def gpus_then_sizes() -> list[Finding]:
            found, snapshot = await gpu.nvml(cfg)
            return found + gpu.sizes(cfg, snapshot)

        async def config() -> list[Finding]:
            return setup.config_warnings(cfg)

        checks = [
            _Check("config", check_limit, config),
            _Check("gpu", gpu.NVML_LIMIT + 0.5, gpus_then_sizes),
            _Check("ports", check_limit, functools.partial(ports.ports, cfg)),
            _Check("commands", check_limit, functools.partial(setup.commands, cfg)),
        ]
        checks += [
            _Check(
                f"{b.name} ({b.upstream})",
                check_limit,
                functools.partial(check_backend, client, cfg, b),
                b,
            )
            for b in cfg.backends
        ]
        return await _run_all(checks, on_slow)


async def _run_all(
    checks: list[_Check], on_slow: Callable[[list[str]], None] | None
) -> list[Finding]:
    results: dict[int, list[Finding]] = {}
    running: dict[int, str] = {}

    async def one(i: int, check: _Check) -> None:
        running[i] = check.label
        try:
            with anyio.move_on_after(check.limit) as scope:
                results[i] = await check.run()
            if scope.cancelled_caught:
                results[i] = [_timed_out(check)]
        except Exception as exc:  # a bug in a check: say so, and let the others report
            results[i] = [
                Finding(
                    "doctor",
                    "warning",
                    f"the {check.label} check failed: {type(exc).__name__}: {exc}",
                    "please report it: the doctor itself is wrong here",
                )
            ]
        finally:
            running.pop(i, None)

    async def watch(done: anyio.Event) -> None:
        await anyio.sleep(SLOW)
        while not done.is_set() and running:
            if on_slow is not None:
                on_slow([running[k] for k in sorted(running)])
            with anyio.move_on_after(SLOW):
                await done.wait()

    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch, done)
        async with anyio.create_task_group() as checks_tg:
            for i, check in enumerate(checks):
                checks_tg.start_soon(one, i, check)
        done.set()
        tg.cancel_scope.cancel()
    return [f for i in range(len(checks)) for f in results.get(i, [])]


def _timed_out(check: _Check) -> Finding:
    b = check.backend
    if b is None:
        return Finding(
            "doctor", "warning", f"the {check.label} check did not finish within {check.limit:g}s"
        )
    kind = kind_of(b)
    return Finding(
        "upstream",
        "info" if b.command else "error",
        f"{b.upstream} did not finish answering within {check.limit:g}s ({kind}): it accepts "
        "connections but hangs",
        None if b.command else "look at the service's own log, or restart it",
        b.name,
        {"url": b.upstream, "kind": kind, "reachable": False},
    )
