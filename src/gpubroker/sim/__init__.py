"""Faithful emulators of GPU inference services on a simulated GPU that OOMs like a real one.

Used by ``gpubroker demo``, the tests and the benchmarks. Each emulator exposes ``.app`` (an
ASGI app whose lifespan owns its background work); :func:`running` serves one on a loopback
port::

    gpu = SimGPU(8 * GiB)
    ollama = OllamaEmulator(gpu, {"llama3.2": 3 * GiB})
    async with running(ollama.app) as url:
        ...
    assert gpu.oom_count == 0
"""

from gpubroker.sim.comfyui import ComfyUIEmulator, simple_workflow
from gpubroker.sim.comfyui_models import flux_workflow
from gpubroker.sim.generic import GenericEmulator
from gpubroker.sim.gpu import GiB, MiB, OutOfMemory, SimGPU
from gpubroker.sim.gpuapp import gpu_app
from gpubroker.sim.harness import StartupFailed, running
from gpubroker.sim.ollama import OllamaEmulator
from gpubroker.sim.service import NotStarted
from gpubroker.sim.vllm import VLLMEmulator, VLLMStartupError

__all__ = [
    "ComfyUIEmulator",
    "GenericEmulator",
    "GiB",
    "MiB",
    "NotStarted",
    "OllamaEmulator",
    "OutOfMemory",
    "SimGPU",
    "StartupFailed",
    "VLLMEmulator",
    "VLLMStartupError",
    "flux_workflow",
    "gpu_app",
    "running",
    "simple_workflow",
]
