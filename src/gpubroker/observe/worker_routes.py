"""Admin routes for managed workers, on the status port (for ``gpubroker workers …``).

    GET  /api/workers                  every managed worker: state, PID, GPU, uptime, restarts,
                                       VRAM, warnings; its command and log tail for admins
    GET  /api/workers/{name}/logs      its captured output (?since=N&limit=M; admin)
    POST /api/workers/start            {"name": …} or {"all": true}
    POST /api/workers/stop             {"name": …}, {"all": true} or {"pid": N}; "force" skips
                                       the drain of in-flight requests
    POST /api/workers/restart          {"name": …}
    POST /api/workers/ensure           {"name": …} or {"all": true}: start what is not ready

Verbs go through the scheduler, so it stays truthful: a start is a swap to the worker (what must
make room is freed first, per policy), a stop is an unload (in-flight requests drain first,
unless ``force``) followed by stopping the process. Each verb answers 200 with ``ok`` and a
result per worker; an unknown name is 404, a malformed body 400, a body that is not
``application/json`` 415 (the status port's guard, so no web page can send one). POSTs and logs
pass the status port's admin gate (``admin.py``, the rule of ``/api/unload``): a worker's
output, and its command line, may show its secrets. For the same reason ``GET /api/workers``
stays open but tells only an authorised caller a worker's ``command`` and ``logTail``
(``"admin": true`` says it did).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gpubroker.errors import (
    BadRequest,
    NoSupervisor,
    NotManaged,
    Refused,
    SwapInProgress,
    UnknownWorker,
    WorkerError,
)
from gpubroker.responses import json_object
from gpubroker.scheduling.broker import Broker, Grant
from gpubroker.workers.supervisor import LOG_LINES, Supervisor, WorkerState

if TYPE_CHECKING:
    from gpubroker.observe.admin import AdminGate
    from gpubroker.observe.readmodel import StatusView
    from gpubroker.observe.schema import WorkerJson


class WorkersApi:
    """The routes: verbs through ``broker``, callers checked by the status port's ``gate``,
    the workers listed from the status app's ``view`` (one read model)."""

    def __init__(self, broker: Broker, gate: AdminGate, view: Callable[[], StatusView]) -> None:
        self.broker = broker
        self.gate = gate
        self.view = view

    @property
    def supervisor(self) -> Supervisor | None:
        return self.broker.supervisor

    def routes(self) -> list[Route]:
        return [
            Route("/api/workers", self.list_, methods=["GET"]),
            Route("/api/workers/{name}/logs", self.logs, methods=["GET"]),
            Route("/api/workers/start", self.start, methods=["POST"]),
            Route("/api/workers/stop", self.stop, methods=["POST"]),
            Route("/api/workers/restart", self.restart, methods=["POST"]),
            Route("/api/workers/ensure", self.ensure, methods=["POST"]),
        ]

    # --- helpers --------------------------------------------------------------------------

    def _check(self, name: object) -> str:
        """``name`` if it is a managed worker; else raises the error that says what it is."""
        sup = self.supervisor
        managed = list(sup.workers) if sup else []
        known = ", ".join(managed) or "none: give a backend `command:`"
        if not isinstance(name, str) or not name:
            raise BadRequest('name a worker: {"name": …} or {"all": true}')
        if sup is not None and name in sup.workers:
            return name
        if name in self.broker.sched.slots:
            raise NotManaged(
                f"{name} is not a managed worker (it has no `command:`); managed: {known}",
                backend=name,
            )
        raise UnknownWorker(f"no managed worker named {name!r} ({known})", backend=name)

    async def _names(self, request: Request, *, allow_all: bool = True) -> list[str]:
        """The workers an admin verb's body names (raises for a caller or body we refuse)."""
        self.gate.check(request)
        return self._targets(await json_object(request), allow_all=allow_all)

    def _targets(self, data: dict[str, Any], *, allow_all: bool) -> list[str]:
        if data.get("all") is True and allow_all:
            if "name" in data:
                raise BadRequest('give "name" or "all", not both')
            return list(self.supervisor.workers) if self.supervisor else []
        return [self._check(data.get("name"))]

    def _workers(self, *, admin: bool) -> list[WorkerJson]:
        """Each worker as the supervisor knows it, with the VRAM it holds and its pinning
        warning (the status app's read model: one reading of the GPUs, one rule)."""
        return self.view().workers_json(admin=admin)

    def _reply(self, results: list[dict[str, Any]]) -> Response:
        """The answer to a verb (only authorised callers get one)."""
        return JSONResponse(
            {
                "ok": all(r["ok"] for r in results),
                "results": results,
                "workers": self._workers(admin=True),
            }
        )

    def _result(self, name: str, ok: bool, message: str, **extra: Any) -> dict[str, Any]:
        sup = self.supervisor
        state = sup.workers[name].state.value if sup and name in sup.workers else None
        return {"name": name, "ok": ok, "state": state, "message": message, **extra}

    # --- the verbs, one worker at a time --------------------------------------------------

    async def _start_one(self, name: str) -> dict[str, Any]:
        sup = self.supervisor
        assert sup is not None
        try:
            grant = await preload(self.broker, sup, name)  # its load effect starts the process
        except Refused as exc:
            return self._result(
                name, False, exc.refusal.message, logTail=sup.workers[name].log.tail()
            )
        except WorkerError as exc:
            return self._result(name, False, str(exc), logTail=sup.workers[name].log.tail())
        evicted = list(grant.swap.evicted) if grant.swap else []
        w = sup.workers[name]
        note = f" (evicted {', '.join(evicted)})" if evicted else ""
        return self._result(name, True, f"{name} is ready, pid {w.pid}{note}", evicted=evicted)

    async def _stop_one(self, name: str, force: bool) -> dict[str, Any]:
        sup = self.supervisor
        assert sup is not None
        before = sup.workers[name].last_stop
        try:
            await self.broker.evict(name, force=force)  # drain, then the strategy's unload
            report = await sup.stop(name)  # (the process strategy's unload stopped it already)
            if not report["stopped"] and sup.workers[name].last_stop is not before:
                report = sup.workers[name].last_stop or report
        except SwapInProgress as exc:
            return self._result(name, False, str(exc))
        except WorkerError as exc:
            return self._result(name, False, str(exc))
        return self._result(name, True, _stopped(name, report), report=report)

    # --- routes ---------------------------------------------------------------------------

    async def list_(self, request: Request) -> Response:
        admin = self.gate.allows(request)
        return JSONResponse({"admin": admin, "workers": self._workers(admin=admin)})

    async def logs(self, request: Request) -> Response:
        self.gate.check(request)
        name = self._check(request.path_params["name"])
        try:
            since = int(request.query_params.get("since", "-1"))
            limit = int(request.query_params.get("limit", str(LOG_LINES)))
        except ValueError:
            raise BadRequest("since and limit must be integers") from None
        assert self.supervisor is not None
        w = self.supervisor.workers[name]
        if since < 0:  # the last `limit` lines
            since = max(0, w.log.next - limit)
        lines, next_ = w.log.since(since, max(1, limit))
        return JSONResponse(
            {
                "name": name,
                "state": w.state.value,
                "lines": lines,
                "next": next_,
                "file": w.spec.log_file,
            }
        )

    async def start(self, request: Request) -> Response:
        names = await self._names(request)
        return self._reply([await self._start_one(n) for n in names])

    async def ensure(self, request: Request) -> Response:
        names = await self._names(request)
        sup = self.supervisor
        results = []
        for n in names:
            if sup is not None and sup.workers[n].state is WorkerState.READY:
                results.append(self._result(n, True, f"{n} was already ready", started=False))
            else:
                results.append({**await self._start_one(n), "started": True})
        # under `exclusive`, a later start may have stopped an earlier one: report the truth
        for r in results:
            state = sup.workers[r["name"]].state if sup is not None else None
            if r["ok"] and state is not WorkerState.READY:
                r.update(
                    ok=False,
                    state=state.value if state else None,
                    message=f"{r['name']} was stopped again to make room for another worker "
                    f"(policy {self.broker.config.policy})",
                )
        return self._reply(results)

    async def stop(self, request: Request) -> Response:
        self.gate.check(request)
        data = await json_object(request)
        force = data.get("force", False) is True
        if "pid" in data:
            return await self._stop_pid(data)
        names = self._targets(data, allow_all=True)
        return self._reply([await self._stop_one(n, force) for n in names])

    async def _stop_pid(self, data: dict[str, Any]) -> Response:
        pid = data.get("pid")
        if "name" in data or "all" in data:
            raise BadRequest('give "pid" alone, not with "name" or "all"')
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise BadRequest("pid must be a positive integer")
        sup = self.supervisor
        if sup is None:
            raise NoSupervisor("this broker has no supervisor running")
        owner = await sup.owner_of(pid)
        if owner is not None:
            result = await self._stop_one(owner, force=False)
            return self._reply([{**result, "pid": pid}])
        try:
            report = await sup.stop_pid(pid)
        except WorkerError as exc:
            return self._reply([{"name": None, "pid": pid, "ok": False, "message": str(exc)}])
        return self._reply(
            [
                {
                    "name": None,
                    "pid": pid,
                    "ok": True,
                    "message": _stopped(f"pid {pid}", report),
                    "report": report,
                }
            ]
        )

    async def restart(self, request: Request) -> Response:
        name = (await self._names(request, allow_all=False))[0]
        stopped = await self._stop_one(name, force=False)
        if not stopped["ok"]:
            return self._reply([stopped])
        return self._reply([await self._start_one(name)])


