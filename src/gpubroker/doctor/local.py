"""How a backend's service was started, where that can be read: its argv and environment.

Some settings that decide whether the broker and a service agree can be read over no API
(Ollama's ``OLLAMA_KEEP_ALIVE``, vLLM's ``--enable-sleep-mode`` without dev mode). They can be
read from the process itself when it listens on this machine and belongs to a user whose
``/proc/<pid>/environ`` we may read, else from the ``command:``/``env:`` gpubroker would start a
managed worker with (the environment ``gpubroker serve`` passes on is assumed to be this
shell's). Blocking (psutil walks ``/proc``): call :func:`launch_of` in a thread.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

from gpubroker.config.model import BackendConfig
from gpubroker.workers import procs
from gpubroker.workers.worker import Worker, upstream_address


@dataclass(frozen=True, slots=True)
class Launch:
    """How a service runs, or would be started. ``env`` is None when it cannot be read."""

    where: str  # "pid 42 (ollama)" or "its command: in the config"
    argv: tuple[str, ...]
    env: Mapping[str, str] | None
    pid: int | None = None

    def flag(self, name: str) -> bool:
        """Whether ``name`` (``--enable-sleep-mode``) is among the arguments."""
        return any(a == name or a.startswith(name + "=") for a in self.argv)

    def mentions(self, name: str) -> bool:
        """Whether the command line names ``name`` (``ollama serve``, ``python -m vllm...``):
        a port held by something else (``docker-proxy``) does not carry the service's env."""
        return any(name in a.lower() for a in self.argv)


def is_local(host: str) -> bool:
    """Whether ``host`` is this machine by name or loopback address (no lookups)."""
    host = host.strip("[]").lower()
    if host in ("localhost", "0.0.0.0", "::") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listeners(port: int) -> tuple[list[int], bool]:
    """PIDs listening on ``port`` that we may see, and whether anything listens at all (a
    process of another user shows without its pid). One walk of the system's sockets."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return [], False
    mine = [c for c in conns if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port]
    return sorted({c.pid for c in mine if c.pid}), bool(mine)


def launch_of(backend: BackendConfig, *, listening: bool = True) -> Launch | None:
    """The live process listening on the upstream's port where it is local and visible,
    else the managed worker's ``command:``; None when neither can be told. ``listening``
    False: the caller knows nothing answers there (the sockets are not walked)."""
    host, port = upstream_address(backend.upstream)
    if listening and is_local(host):
        pids, anyone = _listeners(port)
        if not pids and anyone:
            return Launch("a process of another user", (), None)
        if pids and pids[0] != os.getpid():
            pid = pids[0]
            p = procs.process(pid)
            env = procs.environ(p) if p is not None else {}
            argv = tuple(procs.cmdline(pid))
            return Launch(procs.describe_pid(pid), argv, env or None, pid)
    if backend.command:
        command, env = Worker(backend).command(None)
        return Launch("its command: in the config", tuple(command), env)
    return None
