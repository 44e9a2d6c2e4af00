"""One emulator as a process of its own, configured from its environment as the real service
is, for tests that read a service's ``/proc`` entries (its argv and environment)::

    python tests/emulated_process.py ollama --port 11434

``ollama`` reads ``OLLAMA_KEEP_ALIVE`` and ``OLLAMA_MAX_LOADED_MODELS`` as envconfig/config.go
does (parsed by :mod:`gpubroker.doctor.ollama`, which pins them). Prints its URL once listening.
"""

from __future__ import annotations

import argparse
import os

import anyio

from gpubroker.doctor.ollama import keep_alive, max_loaded
from gpubroker.sim import GiB, OllamaEmulator, SimGPU, running


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["ollama"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    env = os.environ
    ollama = OllamaEmulator(
        SimGPU(8 * GiB),
        {"llama3.2:latest": 2 * GiB},
        keep_alive=-1 if keep_alive(env) == float("inf") else keep_alive(env),
        max_loaded=max_loaded(env),
    )
    async with running(ollama.app, port=args.port) as url:
        print(url, flush=True)
        await anyio.sleep_forever()


if __name__ == "__main__":
    anyio.run(main)
