"""Shell completion: the committed scripts match the app, and completing is fast and light."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "scripts" / "gen_completions.py"
SCRIPT = Path(sys.executable).with_name("gpubroker")


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_completions", GENERATOR)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_committed_completions_match_the_app(shell: str) -> None:
    generated = load_generator().script(shell)
    committed = ROOT / "completions" / f"gpubroker.{shell}"
    assert committed.exists(), f"{committed} is missing: run python scripts/gen_completions.py"
    assert committed.read_text(encoding="utf-8") == generated, (
        f"{committed.name} drifted from the app: run python scripts/gen_completions.py"
    )
    assert "_GPUBROKER_COMPLETE=complete_" in generated


def test_generator_check_mode_passes() -> None:
    assert load_generator().main(["--check"]) == 0


def completion_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("_GPUBROKER", "COMP_"))}
    env["PATH"] = f"{SCRIPT.parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def complete_bash(words: str, cword: int) -> list[str]:
    done = subprocess.run(
        [str(SCRIPT)],
        env=completion_env(_GPUBROKER_COMPLETE="complete_bash", COMP_WORDS=words,
                           COMP_CWORD=str(cword)),
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_completion_subprocess_answers() -> None:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: install the project (pip install -e .)"
    started = time.monotonic()
    assert complete_bash("gpubroker wor", 1) == ["workers"]
    assert time.monotonic() - started < 5  # generous for a loaded CI box; ~0.2 s normally
    assert complete_bash("gpubroker workers re", 2) == ["restart"]
    assert "--force" in complete_bash("gpubroker init --", 2)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_bash_script_completes_through_the_real_function() -> None:
    script = ROOT / "completions" / "gpubroker.bash"
    done = subprocess.run(
        ["bash", "-c", f'source "{script}"; COMP_WORDS=(gpubroker pl); COMP_CWORD=1; '
         '_gpubroker_completion gpubroker; printf "%s\\n" "${COMPREPLY[@]}"'],
        env=completion_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["plugins"]


def test_importing_the_cli_stays_light() -> None:
    """Completion imports the CLI on every <Tab>: no NVML, no plugins, no HTTP stack, no server."""
    heavy = ["pynvml", "gpubroker.plugins.manager", "httpx", "hypercorn", "starlette", "pluggy",
             "gpubroker.telemetry"]  # fmt: skip
    code = (
        "import sys, gpubroker.cli.main\n"
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.split() == []
