"""What a Host name is: one rule for the ``allowedHosts`` key and the status port's Host check.

Kept in ``config`` because the key is validated as the file loads; ``observe/guard.py`` applies
the very same functions to each request, so the two cannot disagree.
"""

from __future__ import annotations

import ipaddress
import re

_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")  # a DNS name or an IPv4 literal


def ip_literal(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """``localhost``, a ``*.localhost`` name (RFC 6761 keeps them on this machine) or a
    loopback address such as 127.0.0.1 or ::1."""
    name = host.lower().strip("[]").rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    ip = ip_literal(name)
    return ip is not None and ip.is_loopback


def split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header as (name, port): lower case, IPv6 without brackets, no trailing dot.
    None when it is not a host name, an IP literal or either with a port."""
    value = value.strip().lower()
    port: str | None = None
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or ip_literal(name) is None or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        name, colon, port_text = value.partition(":")
        port = port_text if colon else None
        name = name.removesuffix(".")
        if name and not _NAME.match(name):
            return None
    if port is not None:
        if not name or not port.isdigit() or not 0 < int(port) < 65536:
            return None
        return name, int(port)
    return name, None


def allowed_host_entry(entry: str) -> str:
    """One ``allowedHosts`` entry, normalised: a host name (``gpu.lan``), ``*.lan`` for its
    subdomains, or an IP address; no scheme, port or path (those belong to no Host check)."""
    text = entry.strip().lower()
    wildcard = text.startswith("*.")
    parsed = split_host(text[2:] if wildcard else text)
    if parsed is None or not parsed[0] or parsed[1] is not None:
        raise ValueError(
            'host names such as "gpu.lan", "*.lan" or "192.168.1.5" (no scheme, port or path)'
        )
    return f"*.{parsed[0]}" if wildcard else parsed[0]
