"""How ``gpubroker serve`` writes its log: today's human lines, or one JSON object per line.

JSON (``serve --log-format json``) is for log shippers (journald, Loki, a Kubernetes node's
collector): every line of stderr is one object, ``{"time", "level", "logger", "event", ...}``,
``time`` in ISO 8601 UTC with milliseconds, ``level`` lower case, ``event`` the message. What a
log call passes in ``extra=`` (``backend``, ``unit``, ``model``, ``swap``, ``phase``,
``duration_ms``...) is added in camelCase, as ``/events`` names fields (``durationMs``), and
``requestId`` where a request is being served: the
lease id that status, ``/events`` (``request``) and the ``X-GPUBroker-*`` headers know it by,
read from :data:`request_id`, which the broker sets for the task that holds the lease.

In JSON mode whatever else reaches stderr (the start-up summary ``serve`` echoes, a library's
stray print) is turned into records of the ``gpubroker.stderr`` logger by
:class:`_LinesToLog`, so a shipper never meets a line that is not JSON; an exception nobody
caught (in any thread) is one record of ``gpubroker.crash`` with its traceback.

The bottom of the house: imports nothing of gpubroker's.
"""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")

request_id: ContextVar[int | str | None] = ContextVar("gpubroker_request_id", default=None)
"""The request a log call is made for (its lease id), where one is being served."""

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
TEXT_DATEFMT = "%H:%M:%S"
QUIET = ("httpx", "httpcore", "hypercorn.access")  # a line per request: warnings only

_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; ``extra=`` fields follow the four fixed ones."""

    def format(self, record: logging.LogRecord) -> str:
        at = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "time": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            out["requestId"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key != "request_id":
                out.setdefault(_camel(key), value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(out, default=str, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError):  # NaN, a key JSON cannot name, a cycle: as text
            return json.dumps({k: _plain(v) for k, v in out.items()}, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """``value`` as strict JSON holds it, else its ``str``: a log line must always parse."""
    try:
        json.dumps(value, default=str, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


class _LinesToLog(io.TextIOBase):
    """A stand-in for ``sys.stderr`` in JSON mode: each write that ends a line becomes one
    record (a multi-line write stays one record); the handler writes to the real stream."""

    def __init__(self, real: TextIO) -> None:
        self._real = real
        self._buffer = ""
        self._log = logging.getLogger("gpubroker.stderr")
        self._inside = threading.local()

    def write(self, text: str) -> int:
        if getattr(self._inside, "busy", False):
            # Written while logging a line: the handler's own error report (its stream broke).
            # Straight to the real stream, whose OSError logging ignores: never round again.
            return self._real.write(text)
        self._inside.busy = True
        try:
            self._buffer += text
            if self._buffer.endswith("\n"):
                message, self._buffer = self._buffer.rstrip("\n"), ""
                if message.strip():
                    self._log.info(message)
        finally:
            self._inside.busy = False
        return len(text)

    def flush(self) -> None:
        self._real.flush()

    def fileno(self) -> int:
        return self._real.fileno()

    def isatty(self) -> bool:
        return False


def _crashed(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """JSON mode: an exception nobody caught is one record, its traceback in ``exception``
    (Python's own hook writes it line by line, a record per line)."""
    logging.getLogger("gpubroker.crash").critical(
        "unhandled %s: %s", kind.__name__, exc, exc_info=(kind, exc, tb)
    )


def _thread_crashed(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("gpubroker.crash").error(
        "thread %s: unhandled %s: %s", name, args.exc_type.__name__, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )  # fmt: skip


def configure(*, verbose: bool = False, fmt: LogFormat = "text") -> None:
    """Set up the root logger for ``serve`` (once: a process that has handlers keeps them)."""
    root = logging.getLogger()
    if not root.handlers:
        real = sys.stderr
        handler = logging.StreamHandler(real)
        handler.setFormatter(
            JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT, TEXT_DATEFMT)
        )
        root.addHandler(handler)
        if fmt == "json":
            sys.stderr = _LinesToLog(real)
            sys.excepthook = _crashed
            threading.excepthook = _thread_crashed
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
