"""``serve --watch-config``: reload when the config file's contents change (no new dependency:
a look at its modification time and size about once a second, in a thread, and its contents
read only when those moved, so an editor that rewrites the same bytes changes nothing)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

log = logging.getLogger("gpubroker.runtime.watch")

WATCH_INTERVAL = 1.0


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None  # mid-save (an editor's rename), or gone: look again next time
    return st.st_mtime_ns, st.st_size


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


async def watch_config(
    path: Path,
    reload: Callable[[], Awaitable[dict[str, Any]]],
    *,
    interval: float = WATCH_INTERVAL,
) -> None:
    """Call ``reload`` each time ``path``'s contents change, until cancelled (the reload
    itself logs what changed, or why the file was refused)."""
    seen = await anyio.to_thread.run_sync(_stat, path)
    digest = await anyio.to_thread.run_sync(_digest, path)
    while True:
        await anyio.sleep(interval)
        now = await anyio.to_thread.run_sync(_stat, path)
        if now is None or now == seen:
            continue
        seen = now
        current = await anyio.to_thread.run_sync(_digest, path)
        if current is None or current == digest:
            continue
        digest = current
        log.info("%s changed: reloading", path)
        await reload()
