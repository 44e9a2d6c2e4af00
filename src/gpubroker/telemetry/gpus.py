"""Which GPU a config reference names: an index, a UUID or a unique UUID prefix (as CUDA
accepts), brought to one key per GPU with the telemetry's index-to-UUID map. Shared by the
scheduler's domains and the managed workers' pinning, so both read a ``gpu:`` alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpubroker.config.model import BackendConfig
from gpubroker.telemetry.base import TelemetrySnapshot


def aliases(snapshot: TelemetrySnapshot | None) -> dict[str, str]:
    """UUID -> index key, so a GPU named either way lands in one domain."""
    if snapshot is None:
        return {}
    return {g.uuid: str(g.index) for g in snapshot.gpus}


def gpu_key(ref: int | str, aliases: Mapping[str, str]) -> str:
    """One key per GPU: its index, whichever way ``ref`` names it."""
    key = str(ref)
    if key in aliases:
        return aliases[key]
    for uuid, index in aliases.items():  # a unique prefix of a UUID, as CUDA accepts
        if key.startswith("GPU-") and uuid.startswith(key):
            return index
    return key


def backend_gpus(backend: BackendConfig, snapshot: TelemetrySnapshot | None) -> tuple[str, ...]:
    """The keys of the GPUs ``backend`` lives on (GPU 0 when it names none)."""
    known = aliases(snapshot)
    refs = backend.gpu or (0,)
    return tuple(dict.fromkeys(gpu_key(r, known) for r in refs))


def cuda_devices(backend: BackendConfig, snapshot: TelemetrySnapshot | None) -> tuple[str, ...]:
    """What a managed worker is pinned to (``CUDA_VISIBLE_DEVICES``): each of its GPUs by UUID
    where telemetry knows it (a UUID names one card whatever CUDA's order), else as configured."""
    known = aliases(snapshot)
    uuids = {index: uuid for uuid, index in known.items()}
    refs = backend.gpu or (0,)
    return tuple(dict.fromkeys(uuids.get(gpu_key(r, known), str(r)) for r in refs))
