"""The plugin manager: builtins through the hooks, entry points, the disable list, failures."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pluggy
import pytest

from gpubroker import __version__
from gpubroker.config.load import parse_config
from gpubroker.errors import ConfigError, PluginError
from gpubroker.plugins import hookspecs
from gpubroker.plugins.builtin import BUILTIN_CLASSIFIERS, BUILTIN_STRATEGIES
from gpubroker.plugins.manager import check_config_names, create_plugins, disabled_from_env
from gpubroker.plugins.strategies import Strategy

BUILTINS = ("builtin-strategies", "builtin-classifiers", "builtin-telemetry")

Installer = Callable[..., str]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Installer]:
    """Install a throwaway distribution with a ``gpubroker`` entry point, as pip would.

    ``install(name, source)`` writes ``<module>.py`` and a ``<dist>.dist-info`` on a new
    ``sys.path`` entry; ``importlib.metadata`` discovers it like any installed package.
    """
    modules: list[str] = []

    def install_(name: str, source: str, *, dist: str | None = None, version: str = "1.0") -> str:
        dist = dist or f"gpubroker-test-{name}"
        module = f"gpubroker_test_{name.replace('-', '_')}"
        root = tmp_path / "site" / name
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8"
        )
        (info / "entry_points.txt").write_text(
            f"[gpubroker]\n{name} = {module}\n", encoding="utf-8"
        )
        (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        monkeypatch.syspath_prepend(str(root))
        modules.append(module)
        return module

    yield install_
    for module in modules:
        sys.modules.pop(module, None)


GOOD = """\
from gpubroker.plugins.hookspecs import hookimpl
from gpubroker.plugins.strategies import Strategy
from gpubroker.plugins.classifiers import RouteClassifier


class Whisper(Strategy):
    name = "whisper"
    description = "a test strategy"


class WhisperRoutes(RouteClassifier):
    name = "whisper"
    routes = ("/asr",)


class BetterOllama(Strategy):
    name = "ollama"


@hookimpl
def register_strategies(register):
    register(Whisper)
    register(BetterOllama)


@hookimpl
def register_classifiers(register):
    register(WhisperRoutes)
