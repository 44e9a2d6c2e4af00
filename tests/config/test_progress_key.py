"""The per-backend ``progress`` key: SSE comments while a streaming request waits (issue 12)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gpubroker.config.load import load_config_file, parse_config
from gpubroker.config.model import Config
from gpubroker.errors import ConfigError

BACKEND = """\
backends:
  - name: vllm
    proxyPort: 5001
    upstream: http://127.0.0.1:8000
"""


def load(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "gpubroker.yaml"
    path.write_text(textwrap.dedent(BACKEND) + extra, encoding="utf-8")
    return load_config_file(path)


def test_progress_is_off_unless_asked(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.backends[0].progress == "off"


@pytest.mark.parametrize("value", ["comments", "off"])
def test_progress_takes_comments_or_off(tmp_path: Path, value: str) -> None:
    cfg = load(tmp_path, f"    progress: {value}\n")
    assert cfg.backends[0].progress == value
    again = parse_config(cfg.to_dict(), source="again")
    assert again.backends[0].progress == value


@pytest.mark.parametrize("value", ["sse", "true", "1"])
def test_progress_refuses_anything_else(tmp_path: Path, value: str) -> None:
    path = tmp_path / "gpubroker.yaml"
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"    progress: {value}\n")
    assert str(info.value).startswith(f"{path}:5:5: backends[0].progress: expected one of ")
    assert "comments, off" in str(info.value)
