"""Every error gpubroker raises on purpose, in one tree.

    GPUBrokerError                 base: a one-line message fit for a terminal; ``exit_code``
    ├── ConfigError                a config file or env var is wrong (CLI exit code 2)
    ├── PluginError                a plugin failed to import or to register (exit code 2)
    ├── UsageError                 a command was used wrongly (exit code 2)
    ├── BrokerUnreachable          the CLI cannot reach a running broker (exit code 3)
    ├── AdminFailed                the broker answered the CLI, and said no (exit code 1)
    ├── WorkerError                a managed worker could not be started or stopped
    ├── TelemetryError             one GPU sample could not be read; the next may succeed
    ├── StrategyFailed             a strategy could not do what it was asked
    ├── ClientGone                 the client disconnected before its request body was complete
    └── ClientError                an answer to a client: ``status``, ``code``, ``retryable``
                                   (plus ``backend`` and ``headers``), rendered by
                                   ``gpubroker.responses`` as JSON, never a traceback

A ``ClientError`` reaches the client as ``{"error": code, "message": …, "backend": …,
"retryable": bool}``; ``retryable`` says the same request may succeed later. An upstream's own
4xx/5xx is never wrapped: it passes through untouched.

    400 bad_request            a target, framing or admin body the broker will not take
                               (BadTarget: a request target no router reads one way)
    401 unauthorized           an admin verb without the right Bearer token, or an api-port
                               request without a valid API key (``apiKeys``)
    403 forbidden              admin verbs are off: beyond loopback with no adminToken
    403 forbidden_host         the status port does not answer to that Host name (guard)
    403 forbidden_origin       a web page's Origin on a verb or WebSocket (guard)
    403 cors_refused           a CORS preflight (guard)
    403 model_forbidden        an api-port key limited to other models (``apiKeys: models``)
    404 unknown_backend        an admin verb named no backend we have
    404 unknown_worker         ... no managed worker we have
    404 not_managed            ... a backend that has no ``command:``
    404 no_supervisor          ... a worker, and this broker supervises none
    404 model_not_found        the api port knows no model by that name (naming the closest)
    404 unknown_path           the api port serves no such route
    405 method_not_allowed     CONNECT and TRACE (with Allow)
    408 request_timeout        the request body sent nothing for clientIdleTimeout
    409 swap_in_progress       an admin eviction while a plan runs on that GPU (retryable)
    413 body_too_large         a body on the api port over apiBodyLimit before its model
    415 unsupported_media_type an admin verb whose body is not application/json (guard)
    431 headers_too_large      a request head over 64 KiB
    500 internal_error         a status/admin route failed unexpectedly (the log says why)
    502 upstream_unreachable   the service refused or dropped the connection (retryable)
    502 bad_upstream_response  the service's response head was ambiguous or malformed (both
                               Content-Length and Transfer-Encoding, obs-fold lines): not
                               passed on
    502 load_failed            the service could not be made ready after a swap (retryable)
    503 queue_timeout          waited past queueTimeout for the GPU (retryable, Retry-After)
    503 shutting_down          the broker is stopping (retryable, Retry-After)
    503 worker_failed          its worker crashed and failed (retryable, Retry-After): it was
                               marked failed (or stopped) while the request waited for its
                               restart; the next request starts it afresh
    503 backend_removed        a reload removed the backend; it drains (retryable, Retry-After)
    504 upstream_timeout       no response headers within upstreamTimeout (retryable)
    507 never_fits             the request can never fit on its GPU
    508 loop_detected          the request already passed 4 brokers (an upstream loop)

load_failed, queue_timeout, shutting_down, worker_failed, backend_removed and never_fits are
the scheduler's refusals of a lease (:class:`Refused`). ``tests/test_errors.py`` holds the classes
to this table.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar, Protocol


class GPUBrokerError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with when this reaches it."""

    exit_code = 1


