"""The plugin manager: builtins first, then the ``gpubroker`` entry-point group.

A fresh :class:`Plugins` is built per run (never at import time), so the CLI's completion path and
``--help`` stay fast and tests never share state. Builtins go through the very hooks a third party
implements; there is one path, not two.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import anyio
import pluggy

from gpubroker.config.model import Config
from gpubroker.errors import PluginError
from gpubroker.plugins import hookspecs
from gpubroker.plugins.builtin import BUILTINS
from gpubroker.plugins.classifiers.base import Classifier
from gpubroker.plugins.strategies.base import Strategy
from gpubroker.telemetry.base import TelemetrySource
from gpubroker.telemetry.nvml import NoTelemetry
from gpubroker.version import __version__

ENTRY_POINT_GROUP = "gpubroker"
SOURCE_START_TIMEOUT = 5.0  # seconds for a telemetry source to say whether it is available
DISABLE_ENV = "GPUBROKER_DISABLE_PLUGINS"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Provided(Generic[T]):
    """A registered class and who provides it (plugin name, distribution and version)."""

    name: str
    cls: type[T]
    plugin: str
    package: str
    version: str
    description: str = ""


@dataclass(slots=True)
class Plugins:
    """Everything the plugins registered, by kind and name."""

    pm: pluggy.PluginManager
    strategies: dict[str, Provided[Strategy]] = field(default_factory=dict)
    classifiers: dict[str, Provided[Classifier]] = field(default_factory=dict)
    telemetry: dict[str, Provided[TelemetrySource]] = field(default_factory=dict)
    disabled: tuple[str, ...] = ()


def disabled_from_env(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get(DISABLE_ENV, "")
    return tuple(name.strip() for name in raw.split(",") if name.strip())


def create_plugins(
    disabled: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    entry_points: bool = True,
) -> Plugins:
    """Build a plugin manager, register builtins, load entry points, and collect registrations.

    ``disabled`` (from the config) and ``$GPUBROKER_DISABLE_PLUGINS`` (comma-separated) name
    plugins to skip: entry-point names, or ``builtin-strategies`` and its siblings.
    """
    env = os.environ if env is None else env
    blocked = tuple(dict.fromkeys([*disabled, *disabled_from_env(env)]))
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in blocked:
        pm.set_blocked(name)
    origin: dict[str, tuple[str, str]] = {}
    for name, module in BUILTINS:
        if not pm.is_blocked(name):
            origin[name] = ("gpubroker", __version__)
            _register(pm, module, name, origin)
    if entry_points:
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
                continue
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} (package {dist} {version}) failed to import: "
                    f"{type(exc).__name__}: {exc}; uninstall it or disable it with "
                    f"{DISABLE_ENV}={ep.name}"
                ) from exc
            origin[ep.name] = (dist, version)
            _register(pm, plugin, ep.name, origin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise _invalid(pm.get_name(exc.plugin) or repr(exc.plugin), exc, origin) from exc

    plugins = Plugins(pm=pm, disabled=blocked)
    _collect(plugins, origin, "register_strategies", plugins.strategies, Strategy)
    _collect(plugins, origin, "register_classifiers", plugins.classifiers, Classifier)
    _collect(plugins, origin, "register_telemetry_sources", plugins.telemetry, TelemetrySource)
    return plugins


def _register(
    pm: pluggy.PluginManager, plugin: object, name: str, origin: Mapping[str, tuple[str, str]]
) -> None:
    """``pm.register``, with pluggy's multi-line refusals turned into one PluginError."""
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise _invalid(name, exc, origin) from exc


def _invalid(name: str, exc: Exception, origin: Mapping[str, tuple[str, str]]) -> PluginError:
    package, version = origin.get(name, ("?", "?"))
    why = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return PluginError(
        f"plugin {name!r} (package {package} {version}) is invalid: {why}; uninstall it or "
        f"disable it with {DISABLE_ENV}={name}"
    )


