"""Which backend each GPU process belongs to, and how much VRAM each backend really holds.

A backend's processes are the process tree under its roots: a managed worker's pid, or the
process listening on its upstream's port (found with psutil). Ollama's server, for one, listens
on :11434 while a child runner holds the VRAM, hence whole trees. :func:`attribute` is pure;
:func:`find_trees` does the psutil I/O and blocks, so run it in a worker thread.

NVML reports host pids. Inside a container without ``--pid=host`` they match nothing here; such
processes are reported as not visible rather than blamed on nobody. :func:`unmanaged` adds up
the memory of the processes nobody owns, per GPU.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil

from gpubroker.config.model import BackendConfig
from gpubroker.telemetry.base import TelemetrySnapshot


@dataclass(frozen=True, slots=True)
class OwnedProcess:
    """A GPU process and who owns it (``owner`` None: no backend does, as far as we can see)."""

    gpu: str  # the GPU's index, as the scheduler keys its domains
    pid: int
    name: str | None
    used: int | None
    owner: str | None
    visible: bool = True  # the pid exists on this host (false in a container's pid namespace)


@dataclass(frozen=True, slots=True)
class Attribution:
    """Processes with owners, and per traceable backend the bytes it holds per GPU.

    ``measured[b][gpu]`` is None when one of b's processes there would not say its size; a
    backend we cannot trace at all (a remote upstream, nothing listening) is absent.
    """

    processes: tuple[OwnedProcess, ...] = ()
    measured: Mapping[str, Mapping[str, int | None]] = field(default_factory=dict)

    def total(self, backend: str) -> int | None:
        per_gpu = self.measured.get(backend)
        if per_gpu is None or any(v is None for v in per_gpu.values()):
            return None
        return sum(v or 0 for v in per_gpu.values())


def attribute(
    snapshot: TelemetrySnapshot,
    backends: Sequence[str],
    trees: Mapping[str, Iterable[int]],
    *,
    owners_named: bool = False,
    visible: Iterable[int] | None = None,
) -> Attribution:
    """Give each process of ``snapshot`` an owner and add up each backend's bytes per GPU.

    ``trees`` maps a backend to its pids (a pid in two trees goes to the first backend in
    ``backends``). With ``owners_named`` the source named each process's backend itself (the
    simulator), so every backend is traceable. ``visible`` lists the pids that exist here.
    """
    known = set(backends)
    pid_owner: dict[int, str] = {}
    for name in backends:
        for pid in trees.get(name, ()):
            pid_owner.setdefault(pid, name)
    seen = None if visible is None else set(visible)
    traceable = set(known) if owners_named else {b for b in backends if trees.get(b)}
    measured: dict[str, dict[str, int | None]] = {b: {} for b in backends if b in traceable}
    processes = []
    for gpu in snapshot.gpus:
        key = str(gpu.index)
        for per_gpu in measured.values():
            per_gpu[key] = 0
        for p in gpu.processes:
            owner = p.backend if p.backend in known else pid_owner.get(p.pid)
            shown = p.backend is not None or seen is None or p.pid in seen
            processes.append(OwnedProcess(key, p.pid, p.name, p.used_memory, owner, shown))
            if owner is None or owner not in measured:
                continue
            held = measured[owner][key]
            measured[owner][key] = (
                None if held is None or p.used_memory is None else (held + p.used_memory)
            )
    return Attribution(tuple(processes), measured)


def unmanaged(
    attribution: Attribution, gpus: Iterable[str], *, settled: Container[int] | None = None
) -> dict[str, int]:
    """Bytes per GPU key (every one of ``gpus``, 0 where none) held by processes no backend owns.

    What the scheduler should take as gone from a GPU's capacity: memory gpubroker cannot free.

    - Counted: a process telemetry lists that no backend's tree holds (or, from a source that
      names owners, whose owner is not a backend's name), the broker's own process included
      should it ever hold GPU memory (a plugin that opened a CUDA context): nobody unloads it.
      However small: the ``unmanaged_gpu_process`` warning skips a desktop's few MiB, the
      capacity cannot.
    - Not counted: a process this host cannot see (``visible`` false: gpubroker in a container
      without ``--pid=host``, where every host pid matches nothing, our backends' own included;
      counting them would subtract each backend's memory a second time), and one whose size
      the driver will not say (unknown is not a number to subtract).
    - ``settled``: the pids a fresh look at the trees found in no tree. A pid outside it is
      newer than that look (a backend's runner just started: the monitor looks again soon) and
      is not counted until then, so a model's load is never mistaken for a stranger. None: every
      unowned process counts (a source that names owners needs no trees).
    """
    out = dict.fromkeys(gpus, 0)
    for p in attribution.processes:
        if p.owner is not None or not p.visible or p.used is None or p.gpu not in out:
            continue
        if settled is not None and p.pid not in settled:
            continue
        out[p.gpu] += p.used
    return out


# --- the psutil side -------------------------------------------------------------------------


def _local_addresses() -> set[str]:
    addrs = {"localhost", "0.0.0.0", "::", socket.gethostname()}
    try:
        for entries in psutil.net_if_addrs().values():
            addrs.update(a.address.split("%")[0] for a in entries)
    except (OSError, psutil.Error):
        pass
    return addrs


def is_local(host: str, local: set[str]) -> bool:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    return host in local


def listening_pids() -> dict[int, set[int]]:
    """TCP port -> pids listening on it (pids of other users' processes may be hidden)."""
    out: dict[int, set[int]] = {}
    try:
        conns = psutil.net_connections(kind="tcp")
    except (OSError, psutil.Error):
        return out
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.pid is not None and c.laddr:
            out.setdefault(c.laddr.port, set()).add(c.pid)
    return out


def tree(pid: int) -> set[int]:
    """``pid`` and all its descendants; empty when it is gone."""
    try:
        proc = psutil.Process(pid)
        return {pid, *(c.pid for c in proc.children(recursive=True))}
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return set()


def find_trees(
    backends: Sequence[BackendConfig], roots: Mapping[str, Iterable[int]] | None = None
) -> dict[str, set[int]]:
    """Each backend's pids: trees under ``roots`` (managed workers) and its upstream's listener.

    Blocking (psutil walks /proc): call it from a worker thread.
    """
    roots = roots or {}
    listeners: dict[int, set[int]] | None = None
    local = _local_addresses()
    out: dict[str, set[int]] = {}
    for b in backends:
        start = set(roots.get(b.name, ()))
        parts = urlsplit(b.upstream)
        if parts.hostname and is_local(parts.hostname, local):
            if listeners is None:
                listeners = listening_pids()
            port = parts.port or (443 if parts.scheme == "https" else 80)
            start |= listeners.get(port, set())
        pids: set[int] = set()
        for pid in start:
            pids |= tree(pid)
        out[b.name] = pids
    return out


def existing(pids: Iterable[int]) -> set[int]:
    """Those of ``pids`` that exist on this host."""
    return {pid for pid in pids if psutil.pid_exists(pid)}
