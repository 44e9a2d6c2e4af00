"""The broker's own ports: each ``proxyPort``, ``statusPort`` and ``apiPort`` free to bind, or
held by a running gpubroker (fine: this config may be what it serves), or by something else
(``serve`` would fail to start). Binding is tried as the listeners bind (``SO_REUSEADDR``, so a
closed connection's TIME_WAIT is no conflict); who holds a port comes from psutil, in a thread.
"""

from __future__ import annotations

import errno
import os
import socket

import anyio.to_thread

from gpubroker.config.model import Config
from gpubroker.doctor.findings import Finding
from gpubroker.workers import procs


def own_ports(cfg: Config) -> list[tuple[str, int]]:
    """Each port ``serve`` listens on, with the key that sets it."""
    out = [("statusPort", cfg.status_port)]
    if cfg.api_port is not None:
        out.append(("apiPort", cfg.api_port))
    out += [(f"{b.name}'s proxyPort", b.proxy_port) for b in cfg.backends]
    return out


def try_bind(host: str, port: int) -> int | None:
    """None when ``host:port`` can be bound now, else the errno."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            return exc.errno or errno.EADDRINUSE
    return None


def holder(port: int) -> tuple[int | None, str, bool]:
    """Who listens on ``port``: (pid or None, how to name it, whether it is a gpubroker)."""
    pids = procs.listening_on(port)
    if not pids:
        return None, "a process this user cannot see", False
    pid = pids[0]
    argv = procs.cmdline(pid)
    ours = any(os.path.basename(a).startswith("gpubroker") or a.startswith("gpubroker.")
               for a in argv[:3])  # fmt: skip
    return pid, procs.describe_pid(pid), ours


def check_ports(cfg: Config) -> list[Finding]:
    """Blocking (bind, psutil): run in a thread."""
    out: list[Finding] = []
    free: list[str] = []
    for key, port in own_ports(cfg):
        err = try_bind(cfg.bind, port)
        if err is None:
            free.append(f"{port} ({key})")
            continue
        facts: dict[str, object] = {"port": port, "key": key}
        if err == errno.EADDRINUSE:
            pid, who, ours = holder(port)
            facts.update(pid=pid, gpubroker=ours)
            if ours:
                out.append(
                    Finding(
                        "ports",
                        "info",
                        f"port {port} ({key}) is in use by a running gpubroker ({who})",
                        facts=facts,
                    )
                )
            else:
                out.append(
                    Finding(
                        "ports",
                        "error",
                        f"port {port} ({key}) is in use by {who}: `gpubroker serve` cannot "
                        "listen there",
                        f"stop {who}, or give {key} another port",
                        facts=facts,
                    )
                )
        else:
            why = os.strerror(err)
            hint = (
                "use a port above 1023, or grant CAP_NET_BIND_SERVICE"
                if err == errno.EACCES
                else f"set `bind:` to an address of this machine (now {cfg.bind})"
            )
            out.append(
                Finding(
                    "ports", "error", f"cannot bind {cfg.bind}:{port} ({key}): {why}", hint,
                    facts=facts,
                )
            )  # fmt: skip
    if free:
        out.insert(0, Finding("ports", "ok", f"free to listen on {cfg.bind}: {', '.join(free)}"))
    return out


async def ports(cfg: Config) -> list[Finding]:
    return await anyio.to_thread.run_sync(check_ports, cfg, abandon_on_cancel=True)
