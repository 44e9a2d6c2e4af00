"""Two small parts of a managed worker, apart from its state machine: the ring buffer that keeps
its output, and the backoff that paces its restarts after a crash."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

LOG_LINES = 2000  # lines kept per worker
TAIL_LINES = 15  # lines shown with a failure (to admins)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Restart delays: ``first * factor ** (n - 1)`` capped at ``limit``; ``max_crashes`` exits
    within ``window`` seconds mark the worker failed."""

    first: float = 1.0
    factor: float = 2.0
    limit: float = 30.0
    max_crashes: int = 5
    window: float = 120.0

    def delay(self, crashes: int) -> float:
        return min(self.limit, self.first * self.factor ** max(0, crashes - 1))


class LogBuffer:
    """The last ``size`` lines of a worker's output, each with a sequence number for ``-f``."""

    def __init__(self, size: int = LOG_LINES) -> None:
        self._lines: deque[tuple[int, str]] = deque(maxlen=size)
        self._partial = b""
        self.next = 0

    def add(self, line: str) -> None:
        self._lines.append((self.next, line))
        self.next += 1

    def feed(self, data: bytes) -> list[str]:
        """Add the complete lines in ``data``; return them."""
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        if len(self._partial) > 64 * 1024:  # a runaway line without a newline
            complete.append(self._partial)
            self._partial = b""
        lines = [c.rstrip(b"\r").decode("utf-8", "replace") for c in complete]
        for line in lines:
            self.add(line)
        return lines

    def flush(self) -> list[str]:
        rest, self._partial = self._partial, b""
        if not rest:
            return []
        line = rest.rstrip(b"\r").decode("utf-8", "replace")
        self.add(line)
        return [line]

    def since(self, seq: int, limit: int = LOG_LINES) -> tuple[list[str], int]:
        """Lines numbered ``seq`` and later (at most ``limit``), and the number to ask next."""
        lines = [(n, text) for n, text in self._lines if n >= seq][:limit]
        return [text for _, text in lines], (lines[-1][0] + 1 if lines else max(seq, 0))

    def tail(self, n: int = TAIL_LINES) -> list[str]:
        return [text for _, text in list(self._lines)[-n:]]
