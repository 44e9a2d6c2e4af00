"""Who asks: the name a request's caller is shown by, when no API key names it.

A client may name itself with ``X-GPUBroker-Client`` (a batch job, a script, an app); else the
caller is its address. The header is the client's word and is only shown (status, ``/events``):
it is trimmed, at most ``MAX_CLIENT_NAME`` printable ASCII characters, and ignored otherwise,
so a status page or a terminal never prints what a client smuggled in. ``/metrics`` never uses
it as a label (its cardinality is the client's to choose).
"""

from __future__ import annotations

CLIENT_HEADER = b"x-gpubroker-client"
MAX_CLIENT_NAME = 64
UNKNOWN_CALLER = "unknown"  # no header and no address (a Unix socket, an in-process test)


def client_name(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The ``X-GPUBroker-Client`` name, or None when absent or not fit to show."""
    for key, value in headers:
        if key == CLIENT_HEADER:
            name = value.strip()
            if 0 < len(name) <= MAX_CLIENT_NAME and all(0x20 <= c < 0x7F for c in name):
                return name.decode("ascii")
            return None
    return None


def caller_of(headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None) -> str:
    """The caller as shown: the client's own name for itself, else its address."""
    name = client_name(headers)
    if name is not None:
        return name
    return client[0] if client else UNKNOWN_CALLER
