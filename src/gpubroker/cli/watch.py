"""The terminal dashboard of ``gpubroker status`` (one shot) and ``gpubroker status --watch``.

:func:`render` is a pure function from the status JSON (``GET /``, typed as
:class:`~gpubroker.observe.schema.StatusJson`) to a rich renderable, so it is tested by
rendering to a string. Sections read with ``.get``: a broker of another version may lack a key.
:func:`frames` polls the broker and yields one frame per poll, showing the last good data marked
"reconnecting" while the broker is away; :func:`watch` draws them in place until Ctrl-C.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import cast

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gpubroker.observe.schema import (
    BackendJson,
    GpuJson,
    GpuPlanJson,
    LiveEntryJson,
    QueueEntryJson,
    StatusJson,
    SwapJson,
    UnitJson,
    WarningJson,
)
from gpubroker.vram import GiB

BAR = 24  # characters in a full bar

Fetch = Callable[[], StatusJson]


# --- small formatters: unknown stays visibly unknown ------------------------------------------


def _gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GiB:.1f} GiB"


def _num(value: float | None, unit: str = "", fmt: str = "{:.0f}") -> str:
    return "n/a" if value is None else fmt.format(value) + unit


def _ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms / 1000:.1f}s" if ms >= 1000 else f"{ms:.0f}ms"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def bar(fraction: float | None, width: int = BAR) -> Text:
    """``[█████░░░░]``, green to red as it fills; ``[ n/a ]`` when unknown."""
    if fraction is None:
        return Text("[" + "n/a".center(width) + "]", style="dim")
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    style = "green" if fraction < 0.75 else "yellow" if fraction < 0.95 else "red"
    text = Text("[")
    text.append("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    text.append("]")
    return text


# --- sections ----------------------------------------------------------------------------------


def _header(data: StatusJson, url: str, error: str | None, stale_s: float | None) -> Text:
    owner = data.get("vramOwner") or "nobody"
    text = Text()
    text.append("gpubroker ", style="bold")
    text.append(f"{url}   ")
    if error is not None:
        ago = f" (last seen {_ago(stale_s)} ago)" if stale_s is not None else ""
        text.append(f"reconnecting: {error}{ago}", style="bold red")
    else:
        text.append(f"up {_ago(data.get('uptime', 0))}", style="green")
    text.append(f"\nGPU owner: {owner}", style="bold")
    totals = data.get("totals")
    text.append(
        f"   in flight: {totals.get('inFlight', 0) if totals else 0}"
        f"   queued: {data.get('queueLength', 0)}"
        f"   swaps: {data.get('swapCount', 0)}   policy: {data.get('policy', '?')}"
    )
    if data.get("swapping"):
        text.append("   swapping…", style="yellow")
    tele = data.get("telemetry")
    if tele is None:
        return text
    if source := tele.get("source"):
        text.append(f"\ntelemetry: {source}", style="dim")
    if notice := tele.get("notice"):
        text.append(f" ({notice})", style="dim")
    if failed := tele.get("error"):
        text.append(f"  read failed: {failed}", style="red")
    return text


def _plan_line(p: GpuPlanJson) -> Text | None:
    """What the scheduler plans on a GPU, and the memory nobody owns where there is some."""
    capacity, planned = p.get("capacityBytes"), p.get("plannedBytes")
    if capacity is None or planned is None:
        return None
    text = Text(f"plan {_gib(planned)} / {_gib(capacity)}")
    if unmanaged := p.get("unmanagedBytes"):
        text.append(f"   unmanaged {_gib(unmanaged)}", style="yellow")
    return text


def _gpus(data: StatusJson) -> RenderableType | None:
    gpus: list[GpuJson] = data.get("gpus") or []
    plans: dict[str, GpuPlanJson] = {p["gpu"]: p for p in data.get("gpuPlan") or []}
    if not gpus:  # no telemetry: what the scheduler plans, where it knows the capacity
        lines = [(k, _plan_line(p)) for k, p in plans.items()]
        shown = [Text(f"GPU {k} ").append_text(line) for k, line in lines if line is not None]
        return Group(*shown) if shown else None
    rows: list[RenderableType] = []
    for g in gpus:
        total, used = g.get("memoryTotal"), g.get("memoryUsed")
        share = used / total if total and used is not None else None
        util = g.get("utilization")
        title = Text(f"GPU {g['index']}  {g['name']}", style="bold")
        title.append(f"  {g['uuid']}", style="dim")
        vram = Text("VRAM ")
        vram.append_text(bar(share))
        vram.append(
            f" {_gib(used)} / {_gib(total)}" + (f"  {share:.0%}" if share is not None else "")
        )
        busy = Text("util ")
        busy.append_text(bar(None if util is None else util / 100))
        busy.append(f" {_num(util, '%')}")
        draw, limit = g.get("powerDraw"), g.get("powerLimit")
        power = Text("pwr  ")
        power.append_text(bar(draw / limit if draw is not None and limit else None))
        power.append(
            " n/a" if draw is None else f" {draw:.0f}" + (f"/{limit:.0f} W" if limit else " W")
        )
        sm, mem = g.get("smClock"), g.get("memClock")
        clocks = (
            "clocks n/a"
            if sm is None and mem is None
            else f"clocks SM {_num(sm)} / MEM {_num(mem)} MHz"
        )
        other = Text(
            f"temp {_num(g.get('temperature'), '°C')}   fan {_num(g.get('fan'), '%')}   {clocks}"
        )
        rows += [title, vram, busy, power, other]
        plan = plans.get(str(g["index"]))
        if plan is not None and (line := _plan_line(plan)) is not None:
            rows.append(line)
        procs = g.get("processes") or []
        if procs:
            table = Table(box=None, padding=(0, 2), show_edge=False)
            for col in ("pid", "process", "VRAM", "owner"):
                table.add_column(col, justify="right" if col in ("pid", "VRAM") else "left")
            for p in procs:
                owner = p.get("owner")
                if owner is None:
                    owner_text = Text(
                        "unmanaged" if p.get("visible", True) else "not visible here",
                        style="yellow" if p.get("visible", True) else "dim",
                    )
                else:
                    owner_text = Text(owner, style="cyan")
                table.add_row(
                    str(p["pid"]), p.get("name") or "?", _gib(p.get("usedBytes")), owner_text
                )
            rows.append(table)
    return Panel(Group(*rows), title="GPUs", title_align="left")


def _footprint(u: UnitJson) -> str:
    """A unit's size when resident and where that figure comes from."""
    size = u.get("vramBytes")
    return "whole GPU" if size is None else f"{_gib(size)} {u.get('vramSource', '?')}"


