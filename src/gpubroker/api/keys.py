"""Who may use the api port, and the name each caller is shown by.

With ``apiKeys:`` configured, every request must bring one as ``Authorization: Bearer <key>``;
the caller is then that key's name, the only name ``/metrics`` uses as a label. The token is
compared with every key, each in constant time (``hmac.compare_digest``) and with no early
exit, so neither the time of a wrong guess nor the time of a right one tells which bytes or
which key matched. A key is never logged or shown: errors say only that it was missing or wrong.

Without keys anyone passes, and the caller is what the client calls itself
(``X-GPUBroker-Client``) or its address, as on the backends' own proxy ports
(:func:`gpubroker.proxy.caller.caller_of`).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from gpubroker.config.model import ApiKey
from gpubroker.errors import Unauthorized
from gpubroker.proxy.caller import caller_of

CHALLENGE = (b"www-authenticate", b'Bearer realm="gpubroker"')


class ApiKeys:
    """The configured keys (``config.api_keys``); no keys: an open port (loopback only)."""

    def __init__(self, keys: tuple[ApiKey, ...]) -> None:
        self._keys = tuple((k.key.encode(), k.name) for k in keys)
        self._models = {k.name: frozenset(k.models) for k in keys if k.models is not None}
        self.names = frozenset(k.name for k in keys)

    def caller(self, headers: list[tuple[bytes, bytes]], client: tuple[str, int] | None) -> str:
        """The caller's name; raises :class:`Unauthorized` for a missing or wrong key when keys
        are configured."""
        if not self._keys:
            return caller_of(headers, client)
        token = _bearer(headers)
        if token is None:
            raise Unauthorized(
                "this port needs an API key: send Authorization: Bearer <key>",
                headers=[CHALLENGE],
            )
        found: str | None = None
        for key, name in self._keys:  # every key, always: no early exit to time
            if hmac.compare_digest(token, key) and found is None:
                found = name
        if found is None:
            raise Unauthorized("the API key is not valid", headers=[CHALLENGE])
        return found

    def limited(self, caller: str) -> bool:
        """Whether ``caller``'s key may use only some models (``/proxy/`` cannot check it)."""
        return caller in self._models

    def allows(self, caller: str, model: str, *, aliases: Iterable[str] = ()) -> bool:
        """Whether ``caller`` may use ``model``: a key with ``models`` may use only those
        (listed by name or by any of ``aliases``, the model's other names); others, all."""
        allowed = self._models.get(caller)
        if allowed is None:
            return True
        return model in allowed or any(a in allowed for a in aliases)


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first ``Authorization: Bearer`` header (scheme in any case)."""
    for key, value in headers:
        if key == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None
