"""Who is asking on the api port (a stub with the agreed interface: every caller allowed).

The keys helper's ``apiKeys:`` implementation replaces this file; the api app calls only
``ApiKeys(keys)``, ``caller(headers, client)`` and ``allows(caller, model)``.
"""

from __future__ import annotations

from typing import Any

CLIENT_HEADER = b"x-gpubroker-client"


class ApiKeys:
    """No keys configured: the caller is ``X-GPUBroker-Client``, else the client address."""

    def __init__(self, keys: tuple[Any, ...] = ()) -> None:
        self.keys = keys

    def caller(self, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None) -> str:
        for name, value in headers:
            if name == CLIENT_HEADER and value:
                return value.decode("latin-1")
        return client[0] if client else "unknown"

    def allows(self, caller: str, model: str) -> bool:
        return True