class ConfigError(GPUBrokerError):
    """A configuration problem, located as precisely as we can: file:line:col: key.path: why."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
        keypath: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        self.keypath = keypath
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        key = f"{self.keypath}: " if self.keypath else ""
        return f"{where}{key}{self.message}"


class PluginError(GPUBrokerError):
    exit_code = 2


class UsageError(GPUBrokerError):
    exit_code = 2


class BrokerUnreachable(GPUBrokerError):
    exit_code = 3


class AdminFailed(GPUBrokerError):
    """The broker answered, and said no (exit code 1)."""

    exit_code = 1


class WorkerError(GPUBrokerError):
    """A worker could not be started or stopped; one line saying why (the log's tail is in
    the worker's status, shown to admins only)."""


class TelemetryError(GPUBrokerError):
    """This sample could not be read (e.g. NVML's GPU-is-lost); the next one may succeed.

    The sampler keeps the GPUs it knew and reports their readings as unknown meanwhile.
    """


class StrategyFailed(GPUBrokerError):
    """A strategy could not do what it was asked; the message says what the service answered."""


class ClientGone(GPUBrokerError):
    """The client disconnected before its request body was complete."""


# --- what a client is answered ------------------------------------------------------------

Header = tuple[bytes, bytes]


class ClientError(GPUBrokerError):
    """An error the client gets as a JSON answer; the class says its status, code and whether
    the same request may succeed later. ``backend``: the backend it concerns (the proxy names
    its own when it answers); ``headers``: extra response headers (Retry-After, Allow…)."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, backend: str | None = None, headers: Iterable[Header] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.headers: list[Header] = list(headers)


class BadRequest(ClientError):
    status, code = 400, "bad_request"


class BadTarget(BadRequest):
    """The request target cannot be brought to one origin-form path safely."""


class Unauthorized(ClientError):
    status, code = 401, "unauthorized"


class Forbidden(ClientError):
    status, code = 403, "forbidden"


class ForbiddenHost(Forbidden):
    code = "forbidden_host"


class ForbiddenOrigin(Forbidden):
    code = "forbidden_origin"


class CorsRefused(Forbidden):
    code = "cors_refused"


class ModelForbidden(Forbidden):
    code = "model_forbidden"


class NotFound(ClientError):
    status, code = 404, "not_found"


class UnknownBackend(NotFound):
    code = "unknown_backend"


class UnknownWorker(NotFound):
    code = "unknown_worker"


class NotManaged(NotFound):
    code = "not_managed"


class NoSupervisor(NotFound):
    code = "no_supervisor"


class ModelNotFound(NotFound):
    code = "model_not_found"


class UnknownPath(NotFound):
    code = "unknown_path"


class MethodNotAllowed(ClientError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(ClientError):
    status, code = 408, "request_timeout"


class SwapInProgress(ClientError):
    """An admin eviction was asked for while a plan runs on the same GPU; try again soon."""

    status, code, retryable = 409, "swap_in_progress", True

    def __init__(self, target: str | None, *, backend: str | None = None) -> None:
        super().__init__(
            f"a swap to {target or 'nothing'} is in progress; try again shortly", backend=backend
        )


class BodyTooLarge(ClientError):
    status, code = 413, "body_too_large"


class UnsupportedMediaType(ClientError):
    status, code = 415, "unsupported_media_type"


class HeadersTooLarge(ClientError):
    status, code = 431, "headers_too_large"


class InternalError(ClientError):
    status, code = 500, "internal_error"


class UpstreamError(ClientError):
    """The upstream could not be reached, or broke the connection."""

    status, code, retryable = 502, "upstream_unreachable", True


class BadUpstreamResponse(UpstreamError):
    """The response head is ambiguous or malformed: passing it on could desynchronise a client.

    Both Content-Length and Transfer-Encoding, or an obs-fold continuation line, are how
    response splitting and smuggling start; RFC 9112 lets a client reject them, and a proxy
    must not forward them (it would frame the body one way while the next hop frames it another).
    """

    code, retryable = "bad_upstream_response", False


class UpstreamTimeout(UpstreamError):
    """The upstream did not send response headers in time, or went silent inside the body."""

    status, code = 504, "upstream_timeout"


class LoopDetected(ClientError):
    status, code = 508, "loop_detected"


class Refusal(Protocol):
    """What the scheduler answers a lease it will not grant (its ``Refuse`` effect)."""

    @property
    def backend(self) -> str: ...
    @property
    def status(self) -> int: ...
    @property
    def code(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def retry_after(self) -> float | None: ...


class Refused(ClientError):
    """The scheduler refused a lease; ``refusal`` is its answer. Build one with :meth:`of`,
    which picks the class by the refusal's code."""

    status, code, retryable = 503, "refused", True

    def __init__(self, refusal: Refusal) -> None:
        retry = refusal.retry_after
        headers = [(b"retry-after", str(round(retry)).encode())] if retry else []
        super().__init__(refusal.message, backend=refusal.backend, headers=headers)
        self.refusal = refusal

    @staticmethod
    def of(refusal: Refusal) -> Refused:
        for cls in Refused.__subclasses__():
            if cls.code == refusal.code:
                return cls(refusal)
        # A code this tree does not name (a plugin's, a newer scheduler's): its own status and
        # code, retryable as a 502/503/504 is.
        attrs = {
            "status": refusal.status,
            "code": refusal.code,
            "retryable": refusal.status in (502, 503, 504),
        }
        return type("Refused", (Refused,), attrs)(refusal)


class LoadFailed(Refused):
    status, code = 502, "load_failed"


class QueueTimeout(Refused):
    code = "queue_timeout"


class ShuttingDown(Refused):
    code = "shutting_down"


class WorkerDown(Refused):
    code = "worker_failed"


class BackendRemoved(Refused):
    code = "backend_removed"


class NeverFits(Refused):
    status, code, retryable = 507, "never_fits", False