Row = tuple[RenderableType, ...]


def _unit_rows(b: BackendJson) -> tuple[str, list[Row]]:
    """The footprint on the backend's own row (its only unit's), or else a row below it for
    each of its units holding memory: a model by its name, the backend's own unit as such."""
    units: list[UnitJson] = b.get("units") or []
    if len(units) == 1 and units[0].get("model") is None:
        return _footprint(units[0]), []
    rows: list[Row] = []
    for u in units:
        state = u.get("state", "?")
        if state in ("absent", "asleep"):
            continue
        measured = u.get("measuredBytes")
        rows.append(
            (
                f"  {u.get('model') or '(backend)'}",
                Text(state, style="green" if state == "resident" else ""),
                "",
                "" if measured is None else _gib(measured),
                _footprint(u),
                str(u.get("active", 0)),
                str(u.get("queued", 0)),
            )
        )
    return "", rows


def _backends(data: StatusJson) -> RenderableType:
    table = Table(title="Backends", title_justify="left", expand=False)
    for col, just in (
        ("backend", "left"),
        ("state", "left"),
        ("declared", "right"),
        ("measured", "right"),
        ("footprint", "left"),
        ("active", "right"),
        ("queued", "right"),
        ("GPU req", "right"),
        ("pass", "right"),
        ("health", "left"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    backends: Mapping[str, BackendJson] = data.get("backends") or {}
    for name, b in backends.items():
        state = Text(b["state"], style="green" if b["state"] == "resident" else "")
        if b.get("owner"):
            state.append(" ★", style="bold yellow")
        health = b.get("health")
        status = health.get("status", "unknown") if health else "unknown"
        health_text = Text(status, style={"up": "green", "down": "red"}.get(status, "dim"))
        if health and "latencyMs" in health:
            health_text.append(f" {health['latencyMs']:.0f}ms", style="dim")
        footprint, units = _unit_rows(b)
        table.add_row(
            name,
            state,
            _gib(b.get("declaredVram")),
            _gib(b.get("measuredVram")),
            footprint,
            str(b.get("inFlight", b.get("active", 0))),
            str(b.get("queued", 0)),
            str(b.get("gpuRequests", 0)),
            str(b.get("passthroughRequests", 0)),
            health_text,
        )
        for unit in units:
            table.add_row(*unit)
    return table


def _requests(data: StatusJson) -> RenderableType | None:
    everything: list[LiveEntryJson] = data.get("liveRequests") or []
    live = [r for r in everything if r.get("state") == "active"]
    jobs = [r for r in everything if r.get("kind") == "job"]
    queue: list[QueueEntryJson] = data.get("queue") or []
    if not live and not jobs and not queue:
        return Text("No requests in flight or queued.", style="dim")
    table = Table(title="Requests", title_justify="left")
    for col in ("id", "backend", "caller", "state", "path", "elapsed", "queued"):
        table.add_column(col, justify="right" if col in ("id", "elapsed", "queued") else "left")
    callers = {r["id"]: r.get("caller") or "" for r in everything if r.get("kind") != "job"}
    for r in live:  # a lease on one model shows its unit, backend/model
        table.add_row(
            str(r["id"]), r.get("unit") or r["backend"], callers.get(r["id"], ""),
            Text("in flight", style="green"), r.get("path", ""), _ms(r.get("elapsedMs")),
            _ms(r.get("queuedMs")),
        )  # fmt: skip
    for j in jobs:  # the service's own queue (ComfyUI): GPU work after its request ended
        running = j.get("state") == "running"
        state = Text(f"job {j.get('state')}", style="green" if running else "yellow")
        table.add_row(
            str(j["id"])[:8], j["backend"], "", state,
            j.get("path", ""), _ms(j.get("elapsedMs")), "",
        )  # fmt: skip
    for q in queue:
        table.add_row(
            str(q["id"]), q.get("unit") or q["backend"], callers.get(q["id"], ""),
            Text(f"queued #{q['position']}", style="yellow"), "", _ms(q.get("waitedMs")), "",
        )  # fmt: skip
    return table


def _swaps(data: StatusJson, limit: int = 5) -> RenderableType | None:
    swaps: list[SwapJson] = (data.get("swaps") or [])[:limit]
    if not swaps:
        return None
    table = Table(title="Recent swaps", title_justify="left")
    for col in ("at", "evicted → to", "why", "drain", "unload", "load", "total"):
        table.add_column(col, justify="left" if col in ("at", "evicted → to", "why") else "right")
    for s in swaps:
        at = s.get("at") or ""
        try:
            at = datetime.fromisoformat(at.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S")
        except ValueError:
            pass
        moved = f"{', '.join(s.get('evicted', [])) or '-'} → {s.get('to') or '-'}"
        if s.get("failures"):
            moved += " (failures)"
        table.add_row(
            at, moved, s.get("reason") or "", _ms(s.get("drainMs")), _ms(s.get("unloadMs")),
            _ms(s.get("loadMs")), _ms(s.get("totalMs")),
        )  # fmt: skip
    return table


def _preload(data: StatusJson) -> RenderableType | None:
    """One line while the start-up preload runs (its failures are warnings); None after."""
    steps = data.get("preload") or []
    if not any(p["state"] in ("pending", "loading") for p in steps):
        return None
    said = ", ".join(
        f"{p['target']} {p['state']}" + ("…" if p["state"] == "loading" else "") for p in steps
    )
    return Text(f"Preload: {said}", style="yellow")


def _warnings(data: StatusJson, now: float) -> RenderableType:
    warnings: list[WarningJson] = data.get("warnings") or []
    if not warnings:
        return Text("No warnings.", style="green")
    table = Table(title="Warnings", title_justify="left", title_style="bold red")
    table.add_column("code", style="red")
    table.add_column("for", justify="right")
    table.add_column("message")
    for w in warnings:
        table.add_row(w["code"], _ago(now - w.get("sinceTs", now)), w["message"])
    return table


def as_status(data: object) -> StatusJson:
    """The status JSON as its declared type (a broker of another version may lack some keys,
    which is why every section reads with ``.get``); ValueError when it is not an object."""
    if not isinstance(data, dict):
        raise ValueError("not a status object")
    return cast(StatusJson, data)


def render(
    data: StatusJson | None,
    *,
    url: str,
    error: str | None = None,
    stale_s: float | None = None,
    now: float | None = None,
) -> RenderableType:
    """One frame of the dashboard from the status JSON (None: never reached the broker)."""
    now = time.time() if now is None else now
    if data is None:
        return Panel(
            Text(
                f"no broker answering at {url} ({error or 'not tried yet'}); retrying…", style="red"
            ),
            title="gpubroker: reconnecting",
            title_align="left",
        )
    parts = [
        _header(data, url, error, stale_s),
        _preload(data),
        _gpus(data),
        _backends(data),
        _requests(data),
        _swaps(data),
        _warnings(data, now),
    ]
    return Group(*(p for p in parts if p is not None))


def render_text(renderable: RenderableType, width: int = 120) -> str:
    """Plain text of a renderable (tests, logs)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(renderable)
    return console.export_text()


# --- the live loop -----------------------------------------------------------------------------


def frames(
    fetch: Fetch, url: str, *, clock: Callable[[], float] = time.monotonic
) -> Iterator[RenderableType]:
    """One frame per ``next()``: a fresh poll, or the last good data marked reconnecting."""
    last: StatusJson | None = None
    last_ok: float | None = None
    while True:
        try:
            data = fetch()
        except Exception as exc:  # unreachable, restarting, a proxy's HTML error page…
            error = type(exc).__name__
            stale = None if last_ok is None else clock() - last_ok
            yield render(last, url=url, error=error, stale_s=stale)
            continue
        last, last_ok = data, clock()
        yield render(data, url=url)


def http_fetch(url: str, timeout: float = 3.0) -> tuple[Fetch, Callable[[], None]]:
    """A fetch of ``GET {url}/`` on one kept-alive client, and its close."""
    import httpx

    client = httpx.Client(timeout=httpx.Timeout(timeout, connect=2.0), trust_env=False)

    def fetch() -> StatusJson:
        response = client.get(url + "/")
        response.raise_for_status()
        return as_status(response.json())

    return fetch, client.close


def watch(url: str, *, interval: float = 1.0, console: Console | None = None) -> None:
    """Draw the dashboard in place, polling every ``interval`` seconds, until Ctrl-C."""
    from rich.live import Live

    console = console or Console()
    fetch, close = http_fetch(url)
    try:
        with Live(console=console, screen=True, auto_refresh=False, transient=False) as live:
            for frame in frames(fetch, url):
                live.update(frame, refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        close()