"""


def test_builtins_register_through_the_hooks() -> None:
    plugins = create_plugins(env={}, entry_points=False)
    assert [name for name, _ in plugins.pm.list_name_plugin()] == list(BUILTINS)
    assert list(plugins.strategies) == [c.name for c in BUILTIN_STRATEGIES]
    assert list(plugins.classifiers) == [c.name for c in BUILTIN_CLASSIFIERS]
    assert list(plugins.telemetry) == ["nvml", "sim", "none"]  # "auto" tries them in order
    ollama = plugins.strategies["ollama"]
    assert (ollama.plugin, ollama.package, ollama.version) == (
        "builtin-strategies",
        "gpubroker",
        __version__,
    )
    assert ollama.description.startswith("Ollama")
    assert plugins.disabled == ()


def test_each_run_gets_a_fresh_manager() -> None:
    first = create_plugins(env={}, entry_points=False)
    second = create_plugins(env={}, entry_points=False)
    assert first.pm is not second.pm
    assert first.strategies is not second.strategies


def test_third_party_plugin_from_an_installed_entry_point(install: Installer) -> None:
    install("whisper", GOOD, version="2.5")
    plugins = create_plugins(env={})
    whisper = plugins.strategies["whisper"]
    assert (whisper.plugin, whisper.package, whisper.version) == (
        "whisper",
        "gpubroker-test-whisper",
        "2.5",
    )
    assert whisper.description == "a test strategy"
    assert plugins.classifiers["whisper"].cls().is_gpu("POST", "/asr")
    # A plugin that registers a builtin's name replaces the builtin.
    assert plugins.strategies["ollama"].package == "gpubroker-test-whisper"
    assert plugins.strategies["comfyui"].package == "gpubroker"
    # Without entry points it is not there.
    assert "whisper" not in create_plugins(env={}, entry_points=False).strategies


def test_registering_a_plugin_object_on_the_manager() -> None:
    """A plugin is any object with hook implementations; the manager calls it by keyword."""

    class Loud(Strategy):
        name = "loud"

    class Plugin:
        @hookspecs.hookimpl
        def register_strategies(self, register: Callable[[type[Strategy]], None]) -> None:
            register(Loud)

    plugins = create_plugins(env={}, entry_points=False)
    plugins.pm.register(Plugin(), name="loud-plugin")
    plugins.pm.check_pending()
    seen: list[type] = []
    plugins.pm.hook.register_strategies(register=seen.append)
    assert Loud in seen
    assert set(BUILTIN_STRATEGIES) <= set(seen)


def test_disable_list_from_config_and_env(install: Installer) -> None:
    install("whisper", GOOD)
    cfg = parse_config({"disablePlugins": ["whisper"]})
    plugins = create_plugins(cfg.disable_plugins, env={})
    assert "whisper" not in plugins.strategies
    assert plugins.strategies["ollama"].package == "gpubroker"
    assert plugins.disabled == ("whisper",)
    assert plugins.pm.is_blocked("whisper")

    plugins = create_plugins(env={"GPUBROKER_DISABLE_PLUGINS": " whisper , builtin-telemetry,"})
    assert "whisper" not in plugins.strategies
    assert plugins.telemetry == {}
    assert plugins.disabled == ("whisper", "builtin-telemetry")

    plugins = create_plugins(["whisper"], env={"GPUBROKER_DISABLE_PLUGINS": "whisper"})
    assert plugins.disabled == ("whisper",)  # named twice, listed once


def test_third_parties_register_in_load_order_after_builtins(install: Installer) -> None:
    source = GOOD.replace('"a test strategy"', '"{}"')
    install("first", source.replace("{}", "first"))
    install("second", source.replace("{}", "second"))
    plugins = create_plugins(env={})
    names = [name for name, _ in plugins.pm.list_name_plugin()]
    assert names[:3] == list(BUILTINS)
    # sys.path order decides which distribution importlib.metadata lists first.
    last = [name for name in names if name in ("first", "second")][-1]
    assert plugins.strategies["whisper"].description == last
    assert plugins.strategies["whisper"].plugin == last


def test_disabled_from_env() -> None:
    assert disabled_from_env({}) == ()
    assert disabled_from_env({"GPUBROKER_DISABLE_PLUGINS": "a, b,,c "}) == ("a", "b", "c")


def test_disable_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUBROKER_DISABLE_PLUGINS", "builtin-classifiers")
    assert create_plugins(entry_points=False).classifiers == {}


def test_plugin_that_fails_to_import(install: Installer) -> None:
    install("broken", "raise ImportError('No module named torch')\n", version="0.3")
    with pytest.raises(PluginError) as info:
        create_plugins(env={})
    message = str(info.value)
    assert message == (
        "plugin 'broken' (package gpubroker-test-broken 0.3) failed to import: "
        "ImportError: No module named torch; uninstall it or disable it with "
        "GPUBROKER_DISABLE_PLUGINS=broken"
    )
    assert "\n" not in message
    # Disabled, it is never imported, so it cannot fail.
    plugins = create_plugins(env={"GPUBROKER_DISABLE_PLUGINS": "broken"})
    assert "ollama" in plugins.strategies


def test_misspelled_hook_fails_check_pending(install: Installer) -> None:
    install(
        "typo",
        """\
        from gpubroker.plugins.hookspecs import hookimpl

        @hookimpl
        def register_strategys(register):
            pass
        """,
    )
    with pytest.raises(PluginError) as info:
        create_plugins(env={})
    message = str(info.value)
    assert message.startswith(
        "plugin 'typo' (package gpubroker-test-typo 1.0) is invalid: "
        "unknown hook 'register_strategys' in plugin <module 'gpubroker_test_typo'"
    )
    assert message.endswith("; uninstall it or disable it with GPUBROKER_DISABLE_PLUGINS=typo")
    assert "\n" not in message
    assert isinstance(info.value.__cause__, pluggy.PluginValidationError)


def test_hookimpl_with_a_wrong_argument_is_refused(install: Installer) -> None:
    install(
        "badarg",
        """\
        from gpubroker.plugins.hookspecs import hookimpl

        @hookimpl
        def register_strategies(register, config):
            pass
        """,
    )
    with pytest.raises(PluginError) as info:
        create_plugins(env={})
    assert str(info.value) == (
        "plugin 'badarg' (package gpubroker-test-badarg 1.0) is invalid: Plugin 'badarg' for "
        "hook 'register_strategies'; hookimpl definition: register_strategies(register, config); "
        "Argument(s) {'config'} are declared in the hookimpl but can not be found in the "
        "hookspec; uninstall it or disable it with GPUBROKER_DISABLE_PLUGINS=badarg"
    )


def test_registering_something_that_is_not_a_strategy(install: Installer) -> None:
    install(
        "notaclass",
        """\
        from gpubroker.plugins.hookspecs import hookimpl

        @hookimpl
        def register_strategies(register):
            register(object)
        """,
    )
    with pytest.raises(PluginError) as info:
        create_plugins(env={})
    assert str(info.value) == (
        "plugin 'notaclass' (gpubroker-test-notaclass) registered <class 'object'> in "
        "register_strategies; expected a subclass of gpubroker.plugins.strategies.base.Strategy"
    )


def test_registering_a_class_with_no_name(install: Installer) -> None:
    install(
        "noname",
        """\
        from gpubroker.plugins.hookspecs import hookimpl
        from gpubroker.plugins.classifiers import Classifier

        class Nameless(Classifier):
            pass

        @hookimpl
        def register_classifiers(register):
            register(Nameless)
        """,
    )
    with pytest.raises(PluginError, match=r"plugin 'noname' .*Nameless.* with no name"):
        create_plugins(env={})


def test_a_hook_that_raises(install: Installer) -> None:
    install(
        "raiser",
        """\
        from gpubroker.plugins.hookspecs import hookimpl

        @hookimpl
        def register_telemetry_sources(register):
            raise RuntimeError("no ROCm here")
        """,
    )
    with pytest.raises(PluginError) as info:
        create_plugins(env={})
    assert str(info.value) == (
        "plugin 'raiser' (gpubroker-test-raiser) failed in register_telemetry_sources: "
        "RuntimeError: no ROCm here"
    )


YAML_BACKEND = "backends:\n  - name: b\n    proxyPort: 5001\n    upstream: http://127.0.0.1:1\n"


def test_check_config_names_accepts_known_names(tmp_path: Path) -> None:
    from gpubroker.config.load import load_config_file

    path = tmp_path / "ok.yaml"
    path.write_text(YAML_BACKEND + "    unloadStrategy: vllm\n    classifier: openai\n")
    check_config_names(load_config_file(path), create_plugins(env={}, entry_points=False))


def test_check_config_names_unknown_strategy(tmp_path: Path) -> None:
    from gpubroker.config.load import load_config_file

    path = tmp_path / "bad.yaml"
    path.write_text(YAML_BACKEND + "    unloadStrategy: olama\n")
    plugins = create_plugins(env={}, entry_points=False)
    with pytest.raises(ConfigError) as info:
        check_config_names(load_config_file(path), plugins)
    assert str(info.value) == (
        f"{path}:5:5: backends[0].unloadStrategy: unknown strategy 'olama' "
        "(known: comfyui, generic, ollama, process, vllm)"
    )


def test_check_config_names_unknown_classifier(tmp_path: Path) -> None:
    from gpubroker.config.load import load_config_file

    plugins = create_plugins(env={}, entry_points=False)
    path = tmp_path / "bad.yaml"
    path.write_text(YAML_BACKEND + "    classifier: tgi\n")
    with pytest.raises(ConfigError) as info:
        check_config_names(load_config_file(path), plugins)
    assert str(info.value).startswith(
        f"{path}:5:5: backends[0].classifier: no classifier named 'tgi' (known: comfyui, "
    )
    assert str(info.value).endswith("set `classifier:` or `gpuPaths:`")

    # gpuPaths make a classifier unnecessary.
    path.write_text(YAML_BACKEND + "    classifier: tgi\n    gpuPaths: [/generate]\n")
    check_config_names(load_config_file(path), plugins)


def test_check_config_names_unknown_telemetry(tmp_path: Path) -> None:
    from gpubroker.config.load import load_config_file

    path = tmp_path / "bad.yaml"
    path.write_text("telemetry: rocm\n")
    with pytest.raises(ConfigError) as info:
        check_config_names(load_config_file(path), create_plugins(env={}, entry_points=False))
    assert str(info.value) == (
        f"{path}:1:1: telemetry: unknown telemetry source 'rocm' (known: auto, none, nvml, sim)"
    )