def _stopped(what: str, report: dict[str, Any]) -> str:
    if not report.get("stopped", True):
        return report.get("message") or f"{what} was not running"
    how = report.get("signal", "SIGTERM")
    text = f"{what} stopped ({how}, {report.get('ms', 0):.0f} ms"
    if report.get("portClosed") is False:
        text += ", port still open"
    if report.get("vramFreed") is False:
        text += ", VRAM not yet freed"
    if report.get("survivors"):
        text += f", survivors {report['survivors']}"
    return text + ")"


async def preload(broker: Broker, supervisor: Supervisor, name: str) -> Grant:
    """``workers start`` (and ``ensure``, ``restart``): a swap to the worker, whose load effect
    starts its process, the one on-demand start (``workers/start.py``).

    A preload admits at once when the scheduler counts the worker resident, and that can be
    stale while its process is not ready: it crashed and waits for its restart (the scheduler
    hears only of an end for good), it ended for good and the broker has not forgotten it yet, or
    telemetry still saw its memory after a stop. Then the eviction is forced first (the
    process strategy's unload stops what is left, a pending restart included), so that the
    preload loads it; should the scheduler still count it resident, the start fails rather than
    pass off a worker that does not run.
    """
    if name in broker.sched.residents() and supervisor.resident(name) is not True:
        await broker.forget(name)
    grant = await broker.preload(name)
    if supervisor.resident(name) is not True:
        state = supervisor.worker(name).state.value
        if name in broker.sched.residents():
            raise WorkerError(
                f"{name} is {state}, yet the scheduler still counts it resident (its memory is "
                "not seen free yet); try again shortly"
            )
        raise WorkerError(f"{name} is {state} after its start: another swap took its place")
    return grant
