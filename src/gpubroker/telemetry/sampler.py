"""Picking the telemetry source at start-up, and taking bounded samples from it.

One sample is taken per interval and shared by everyone who asks (status, metrics, the
scheduler's measured sizes); nobody triggers a driver call of their own. A sample that fails or
hangs never raises here: the GPUs last seen are kept with unknown readings and the reason.
Samples never overlap: who asks while one is being taken gets that one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

import anyio

from gpubroker.telemetry.base import GpuSample, TelemetrySnapshot, TelemetrySource

log = logging.getLogger("gpubroker.telemetry")

SAMPLE_TIMEOUT = 5.0  # seconds for one sample before it counts as failed

T = TypeVar("T")


@dataclass(eq=False)
class _Flight(Generic[T]):
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: tuple[T] | None = None  # set when the call returned


class SingleFlight(Generic[T]):
    """Calls ``fn`` one at a time: who calls while a call is in progress awaits its result.

    A call that ends without a result (its caller was cancelled, or it raised) is not shared:
    those still waiting start a new one, so one caller's cancellation never becomes another's.
    """

    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self._fn = fn
        self._current: _Flight[T] | None = None

    async def __call__(self) -> T:
        while (current := self._current) is not None:
            await current.done.wait()
            if current.outcome is not None:
                return current.outcome[0]
        flight: _Flight[T] = _Flight()
        self._current = flight
        try:
            flight.outcome = (await self._fn(),)
        finally:
            self._current = None
            flight.done.set()
        return flight.outcome[0]


def unknown_like(previous: TelemetrySnapshot, error: str) -> TelemetrySnapshot:
    """The GPUs of ``previous`` with every reading unknown: what a failed sample reports."""
    gpus = tuple(GpuSample(uuid=g.uuid, index=g.index, name=g.name) for g in previous.gpus)
    return TelemetrySnapshot(taken_at=time.time(), gpus=gpus, notice=previous.notice, error=error)


class Sampler:
    """Bounded samples from one source; ``latest`` is the shared snapshot."""

    def __init__(
        self,
        source: TelemetrySource,
        *,
        notice: str | None = None,
        timeout: float = SAMPLE_TIMEOUT,
    ) -> None:
        self.source = source
        self.timeout = timeout
        self.latest = TelemetrySnapshot(taken_at=time.time(), notice=notice)
        self._notice = notice
        self._flight = SingleFlight(self._take)

    async def sample(self) -> TelemetrySnapshot:
        """Take a sample (never raises); it becomes ``latest``.

        While one is being taken, callers get that one rather than a second call to the source
        (NVML would fail it: it reads one call at a time). A sample once started runs to its
        end, ``timeout`` s at most, even when the caller that started it is cancelled: others
        may be waiting for it, and an abandoned driver read would fail the next sample too.
        """
        return await self._flight()

    async def _take(self) -> TelemetrySnapshot:
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(self.timeout):
                snap = await self.source.sample()
        except TimeoutError:
            snap = unknown_like(self.latest, f"{self.source.name}: no answer in {self.timeout:g}s")
        except Exception as exc:  # TelemetryError, or a plugin's bug: report, keep sampling
            snap = unknown_like(self.latest, f"{exc}" or type(exc).__name__)
        if snap.error and snap.error != self.latest.error:
            log.warning("telemetry: %s", snap.error)
        elif self.latest.error and not snap.error:
            log.info("telemetry: readings are back")
        if self._notice:  # why we run without the source that was wanted outranks its own note
            snap = replace(snap, notice=self._notice)
        self.latest = snap
        return snap

    async def close(self) -> None:
        with anyio.move_on_after(self.timeout, shield=True):
            await self.source.close()
