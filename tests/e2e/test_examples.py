"""Every example config loads cleanly and names only strategies and classifiers that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from example_configs import CONFIGS, EXAMPLE_ENV, EXAMPLES
from gpubroker.config.load import load_config_file
from gpubroker.plugins.manager import check_config_names, create_plugins


def test_there_are_examples() -> None:
    assert EXAMPLES / "config.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_example_loads_and_names_known_plugins(path: Path) -> None:
    cfg = load_config_file(path, env=EXAMPLE_ENV)
    assert cfg.backends, f"{path.name} declares no backends"
    # Builtins only: an example must not need a third-party plugin to load.
    check_config_names(cfg, create_plugins(env={}, entry_points=False))


def test_main_example_shows_the_extensions() -> None:
    cfg = load_config_file(EXAMPLES / "config.yaml")
    strategies = {b.unload_strategy for b in cfg.backends}
    assert {"ollama", "comfyui", "vllm", "generic"} <= strategies
    vllm = next(b for b in cfg.backends if b.unload_strategy == "vllm")
    assert vllm.sleep_level in (1, 2)
    generic = next(b for b in cfg.backends if b.unload_strategy == "generic")
    assert generic.unload_endpoint and generic.gpu_paths
    assert any(b.vram for b in cfg.backends)
    assert any(b.priority for b in cfg.backends)
    assert any(b.pinned for b in cfg.backends)
    assert any(b.gpu for b in cfg.backends)
    assert any(b.max_concurrency for b in cfg.backends)


def test_systemd_unit_runs_serve_and_outlasts_the_shutdown_grace() -> None:
    from gpubroker.config.model import Config

    unit = (EXAMPLES / "gpubroker.service").read_text()
    fields = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#")
    )
    assert " serve --config " in fields["ExecStart"]
    assert fields["KillSignal"] == "SIGTERM"
    assert int(fields["TimeoutStopSec"]) > Config(backends=()).shutdown_grace
    assert int(fields["LimitNOFILE"]) >= 65536  # a connection each way per streamed request
