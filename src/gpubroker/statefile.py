"""Small JSON files the broker keeps under its state directory, and the one way they are written.

:func:`write_atomic` replaces a file so that a crash mid-write leaves the old file or the new one
(temp file in the same directory, fsync, rename, fsync of the directory); :func:`read_json`
reads one back, bounded, saying why it was ignored rather than raising. The learned footprints
(``scheduling/footprints.py``) and the state file below both use them.

:class:`StateFile` is ``state.json``: what a restart must not forget beyond the footprints.
Each owner keeps its own *section* (``broker``: the swap history and the counters users watch;
``metrics``: the counters only ``/metrics`` holds; ``workers``: the managed workers this broker
started, so that after a crash the next start adopts or stops them). An owner reads what the
last run left in ``section.loaded`` at start, names a provider of its current data, and calls
``changed()`` when it changed; a writer task saves at most once per ``DEBOUNCE`` (the data is
gathered on the event loop, encoded and written in a thread), and every owner saves once more as
it stops. The file is a memory, never a source of truth: missing is normal, corrupt or of
another version is one log line and an empty memory, a disk that refuses the write is one log
line (the broker serves on).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard

import anyio
import anyio.to_thread

log = logging.getLogger("gpubroker.statefile")

FILE_NAME = "state.json"
VERSION = 1
DEBOUNCE = 1.0  # seconds: changes within this are written once
MAX_FILE = 4 * 2**20  # bytes: a state file is a few KiB; a larger one is not ours


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: a crash leaves the old file or the new one.

    The directory is made (0700) where missing; the file is 0600. Blocking: run it in a thread.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0o600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows
        dirfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def read_json(path: Path, max_bytes: int = MAX_FILE) -> tuple[Any, str | None]:
    """The JSON in ``path`` and why it was not read (None: it was, or there is no file: then
    the value is None too). Blocking: run it in a thread."""
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    if len(raw) > max_bytes:
        return None, f"larger than {max_bytes // 2**20} MiB"
    try:
        return json.loads(raw), None
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not JSON: {exc}"
    except RecursionError:  # nested deeper than the parser goes: no file of ours
        return None, "not JSON: nested too deep"


def is_time(value: object) -> TypeGuard[int | float]:
    """A finite number of seconds (not a bool), as the files keep times."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Section:
    """One owner's part of the state file."""

    def __init__(self, owner: StateFile, name: str) -> None:
        self._owner = owner
        self.name = name
        self.provider: Callable[[], Any] | None = None

    @property
    def loaded(self) -> Any:
        """What the last run saved here (None: nothing, or the file was ignored)."""
        return self._owner.loaded.get(self.name)

    def provide(self, fn: Callable[[], Any]) -> None:
        """``fn`` returns this section's current data, JSON-ready, at each save."""
        self.provider = fn

    def changed(self, *, urgent: bool = False) -> None:
        self._owner.changed(urgent=urgent)


class StateFile:
    """``state.json`` in the state directory (``path`` None: in memory only)."""

    def __init__(self, path: Path | None, *, debounce: float = DEBOUNCE) -> None:
        self.path = path
        self.debounce = debounce
        self.loaded: dict[str, Any] = {}
        self.sections: dict[str, Section] = {}
        self._dirty = anyio.Event()
        self._urgent = anyio.Event()
        self._lock = anyio.Lock()
        self._logged: set[tuple[int | None, str | None]] = set()

    @classmethod
    def in_dir(cls, directory: Path) -> StateFile:
        return cls(directory / FILE_NAME)

    def section(self, name: str) -> Section:
        if name not in self.sections:
            self.sections[name] = Section(self, name)
        return self.sections[name]

    async def load(self) -> None:
        """Read what the last run left; a bad file is one warning and an empty memory."""
        if self.path is None:
            return
        data, problem = await anyio.to_thread.run_sync(read_json, self.path)
        if problem is None and data is not None:
            if not isinstance(data, dict) or not isinstance(data.get("sections"), dict):
                problem = "not a gpubroker state file"
            elif data.get("version") != VERSION:
                problem = f"version {data.get('version')!r}, this gpubroker reads {VERSION}"
        if problem is not None:
            log.warning("state file %s ignored (%s); it is rewritten at the next save", self.path,
                        problem)  # fmt: skip
            return
        if data is not None:
            self.loaded = dict(data["sections"])

    def changed(self, *, urgent: bool = False) -> None:
        """Something worth keeping changed: the writer saves within ``debounce`` (at once when
        ``urgent``: a worker spawned or gone, which a crash right after must not lose)."""
        if urgent:
            self._urgent.set()
        self._dirty.set()

    async def keep_saved(self) -> None:
        """The writer: save at most once per ``debounce`` while there are changes (until
        cancelled; owners save once more as they stop)."""
        while True:
            await self._dirty.wait()
            with anyio.move_on_after(self.debounce):
                await self._urgent.wait()  # an urgent change cuts the wait short
            await self.save()

    async def save(self) -> None:
        """Write every section now (in a thread); never raises for the disk's sake."""
        self._dirty, self._urgent = anyio.Event(), anyio.Event()
        if self.path is None:
            return
        async with self._lock:
            body: dict[str, Any] = dict(self.loaded)  # sections nobody provides this run stay
            for name, section in self.sections.items():
                if section.provider is not None:
                    body[name] = section.provider()
            doc = {"version": VERSION, "savedAt": time.time(), "sections": body}
            try:
                await anyio.to_thread.run_sync(_encode_and_write, self.path, doc)
            except (OSError, TypeError, ValueError) as exc:
                seen = (getattr(exc, "errno", None), str(exc))
                if seen not in self._logged:
                    self._logged.add(seen)
                    log.warning("state not saved to %s: %s (kept in memory)", self.path, exc)
                self._dirty.set()
            else:
                self._logged.clear()


def _encode_and_write(path: Path, doc: dict[str, Any]) -> None:
    write_atomic(path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
