"""Ollama's environment read as envconfig/config.go reads it (KeepAlive, MaxRunners, Var)."""

from __future__ import annotations

import math

import pytest

from gpubroker.doctor.ollama import keep_alive, max_loaded


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (None, 300.0),  # unset: 5m
        ("", 300.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("300", 300.0),  # an integer is seconds
        ("-1", math.inf),  # negative: forever
        ("-1s", math.inf),
        (' "24h" ', 86400.0),  # Var trims spaces, then quotes
        ("'0'", 0.0),
        ("forever", 300.0),  # neither a duration nor an integer: the default
        ("10 m", 300.0),
        ("1d", 300.0),  # Go has no day unit
    ],
)
def test_keep_alive(raw: str | None, seconds: float) -> None:
    env = {} if raw is None else {"OLLAMA_KEEP_ALIVE": raw}
    assert keep_alive(env) == seconds


@pytest.mark.parametrize(
    ("raw", "n"), [(None, 0), ("1", 1), (" 4 ", 4), ("'2'", 2), ("-1", 0), ("two", 0)]
)
def test_max_loaded_models(raw: str | None, n: int) -> None:
    env = {} if raw is None else {"OLLAMA_MAX_LOADED_MODELS": raw}
    assert max_loaded(env) == n
