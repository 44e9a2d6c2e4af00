"""Every hook is documented for plugin authors (like datasette's test_docs)."""

from __future__ import annotations

import inspect

import pluggy
import pytest

from gpubroker.plugins import hookspecs

HOOKS = [
    name
    for name, fn in vars(hookspecs).items()
    if inspect.isfunction(fn) and hasattr(fn, f"{hookspecs.PROJECT}_spec")
]


def test_the_three_hook_families() -> None:
    assert sorted(HOOKS) == [
        "register_classifiers",
        "register_strategies",
        "register_telemetry_sources",
    ]


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, hook))
    assert doc, f"{hook} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith("."), f"{hook}: the first line should be a one-line summary"
    params = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    for param in params:
        assert f":param {param}:" in doc, f"{hook} does not document :param {param}:"
    assert ":returns:" in doc, f"{hook} does not say what it returns"
    assert "Called " in doc, f"{hook} does not say when it is called"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_typed(hook: str) -> None:
    signature = inspect.signature(getattr(hookspecs, hook))
    assert signature.return_annotation != inspect.Signature.empty
    for param in signature.parameters.values():
        assert param.annotation != inspect.Parameter.empty, f"{hook}({param.name}) is untyped"


def test_markers_belong_to_the_project() -> None:
    assert isinstance(hookspecs.hookspec, pluggy.HookspecMarker)
    assert isinstance(hookspecs.hookimpl, pluggy.HookimplMarker)
    assert hookspecs.PROJECT == "gpubroker"
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    assert sorted(name for name in vars(pm.hook) if not name.startswith("_")) == sorted(HOOKS)


def test_the_plugin_api_is_importable_from_the_package_itself() -> None:
    import gpubroker
    from gpubroker import Classifier, Job, Strategy, TelemetrySource, hookimpl
    from gpubroker.plugins.classifiers.base import Classifier as ClassifierImpl
    from gpubroker.plugins.hookspecs import hookimpl as hookimpl_impl
    from gpubroker.plugins.strategies.base import Job as JobImpl
    from gpubroker.plugins.strategies.base import Strategy as StrategyImpl
    from gpubroker.telemetry.base import TelemetrySource as TelemetrySourceImpl

    assert hookimpl is hookimpl_impl and Strategy is StrategyImpl and Job is JobImpl
    assert Classifier is ClassifierImpl and TelemetrySource is TelemetrySourceImpl
    assert set(gpubroker.__all__) >= {"hookimpl", "Strategy", "Classifier", "TelemetrySource"}
    with pytest.raises(AttributeError):
        gpubroker.nothing_of_that_name  # noqa: B018


def test_every_public_name_resolves() -> None:
    import gpubroker

    for name in gpubroker.__all__:
        assert getattr(gpubroker, name) is not None, name
