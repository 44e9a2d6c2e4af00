"""Learned footprints: how many bytes each unit (or ComfyUI model file) took, kept across restarts.

The broker learns a footprint when telemetry measures a unit; the next time it starts, the book
gives that size before anything is measured, so the first placement already knows it. The file
is small JSON, ``{"version": 1, "footprints": {key: {"bytes": n, "at": unix_time}}}``, written
atomically by ``statefile.write_atomic`` (temp file in the same directory, fsync, rename), so a
crash mid-write leaves the previous file. The book is a cache, never a source of truth: a
missing file is normal, a corrupt or unreadable one is one warning and an empty book, and a
disk that refuses the write is logged, never raised (the broker serves on with what it has
in memory).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import anyio
import anyio.to_thread

from gpubroker.config.load import state_path
from gpubroker.config.model import Config
from gpubroker.statefile import is_time, read_json, write_atomic

log = logging.getLogger("gpubroker.scheduling.footprints")

FILE_NAME = "footprints.json"
VERSION = 1
STALE_AFTER = 90 * 86400.0  # seconds: a footprint not seen for this long is forgotten on load
REFRESH_AFTER = 86400.0  # seconds: the same size seen again re-dates its entry after this long
MAX_BYTES = 16 * 2**40  # no GPU holds 16 TiB: a larger number is a corrupt file, not a model
MAX_FILE = 4 * 2**20  # bytes: a footprints file is a few KiB; a larger one is not ours


@dataclass(frozen=True, slots=True)
class _Entry:
    nbytes: int
    at: float  # wall-clock seconds when it was last recorded


def _valid_bytes(n: object) -> TypeGuard[int]:
    return isinstance(n, int) and not isinstance(n, bool) and 0 < n <= MAX_BYTES


class FootprintBook:
    """Learned footprints (bytes) by key (a unit name, or "comfyui:<file>"), kept in a file."""

    def __init__(self, path: Path | None, *, clock: Callable[[], float] = time.time) -> None:
        """``path`` None: in memory only (load and save do nothing)."""
        self.path = path
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._dirty = False
        self._lock = anyio.Lock()  # one write in flight; the next save waits, then writes once
        self._logged: set[tuple[int | None, str | None]] = set()  # write errors already told

    @classmethod
    def for_config(cls, config: Config, env: Mapping[str, str]) -> FootprintBook:
        """The book in the config's state directory (``stateDir``, else the XDG one:
        :func:`~gpubroker.config.load.state_path`)."""
        return cls(state_path(config, env) / FILE_NAME)

    # --- in memory ---------------------------------------------------------------------------

    def get(self, key: str) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.nbytes

    def items(self) -> dict[str, int]:
        """Every footprint, key -> bytes (a copy)."""
        return {k: e.nbytes for k, e in self._entries.items()}

    def record(self, key: str, nbytes: int) -> None:
        """Learn that ``key`` takes ``nbytes``; anything but a positive size is ignored.

        The same size seen again changes nothing (so a save finds nothing to write) unless its
        entry is over a day old, when it is re-dated to keep it from going stale.
        """
        if not key or not _valid_bytes(nbytes):
            return
        now = self._clock()
        old = self._entries.get(key)
        if old is not None and old.nbytes == nbytes and now - old.at < REFRESH_AFTER:
            return
        self._entries[key] = _Entry(nbytes, now)
        self._dirty = True

    @property
    def dirty(self) -> bool:
        """Something was learned since the last successful save."""
        return self._dirty

    # --- the file ----------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the file (in a thread). Entries recorded before it are kept over the file's."""
        if self.path is None:
            return
        path = self.path
        loaded, problem = await anyio.to_thread.run_sync(_read, path, self._clock())
        if problem is not None:
            log.warning(
                "footprints file %s ignored (%s); it is rewritten at the next save", path, problem
            )
        self._entries = {**loaded, **self._entries}

    async def save(self) -> None:
        """Write the file (in a thread) if anything changed; never raises for the disk's sake.

        Called as often as footprints are learned: while one write runs, later calls wait for
        it and then write once more only if something was recorded meanwhile.
        """
        if self.path is None:
            self._dirty = False
            return
        if not self._dirty:
            return
        async with self._lock:
            if not self._dirty:  # the write we waited for took our record with it
                return
            data = _encode(self._entries)
            self._dirty = False
            try:
                await anyio.to_thread.run_sync(write_atomic, self.path, data)
            except OSError as exc:
                self._dirty = True  # the next save tries again
                seen = (exc.errno, exc.strerror)
                if seen not in self._logged:
                    self._logged.add(seen)
                    log.warning(
                        "footprints not saved to %s: %s (kept in memory; they are re-learned)",
                        self.path,
                        exc,
                    )
            else:
                self._logged.clear()  # a later failure is news again


def _encode(entries: Mapping[str, _Entry]) -> bytes:
    body = {
        "version": VERSION,
        "footprints": {k: {"bytes": e.nbytes, "at": e.at} for k, e in sorted(entries.items())},
    }
    return (json.dumps(body, indent=1) + "\n").encode()


def _read(path: Path, now: float) -> tuple[dict[str, _Entry], str | None]:
    """The file's fresh entries, and why it was ignored (None: it was fine or absent).

    Blocking: run it in a worker thread.
    """
    data, problem = read_json(path, MAX_FILE)
    if problem is not None or data is None:
        return {}, problem
    try:
        entries = _parse(data)
    except ValueError as exc:
        return {}, str(exc)
    return {k: e for k, e in entries.items() if now - e.at <= STALE_AFTER}, None


def _parse(data: Any) -> dict[str, _Entry]:
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("version") != VERSION:
        raise ValueError(f"version {data.get('version')!r}, this gpubroker reads {VERSION}")
    footprints = data.get("footprints")
    if not isinstance(footprints, dict):
        raise ValueError('"footprints" is not an object')
    out: dict[str, _Entry] = {}
    for key, entry in footprints.items():
        if not key or not isinstance(entry, dict):
            raise ValueError(f"entry {key!r} is not an object")
        nbytes, at = entry.get("bytes"), entry.get("at")
        if not _valid_bytes(nbytes):
            raise ValueError(f"entry {key!r}: bytes {nbytes!r} is not a size in 1..16 TiB")
        if not is_time(at):
            raise ValueError(f"entry {key!r}: at {at!r} is not a time")
        out[key] = _Entry(nbytes, float(at))
    return out