def _collect(
    plugins: Plugins,
    origin: Mapping[str, tuple[str, str]],
    hook: str,
    into: dict[str, Provided[Any]],
    base: type,
) -> None:
    """Call ``hook`` plugin by plugin, so every registration knows who made it."""
    pm = plugins.pm
    # list_name_plugin() keeps registration order (get_plugins() is a set); blocked names
    # are listed with None.
    names = [name for name, plugin in pm.list_name_plugin() if plugin is not None]
    # Builtins first, then third parties in load order: a plugin may replace a builtin.
    ordered = [n for n in names if n and n.startswith("builtin-")] + [
        n for n in names if n and not n.startswith("builtin-")
    ]
    for plugin_name in ordered:
        others = [p for p in pm.get_plugins() if pm.get_name(p) != plugin_name]
        caller = pm.subset_hook_caller(hook, remove_plugins=others)
        package, version = origin.get(plugin_name, ("?", "?"))

        def register(
            cls: type, _plugin: str = plugin_name, _pkg: str = package, _ver: str = version
        ) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(
                    f"plugin {_plugin!r} ({_pkg}) registered {cls!r} in {hook}; "
                    f"expected a subclass of {base.__module__}.{base.__qualname__}"
                )
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} ({_pkg}) registered {cls!r} with no name")
            into[name] = Provided(
                name=name,
                cls=cls,
                plugin=_plugin,
                package=_pkg,
                version=_ver,
                description=getattr(cls, "description", "") or "",
            )

        try:
            caller(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(
                f"plugin {plugin_name!r} ({package}) failed in {hook}: {type(exc).__name__}: {exc}"
            ) from exc


def check_config_names(config: Any, plugins: Plugins) -> None:
    """Every strategy and classifier a config names must exist; raise a located ConfigError."""
    for i, backend in enumerate(config.backends):
        if backend.unload_strategy not in plugins.strategies:
            known = ", ".join(sorted(plugins.strategies))
            raise config.error(
                f"backends[{i}].unloadStrategy",
                f"unknown strategy {backend.unload_strategy!r} (known: {known})",
            )
        if backend.unload_strategy == "process" and backend.command is None:
            raise config.error(
                f"backends[{i}].unloadStrategy",
                "the process strategy stops and starts a managed worker: give this backend "
                "`command:` (a list, with {port} where its port goes)",
            )
        if backend.gpu_paths is None and backend.classifier_name not in plugins.classifiers:
            known = ", ".join(sorted(plugins.classifiers))
            key = "classifier" if backend.classifier else "unloadStrategy"
            raise config.error(
                f"backends[{i}].{key}",
                f"no classifier named {backend.classifier_name!r} (known: {known}); "
                "set `classifier:` or `gpuPaths:`",
            )
    if config.telemetry != "auto" and config.telemetry not in plugins.telemetry:
        known = ", ".join(["auto", *sorted(plugins.telemetry)])
        raise config.error(
            "telemetry", f"unknown telemetry source {config.telemetry!r} (known: {known})"
        )


async def choose_source(
    config: Config, plugins: Plugins, *, limit: float = SOURCE_START_TIMEOUT
) -> tuple[TelemetrySource, str | None]:
    """The source ``telemetry:`` names, or under ``auto`` the first available one.

    Returns the source and, when it is not the one wanted (no driver…), a one-line notice.
    A named source that is unavailable falls back to ``none``: the broker runs on declared sizes.
    """
    wanted = config.telemetry
    names = list(plugins.telemetry) if wanted == "auto" else [wanted]
    reasons: list[str] = []
    for name in names:
        source = plugins.telemetry[name].cls(config)
        try:
            with anyio.fail_after(limit):
                why = await source.available()
        except TimeoutError:
            why = f"did not answer within {limit:g}s"
        except Exception as exc:  # a plugin's bug must not stop the broker from serving
            why = f"failed: {type(exc).__name__}: {exc}"
        if why is None:
            return source, (reasons[0] if reasons and name == "none" else None)
        reasons.append(f"{name}: {why}" if wanted != "auto" else why)
        with anyio.move_on_after(limit, shield=True):
            await source.close()
    return NoTelemetry(config), reasons[0] if reasons else "no telemetry source is installed"
