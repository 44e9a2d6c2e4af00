"""Who may use the status port's admin verbs: one rule for ``/api/unload``, ``/api/swap`` and
the ``/api/workers`` verbs.

With an ``adminToken`` a verb needs ``Authorization: Bearer <token>`` (the scheme is
case-insensitive, RFC 9110 §11.1; the token is compared in constant time). Without one, verbs
are open on a loopback port and refused outright when the port binds beyond loopback.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from gpubroker.config.hosts import is_loopback
from gpubroker.config.model import Config
from gpubroker.errors import ClientError, Forbidden, Unauthorized


class AdminGate:
    """The admin rule of one status port."""

    def __init__(self, config: Config) -> None:
        self.token = config.admin_token
        self.open = self.token is None and is_loopback(config.bind)

    def refusal(self, request: Request) -> ClientError | None:
        """None when ``request`` may use admin verbs, else the error that says why not."""
        if self.open:
            return None
        if self.token is None:
            return Forbidden(
                "admin verbs are off: the status port binds beyond "
                "loopback and no adminToken is set"
            )
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        matches = hmac.compare_digest(given.strip().encode("latin-1"), self.token.encode())
        if scheme.lower() != "bearer" or not matches:
            return Unauthorized("admin verbs need Authorization: Bearer <adminToken>")
        return None

    def allows(self, request: Request) -> bool:
        return self.refusal(request) is None

    def check(self, request: Request) -> None:
        """Raise the 401/403 unless ``request`` may use admin verbs."""
        if (denied := self.refusal(request)) is not None:
            raise denied
