"""Write completions/gpubroker.{bash,zsh,fish} from the Typer app; ``--check`` fails on drift.

Each script is what the app itself prints when a shell asks for it
(``_GPUBROKER_COMPLETE=source_bash gpubroker``), so the committed files are exactly what
``gpubroker --show-completion`` would give. Run it after changing the CLI's name or Typer.
"""

from __future__ import annotations

import sys
from pathlib import Path

from typer.testing import CliRunner

from gpubroker.cli.main import app

PROG = "gpubroker"
COMPLETE_VAR = "_GPUBROKER_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
OUT = Path(__file__).resolve().parent.parent / "completions"


def script(shell: str) -> str:
    """The completion script the app prints for ``shell``."""
    result = CliRunner().invoke(app, [], prog_name=PROG, env={COMPLETE_VAR: f"source_{shell}"})
    if result.exit_code != 0 or not result.stdout.strip():
        raise RuntimeError(f"no {shell} completion from the app: {result.output!r}")
    return result.stdout.strip() + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for shell in SHELLS:
        path = OUT / f"{PROG}.{shell}"
        text = script(shell)
        if path.exists() and path.read_text(encoding="utf-8") == text:
            continue
        if check:
            stale.append(path.name)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/gen_completions.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
