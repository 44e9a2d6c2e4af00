"""One managed worker as the supervisor tracks it: its state, its facts, its command, its log.

The supervisor (``supervisor.py``) is the only one that moves a :class:`Worker`'s state; this
module holds the record and what needs no decision: the state machine's names, how a command
template is filled and pinned, where an upstream listens, how its output reaches its log.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections import deque
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc

from gpubroker.config.model import BackendConfig
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.telemetry.gpus import cuda_devices
from gpubroker.workers.parts import LOG_LINES, LogBuffer
from gpubroker.workers.procs import AFTER_GRACE, MARKER, MARKER_UPSTREAM, Child

TAIL_POLL = 0.25  # seconds between reads of a detached worker's log file


class WorkerState(enum.Enum):
    """Where a managed worker is. Each transition and the race it guards against:

    - ``stopped``/``failed`` → ``starting`` (start): under the worker's lock, so two starts at
      once (two queued requests, ``workers ensure`` racing the scheduler's load) spawn one
      process; the second finds ``ready`` and returns. The port is checked first: a process
      already there is adopted (ours, healthy, same command and pin) or refused, never doubled.
    - ``starting`` → ``ready`` (health answered): accepted only while *our* process is still
      alive, so a stranger that grabbed the port after ours died cannot pass for it.
    - ``starting`` → ``stopping`` (stop during start): the stop cancels the health wait first,
      so a stop never queues behind a start that may take ``startTimeout``.
    - ``starting`` → ``failed`` (exit before ready, or ``startTimeout``): the process group is
      killed before the state changes, so a half-started worker holds no VRAM.
    - ``ready`` → ``stopping`` → ``stopped``: ``stopped`` is set only once the tree was killed
      and reaped and the port checked (or the stop's deadline passed: its report then says what
      was not confirmed), so the scheduler never loads the next backend onto VRAM still held.
    - ``ready`` → ``starting`` (crash, restart after backoff) or ``failed`` (crash loop,
      ``restart: never``): an exit seen while ``stopping`` is the one we asked for, not a crash;
      a stop cancels a pending backoff.
    - ``failed`` → ``starting``: only an explicit start (CLI, or a request through the
      scheduler); it clears the crash count.
    """

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


def render(template: str, *, port: int, gpu: str, name: str) -> str:
    """Fill ``{port}``, ``{gpu_uuid}`` and ``{name}``; other braces stay as they are."""
    return template.replace("{port}", str(port)).replace("{gpu_uuid}", gpu).replace("{name}", name)


def upstream_address(upstream: str) -> tuple[str, int]:
    parts = urlsplit(upstream)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "127.0.0.1", port


class Worker:
    """One managed worker. Its state is moved only by the supervisor (see WorkerState)."""

    def __init__(self, spec: BackendConfig, log_size: int = LOG_LINES) -> None:
        assert spec.command is not None
        self.spec = spec
        self.name = spec.name
        self.host, self.port = upstream_address(spec.upstream)
        self.state = WorkerState.STOPPED
        self.pid: int | None = None
        self.proc: Child | None = None
        self.adopted = False
        self.started_at: float | None = None  # wall clock, for uptime
        self.created: float | None = None  # the process's create_time (psutil), for its record
        self.tied = False  # started through the parent-death wrapper (``deathsig.py``)
        self.back: anyio.Event | None = None  # set when a crash's restart ended (or gave up)
        self.ready_at: float | None = None
        self.restarts = 0
        self.crashes: deque[float] = deque()
        self.last_exit: dict[str, Any] | None = None
        self.error: str | None = None
        self.gpu_ids: tuple[str, ...] = ()
        self.argv: list[str] = []
        self.log = LogBuffer(log_size)
        self.lock = anyio.Lock()
        self.want_running = False
        self.start_scope: anyio.CancelScope | None = None
        self.backoff_scope: anyio.CancelScope | None = None
        self.output_done: anyio.Event | None = None  # set when its output is read to the end
        self.last_stop: dict[str, Any] | None = None  # the report of the last stop

    @property
    def recovering(self) -> bool:
        """Crashed, and waiting for its restart (the backoff, then the start): not serving."""
        return self.back is not None and not self.back.is_set()

    def command(self, snapshot: TelemetrySnapshot | None) -> tuple[list[str], dict[str, str]]:
        """The argv and environment of a start, pinned to the GPUs ``snapshot`` resolves
        (UUIDs where it knows them); records the pin."""
        gpus = cuda_devices(self.spec, snapshot)
        gpu = ",".join(gpus)
        argv = [render(a, port=self.port, gpu=gpu, name=self.name) for a in self.spec.command or ()]
        env = {
            **os.environ,
            **{
                k: render(v, port=self.port, gpu=gpu, name=self.name)
                for k, v in self.spec.env.items()
            },
        }
        env["CUDA_VISIBLE_DEVICES"] = gpu  # the pin: `gpu:` decides, `env:` cannot undo it
        if any(g.isdigit() for g in gpus):
            env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's indexes = NVML's
        env[MARKER] = self.name
        env[MARKER_UPSTREAM] = self.spec.upstream
        env.setdefault("PYTHONUNBUFFERED", "1")  # Python workers: logs as they happen
        self.gpu_ids = gpus
        return argv, env

    async def pump_log(self, proc: anyio.abc.Process, done: anyio.Event) -> None:
        """Copy the worker's output into its ring buffer (and ``logFile``) until it closes."""
        sink = None
        try:
            if self.spec.log_file:
                with contextlib.suppress(OSError):
                    sink = await anyio.open_file(self.spec.log_file, "a", encoding="utf-8")
            assert proc.stdout is not None
            try:
                async for chunk in proc.stdout:
                    lines = self.log.feed(chunk)
                    if sink is not None and lines:
                        await sink.write("".join(line + "\n" for line in lines))
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            lines = self.log.flush()
            if sink is not None and lines:
                await sink.write(lines[0] + "\n")
        finally:
            done.set()
            with anyio.CancelScope(shield=True):
                if sink is not None:
                    await sink.aclose()
                with anyio.move_on_after(self.spec.stop_timeout + AFTER_GRACE):
                    await proc.aclose()

    async def tail_file(self, path: str, pid: int) -> None:
        """Copy what a detached worker (``pid``) appends to its log file ``path`` into the ring
        buffer, while it is this worker's process (the file is the worker's own stdout)."""
        try:
            offset = (await anyio.Path(path).stat()).st_size
        except OSError:
            offset = 0
        while self.pid == pid:
            try:
                async with await anyio.open_file(path, "rb") as f:
                    await f.seek(offset)
                    data = await f.read(1 << 20)
            except OSError:
                data = b""
            if data:
                offset += len(data)
                self.log.feed(data)
            else:
                await anyio.sleep(TAIL_POLL)
