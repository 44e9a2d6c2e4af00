"""Parse and format the human units used in config files: durations and byte sizes."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_SCALE = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_SCALE = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "ti": 1024**4,
}


def parse_duration(value: object) -> float:
    """Seconds from ``10s``, ``2m``, ``1.5h``, ``250ms`` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 10s, 2m or 250ms")
    if isinstance(value, int | float):
        if not value >= 0:  # negative, or NaN (YAML's .nan)
            raise ValueError("a duration that is not negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_SCALE[m.group(2)]
    raise ValueError("a duration such as 10s, 2m or 250ms")


def parse_size(value: object) -> int:
    """Bytes from ``9GiB``, ``512MiB``, ``24GB`` or a bare number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size such as 9GiB or 512MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size that is not negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            unit = (m.group(2) or "").lower()
            return int(float(m.group(1)) * _SIZE_SCALE[unit])
    raise ValueError("a size such as 9GiB or 512MiB")


def format_size(nbytes: int | None) -> str:
    """``9.0 GiB`` style; ``?`` when unknown."""
    if nbytes is None:
        return "?"
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - unreachable


def format_duration(seconds: float) -> str:
    """``250ms``, ``12s``, ``2m``: the form a config file would use."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    return f"{seconds / 60:g}m"
