"""The dashboard (``/ui/``) in a real headless Chromium, against a broker in front of emulators.

What the page shows is read through the hooks it keeps for tests (``window.gpubroker``, the ids
and ``data-*`` attributes of observe/ui/app.js) and compared with the status JSON fetched
beside it. One PNG screenshot per state goes to ``$GPUBROKER_ARTIFACTS`` (else the test's
tmp_path), each checked to decode and not to be blank.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from browser import CHROMIUM, Page, chromium_page, png_colours
from gpubroker.events import BrokerShuttingDown, EventBus
from gpubroker.observe.status import StatusApp
from gpubroker.plugins.strategies.base import StrategyContext
from gpubroker.plugins.strategies.builtin import GenericStrategy
from gpubroker.runtime import Endpoints
from gpubroker.scheduling.broker import Broker
from gpubroker.scheduling.domains import build_scheduler
from gpubroker.sim import GenericEmulator, GiB, OllamaEmulator, SimGPU, gpu_app, running
from gpubroker.sim.ollama_models import SimModel
from gpubroker.testing import broker_running, make_config

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)"),
]

TOKEN = "s3cret-admin-token-42"
DASH = "\N{EN DASH}"  # what the page shows for a number nobody knows
READY = "!!(window.gpubroker && window.gpubroker.ready)"
# what a page may log as an error without the page being at fault
NOT_THE_PAGES = ("favicon.ico",)

SNAPSHOT = """(() => {
  const t = e => e ? e.textContent.trim() : null;
  const fields = (root, names) =>
    Object.fromEntries(names.map(n => [n, t(root.querySelector(`[data-field="${n}"]`))]));
  const rows = {}, units = {}, gpus = {};
  for (const tr of document.querySelectorAll('#backends tr[data-backend]:not([data-unit])'))
    rows[tr.dataset.backend] = fields(tr, ['state', 'declared', 'measured', 'health', 'gpu',
                                           'passthrough']);
  for (const tr of document.querySelectorAll('#backends tr[data-unit]'))
    units[tr.dataset.unit] = t(tr);
  for (const d of document.querySelectorAll('#gpus [data-gpu]'))
    gpus[d.dataset.gpu] = {
      ...fields(d, ['used', 'total', 'util', 'power', 'temp', 'clocks']),
      owners: [...d.querySelectorAll('svg rect[data-owner]')].map(r => r.dataset.owner),
      chart: !!d.querySelector('svg[data-chart="vram"]'),
    };
  return {rows, units, gpus};
})()"""


def gib(n: int | None) -> str:
    return DASH if n is None else f"{n / GiB:.1f} GiB"


def first_int(text: str | None) -> int | None:
    found = re.findall(r"\d+", text or "")
    return int(found[0]) if found else None


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return Path(os.environ.get("GPUBROKER_ARTIFACTS") or tmp_path)


async def snap(page: Page, artifacts: Path, name: str, show: str | None = None) -> None:
    """Save the viewport (scrolled to ``show``) as ``dashboard-<name>.png`` and check it
    decodes and is not one colour."""
    if show is not None:
        await page.evaluate(f"document.querySelector({json.dumps(show)}).scrollIntoView()")
    data = await page.screenshot(artifacts / f"dashboard-{name}.png")
    colours = png_colours(data)
    assert colours >= 8, f"the {name} screenshot is (nearly) blank: {colours} colours"


def page_errors(page: Page, *expected: str) -> list[str]:
    """What the page logged as an error, less what is not its fault or what a test expects."""
    allowed = NOT_THE_PAGES + expected
    return [e for e in page.errors if not any(a in e for a in allowed)]


@asynccontextmanager
async def broker(
    unload_a: float = 0.02, **top: Any
) -> AsyncIterator[tuple[Endpoints, httpx.AsyncClient]]:
    """Two generic backends that cannot share the 16 GiB card and an Ollama beside them,
    with simulated telemetry; ``a`` (unloading in ``unload_a`` s) and ``ollama/small`` are
    resident when it yields."""
    gpu = SimGPU(16 * GiB, name="Sim 16G")
    a = GenericEmulator(gpu, 10 * GiB, owner="a", unload_seconds=unload_a)
    b = GenericEmulator(gpu, 10 * GiB, owner="b")
    emu = OllamaEmulator(gpu, {"small": SimModel(2 * GiB)})
    async with (
        running(a.app) as ua,
        running(b.app) as ub,
        running(emu.app) as uo,
        running(gpu_app(gpu)) as g,
    ):

        def generic(url: str) -> dict[str, Any]:
            return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload",
                    "vram": "10GiB"}  # fmt: skip

        cfg = make_config(
            {
                "a": generic(ua),
                "b": generic(ub),
                "ollama": {"upstream": uo, "unloadStrategy": "ollama"},
            },
            policy="budget",
            minResidency=0,
            telemetry="sim",
            telemetryUrl=g,
            telemetryInterval="100ms",
            **top,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert (await client.post(ep.proxies["a"] + "/generate", json={})).status_code == 200
            body = {"model": "small", "prompt": "hi", "stream": False}
            r = await client.post(ep.proxies["ollama"] + "/api/generate", json=body)
            assert r.status_code == 200, r.text
            yield ep, client


async def status(client: httpx.AsyncClient, ep: Endpoints) -> dict[str, Any]:
    r = await client.get(ep.status_url + "/", headers={"accept": "application/json"})
    assert r.status_code == 200
    return dict(r.json())


async def opened(page: Page) -> None:
    if not await page.wait_for(READY, within=10):
        hook = await page.evaluate("JSON.stringify(window.gpubroker)")
        raise AssertionError(f"never ready: {hook}, errors {page.errors}, saw {page.responses}")


def mismatches(st: dict[str, Any], shown: dict[str, Any]) -> list[str]:
    """Where the page's text differs from the status JSON ``st`` (empty: it agrees)."""
    wrong: list[str] = []

    def check(ok: bool, what: str, got: Any, want: Any) -> None:
        if not ok:
            wrong.append(f"{what}: page shows {got!r}, status says {want!r}")

    for name, b in st["backends"].items():
        row = shown["rows"].get(name)
        if row is None:
            wrong.append(f"no tr[data-backend={name!r}] (rows: {list(shown['rows'])})")
            continue
        check(b["state"] in (row["state"] or ""), f"{name} state", row["state"], b["state"])
        for field, key in (("declared", "declaredVram"), ("measured", "measuredVram")):
            text = row[field] or ""  # a size, or words for none ("not declared")
            ok = gib(b[key]) in text if b[key] is not None else "GiB" not in text
            check(ok, f"{name} {field}", row[field], b[key])
        health = b["health"]["status"]
        check(health in (row["health"] or ""), f"{name} health", row["health"], health)
        for field, key in (("gpu", "gpuRequests"), ("passthrough", "passthroughRequests")):
            got = first_int(row[field])
            check(got == b[key], f"{name} {field} count", row[field], b[key])
        for unit in b["units"]:
            text = shown["units"].get(unit["name"])
            check(text is not None, f"tr[data-unit={unit['name']!r}]", text, unit)
            for word in (unit["state"], unit["vramSource"]):
                check(word in (text or ""), f"unit {unit['name']}", text, word)
    telemetry = {str(g["index"]): g for g in st["gpus"]}
    for plan in st["gpuPlan"]:
        card, tele = shown["gpus"].get(plan["gpu"]), telemetry.get(plan["gpu"], {})
        if card is None:
            wrong.append(f"no [data-gpu={plan['gpu']!r}] (shown: {list(shown['gpus'])})")
            continue
        used = {gib(tele.get("memoryUsed")), gib(plan["plannedBytes"])}
        total = {gib(tele.get("memoryTotal")), gib(plan["capacityBytes"])}
        check(card["used"] in used, "GPU used", card["used"], used)
        check(card["total"] in total, "GPU total", card["total"], total)
        for field, key in (
            ("util", "utilization"),
            ("power", "powerDraw"),
            ("temp", "temperature"),
        ):
            if tele.get(key) is None:  # the simulator has none: the page says so, not "0"
                check(card[field] == DASH, f"GPU {field}", card[field], DASH)
        units = {u["name"] for b in st["backends"].values() for u in b["units"]}
        allowed = units | set(st["backends"]) | {"unmanaged", "free"}
        check(bool(card["owners"]) and set(card["owners"]) <= allowed, "VRAM bar owners",
              card["owners"], sorted(allowed))  # fmt: skip
        check(card["chart"], "svg[data-chart=vram]", card["chart"], True)
    return wrong


async def agrees(page: Page, client: httpx.AsyncClient, ep: Endpoints) -> list[str]:
    """Compare page and status JSON until they agree (the page polls every 2 s); what still
    differs after 10 s."""
    wrong = ["never compared"]
    with anyio.move_on_after(10):
        while True:
            st = await status(client, ep)
            wrong = mismatches(st, await page.evaluate(SNAPSHOT))
            if not wrong:
                break
            await anyio.sleep(0.2)
    return wrong


async def test_the_page_loads_clean_and_shows_what_the_status_json_says(artifacts: Path) -> None:
    async with broker() as (ep, client), chromium_page(ep.status_url + "/ui/") as page:
        await opened(page)
        wrong = await agrees(page, client, ep)
        await snap(page, artifacts, "loaded")
        connection = await page.wait_for(
            "(e => e && e.dataset.state === 'live' && e.textContent.trim())"
            "(document.getElementById('connection'))",
            within=10,
        )
        hook = await page.evaluate("JSON.stringify(window.gpubroker)")
        # at 1280x800 no section scrolls sideways either (each table fits its section)
        sideways = await page.evaluate(
            "[...document.querySelectorAll('section, .scroll')]"
            ".filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.id || e.className)"
        )
    assert sideways == [], sideways
    assert wrong == [], "\n".join(wrong)
    assert connection == "live"
    hook = json.loads(hook)
    assert hook["connected"] is True and hook["renders"] >= 1 and hook["errors"] == []
    assert set(hook["status"]["backends"]) == {"a", "b", "ollama"}
    assert page_errors(page) == []


async def test_a_browser_asking_for_the_root_is_sent_to_the_dashboard() -> None:
    async with broker() as (ep, client), chromium_page(ep.status_url + "/") as page:
        await opened(page)
        where = await page.evaluate("location.pathname")
        api = await client.get(ep.status_url + "/", headers={"accept": "*/*"})
    assert where == "/ui/"
    assert api.headers["content-type"].startswith("application/json")


async def test_a_swap_a_request_causes_appears_in_the_timeline_within_two_seconds(
    artifacts: Path,
) -> None:
    count = "document.querySelectorAll('#swaps [data-swap]').length"
    # polling once a minute (the page's ?poll= test hook): only /events can bring it in time
    async with broker() as (ep, client), chromium_page(ep.status_url + "/ui/?poll=60000") as page:
        await opened(page)
        await page.wait_for("window.gpubroker.connected", within=10)
        # the first load's render and the one the stream's opening asks for are both done,
        # so no poll is due for a minute
        assert await page.wait_for("window.gpubroker.renders >= 2", within=10)
        before = await page.evaluate(count)
        r = await client.post(ep.proxies["b"] + "/generate", json={})  # b evicts a
        returned = anyio.current_time()
        assert await page.wait_for(f"{count} > {before}", within=10), "no new [data-swap]"
        took = anyio.current_time() - returned
        newest = await page.evaluate(
            "(s => ({text: s.textContent, bars: Object.fromEntries([...s.querySelectorAll("
            "'[data-phase]')].map(b => [b.dataset.phase, b.getBoundingClientRect().width]))}))"
            "(document.querySelector('#swaps [data-swap]'))"
        )
        swap = (await status(client, ep))["swaps"][0]
        await snap(page, artifacts, "swap", show="#swaps")
    assert r.status_code == 200 and swap["to"] == "b" and swap["evicted"] == ["a"]
    assert took <= 2.0, f"the swap reached the timeline {took:.2f} s after the request returned"
    assert "a → b" in newest["text"] and "(request)" in newest["text"], newest
    assert f"{round(swap['totalMs'])} ms" in newest["text"], (newest, swap)
    bars, ms = newest["bars"], {p: swap[f"{p}Ms"] for p in ("drain", "unload", "load")}
    assert set(bars) == {"drain", "unload", "load"}, bars
    longest = max(ms, key=lambda p: ms[p])
    assert bars[longest] == max(bars.values()) > 0, (bars, ms)  # widths follow the durations
    assert page_errors(page) == []


async def test_a_request_waiting_behind_a_swap_shows_in_the_queue_with_its_phase(
    artifacts: Path,
) -> None:
    row = "document.querySelector('#queue tr[data-lease]')"
    async with (
        broker(unload_a=3.0) as (ep, client),
        chromium_page(ep.status_url + "/ui/") as page,
        anyio.create_task_group() as tg,
    ):
        await opened(page)
        await page.wait_for("window.gpubroker.connected", within=10)
        done: list[httpx.Response] = []

        async def request_b() -> None:  # b must wait while a takes 3 s to unload
            done.append(await client.post(ep.proxies["b"] + "/generate", json={}))

        async def request_a() -> None:
            done.append(await client.post(ep.proxies["a"] + "/generate", json={}))

        tg.start_soon(request_b)
        shown = await page.wait_for(
            "(tr => tr && tr.querySelector('[data-field=\"phase\"]').textContent.trim()"
            " === 'unloading' && [tr.dataset.lease,"
            " tr.querySelector('[data-field=\"phase\"]').textContent.trim(), tr.textContent])"
            f"({row})",
            within=3,
        )
        # a request for a itself, queued after the swap began (a is its victim): it waits on
        # the same unload, and no event names it
        tg.start_soon(request_a)
        phase_of_a = await page.wait_for(
            "(tr => tr && (t => t !== '\u2013' && t)(tr.querySelector("
            "'[data-field=\"phase\"]').textContent.trim()))"
            "([...document.querySelectorAll('#queue tr[data-lease]')].find(tr =>"
            " tr.querySelector('[data-field=\"unit\"]').textContent.trim() === 'a'))",
            within=3,
        )
        st = await status(client, ep)
        live = st["liveRequests"]
        # it stays the exact phase over the polls that follow (a status reply must not turn
        # it into the bare "swapping")
        await anyio.sleep(1.0)
        later = await page.evaluate(
            f"(tr => tr && tr.querySelector('[data-field=\"phase\"]').textContent.trim())({row})"
        )
        await snap(page, artifacts, "queued", show="#queue")
        gone = await page.wait_for(f"!{row}", within=10)
    assert shown, "no queued request with its swap phase in #queue"
    lease, phase, text = shown
    [entry] = [e for e in live if str(e["id"]) == lease]
    assert entry["backend"] == "b" and entry["state"] == "queued"
    assert phase == "unloading" and (entry["caller"] or "") in text
    assert st["backends"]["a"]["state"] == "unloading", st["backends"]["a"]
    assert later == "unloading", later
    assert phase_of_a == "unloading", phase_of_a
    assert gone and [r.status_code for r in done] == [200, 200]
    assert page_errors(page) == []


async def test_the_unload_button_unloads_a_resident_backend(artifacts: Path) -> None:
    button = 'button[data-action="unload"][data-backend="a"]'
    async with broker() as (ep, client), chromium_page(ep.status_url + "/ui/") as page:
        await opened(page)
        assert (await status(client, ep))["backends"]["a"]["state"] == "resident"
        assert await page.click(button), f"no {button}"
        result = await page.wait_for(
            "(e => e.dataset.ok && [e.dataset.ok, e.textContent.trim()])"
            "(document.getElementById('action-result'))",
            within=10,
        )
        state = (await status(client, ep))["backends"]["a"]["state"]
        row_state = '#backends tr[data-backend="a"]:not([data-unit]) [data-field="state"]'
        shown = await page.wait_for(
            f"(e => e && /absent|asleep/.test(e.textContent))"
            f"(document.querySelector('{row_state}'))",
            within=5,
        )
        await snap(page, artifacts, "unloaded", show="#backends")
    assert result and result[0] == "true", f"#action-result says {result}"
    assert state in ("absent", "asleep")
    assert shown, "the row never showed a unloaded"
    assert page_errors(page) == []


async def test_the_keyboard_reaches_an_action_and_enter_runs_it() -> None:
    button = 'button[data-action="unload"][data-backend="a"]'
    at = f"document.activeElement && document.activeElement.matches({json.dumps(button)})"
    async with broker() as (ep, client), chromium_page(ep.status_url + "/ui/") as page:
        await opened(page)
        for _ in range(60):  # Tab through the page from the top until the button has focus
            if await page.evaluate(at):
                break
            await page.press("Tab")
        reached = await page.evaluate(at)
        ring = await page.evaluate(
            "(e => [e.matches(':focus-visible'), getComputedStyle(e).outlineStyle,"
            " getComputedStyle(e).boxShadow])(document.activeElement)"
        )
        await page.press("Enter")
        result = await page.wait_for(
            "document.getElementById('action-result').dataset.ok", within=10
        )
        state = (await status(client, ep))["backends"]["a"]["state"]
    assert reached, "Tab never reached the unload button of a"
    assert ring[0] and (ring[1] != "none" or ring[2] != "none"), f"no visible focus: {ring}"
    assert result == "true" and state in ("absent", "asleep")


async def test_with_a_token_an_action_without_it_fails_visibly_and_with_it_succeeds(
    artifacts: Path,
) -> None:
    button = 'button[data-action="unload"][data-backend="a"]'
    dialog_open = "document.getElementById('token-dialog').open"
    async with (
        broker(adminToken=TOKEN) as (ep, client),
        chromium_page(ep.status_url + "/ui/") as page,
    ):
        await opened(page)
        assert await page.click(button), f"no {button}"
        asked = await page.wait_for(dialog_open, within=10)  # the 401 asks for the token
        await snap(page, artifacts, "token-asked")
        await page.evaluate("document.getElementById('token-input').focus()")
        await page.send("Input.insertText", text=TOKEN)
        assert await page.click("#token-save")
        result = await page.wait_for(
            "(e => e.dataset.ok === 'true' && e.textContent.trim())"
            "(document.getElementById('action-result'))",
            within=10,
        )
        state = (await status(client, ep))["backends"]["a"]["state"]
        token = json.dumps(TOKEN)
        stored = await page.evaluate(
            f"[Object.values(sessionStorage).includes({token}),"
            f" JSON.stringify({{...localStorage}}).includes({token})]"
        )
        await snap(page, artifacts, "token-accepted")
    assert asked is True, "the 401 did not open #token-dialog"
    assert result and result.startswith("unloaded a"), result
    assert state in ("absent", "asleep")
    assert stored == [True, False], "the token must be in sessionStorage and not in localStorage"
    urls = page.requests + [url for _, url in page.responses]
    assert not [u for u in urls if TOKEN in u], "the token went into a URL"
    assert (401, ep.status_url + "/api/unload") in page.responses  # it was really asked first
    assert page_errors(page, "401") == []


async def test_on_a_phone_nothing_scrolls_sideways_and_the_states_read(artifacts: Path) -> None:
    async with broker() as (ep, _), chromium_page(ep.status_url + "/ui/", 390, 844) as page:
        await opened(page)
        await page.wait_for("document.querySelectorAll('#backends [data-field=\"state\"]').length")
        layout = await page.evaluate(
            "({scroll: document.documentElement.scrollWidth, inner: innerWidth,"
            " states: [...document.querySelectorAll('#backends tr[data-backend]:not([data-unit])"
            ' [data-field="state"]\')].map(e => [e.textContent.trim(),'
            " e.getBoundingClientRect().left, e.getBoundingClientRect().right])})"
        )
        await snap(page, artifacts, "phone")
    assert layout["scroll"] <= layout["inner"], layout
    assert len(layout["states"]) == 3, layout
    for text, left, right in layout["states"]:
        assert text and left >= 0 and right <= layout["inner"], layout  # readable, on screen
    assert page_errors(page) == []


async def test_the_page_says_when_the_event_stream_is_lost_and_comes_back(artifacts: Path) -> None:
    state = "document.getElementById('connection').dataset.state"
    offline = {"latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    async with broker() as (ep, _), chromium_page(ep.status_url + "/ui/") as page:
        await opened(page)
        live = await page.wait_for(f"{state} === 'live'", within=10)
        # the network goes (no reconnect can succeed), then the broker ends the stream as a
        # stopping broker does: the page must say so until both are back
        await page.send("Network.emulateNetworkConditions", offline=True, **offline)
        assert ep.bus is not None
        ep.bus.publish(BrokerShuttingDown())
        # "reconnecting…" at once; "stale" too once no status came for two polls (it wins)
        lost = await page.wait_for(
            f"['reconnecting', 'stale'].includes({state}) && !window.gpubroker.connected && "
            "document.getElementById('connection').textContent.trim()",
            within=10,
        )
        await snap(page, artifacts, "reconnecting")
        await page.send("Network.emulateNetworkConditions", offline=False, **offline)
        back = await page.wait_for(f"{state} === 'live' && window.gpubroker.connected", within=20)
    assert live and back
    assert lost == "reconnecting…" or lost.startswith("stale"), lost


async def test_a_status_that_stops_answering_turns_the_page_stale_not_live() -> None:
    """GET / hangs (paused by the browser, as a frozen broker would) while /events stays open:
    the page must stop saying "live" within a few polls, and say "live" again once answers
    come back."""
    state = "document.getElementById('connection').dataset.state"
    async with broker() as (ep, _), chromium_page(ep.status_url + "/ui/") as page:
        await opened(page)
        assert await page.wait_for(f"{state} === 'live'", within=10)
        await page.send("Fetch.enable", patterns=[{"urlPattern": ep.status_url + "/"}])
        stale = await page.wait_for(
            f"{state} === 'stale' && window.gpubroker.connected && "
            "[document.getElementById('connection').textContent.trim(),"
            " document.getElementById('notice').hidden]",
            within=6.5,  # ~3 polls of 2 s
        )
        await page.send("Fetch.disable")
        back = await page.wait_for(f"{state} === 'live'", within=10)
    assert stale, "the page still said live with no status answering"
    text, notice_hidden = stale
    assert re.fullmatch(r"stale \N{EM DASH} no answer for \d+ s", text), text
    assert notice_hidden is False
    assert back
    assert page_errors(page, "status:", "GET /") == []


async def test_a_hidden_tab_lets_go_of_its_event_stream_and_takes_it_up_when_shown() -> None:
    """Six open tabs must not hold the browser's six connections to the host."""
    hide = (
        "Object.defineProperty(document, 'hidden', {{configurable: true, get: () => {0}}});"
        "document.dispatchEvent(new Event('visibilitychange')); true"
    )
    async with broker() as (ep, _), chromium_page(ep.status_url + "/ui/") as page:
        await opened(page)
        assert await page.wait_for("window.gpubroker.connected", within=10)
        await page.evaluate(hide.format("true"))
        closed = await page.wait_for("!window.gpubroker.connected", within=5)
        await page.evaluate(hide.format("false"))
        back = await page.wait_for("window.gpubroker.connected", within=10)
        opens = [u for u in page.requests if u.endswith("/events")]
    assert closed and back
    assert len(opens) >= 2, opens  # shown again, it opened a new stream


@asynccontextmanager
async def gate_off_beyond_loopback() -> AsyncIterator[str]:
    """The status app of a broker configured to bind beyond loopback with no adminToken (its
    gate answers 403 to every verb), served, as every test server is, on 127.0.0.1 only."""
    upstream = "http://127.0.0.1:9"
    cfg = make_config({"a": {"upstream": upstream, "unloadStrategy": "generic"}}, bind="0.0.0.0")
    bus = EventBus()
    async with httpx.AsyncClient(base_url=upstream) as client:
        strategies = {"a": GenericStrategy(StrategyContext(cfg.backend("a"), client, 1.0))}
        brk = Broker(cfg, strategies, build_scheduler(cfg, strategies, None), bus)
        async with anyio.create_task_group() as tg:
            await tg.start(brk.run)
            async with running(StatusApp(brk, bus).app) as url:
                yield url
            tg.cancel_scope.cancel()


async def test_when_the_admin_verbs_are_off_an_action_says_so_and_asks_for_no_token() -> None:
    """Beyond loopback with no adminToken the gate answers 403: no token can help, so the
    page shows the API's reason instead of the token dialog (which is for a 401)."""
    button = 'button[data-action="unload"][data-backend="a"]'
    async with gate_off_beyond_loopback() as url, chromium_page(url + "/ui/") as page:
        await opened(page)
        assert await page.click(button), f"no {button}"
        result = await page.wait_for(
            "(e => e.dataset.ok === 'false' && e.textContent.trim())"
            "(document.getElementById('action-result'))",
            within=10,
        )
        dialog = await page.evaluate("document.getElementById('token-dialog').open")
    assert result and "admin verbs are off" in result, result
    assert dialog is False, "a 403 opened the token dialog"
    assert (403, url + "/api/unload") in page.responses
    assert page_errors(page, "403", "unload a") == []


async def test_without_telemetry_a_unit_holding_the_whole_gpu_is_drawn_and_no_size_is_made_up(
    artifacts: Path,
) -> None:
    """Telemetry off, policy exclusive: nobody knows the GPU's size or the unit's; the card
    says a dash (not "0.0 GiB"), draws the unit across the bar, and says telemetry is off."""
    gpu = SimGPU(16 * GiB)
    a = GenericEmulator(gpu, 1 * GiB, owner="a")
    card = "document.querySelector('#gpus [data-gpu=\"0\"]')"
    async with running(a.app) as ua:
        cfg = make_config(
            {"a": {"upstream": ua, "unloadStrategy": "generic", "unloadEndpoint": "/unload"}},
            telemetry="none",
            minResidency=0,
        )
        async with broker_running(cfg) as ep, httpx.AsyncClient(timeout=10) as client:
            assert (await client.post(ep.proxies["a"] + "/generate", json={})).status_code == 200
            st = await status(client, ep)
            async with chromium_page(ep.status_url + "/ui/") as page:
                await opened(page)
                shown = await page.wait_for(
                    f"(d => d && d.querySelector('rect[data-owner=\"a\"]') && ({{"
                    " used: d.querySelector('[data-field=\"used\"]').textContent.trim(),"
                    " total: d.querySelector('[data-field=\"total\"]').textContent.trim(),"
                    " notice: d.querySelector('[data-field=\"notice\"]').textContent.trim(),"
                    " width: +d.querySelector('rect[data-owner=\"a\"]').getAttribute('width'),"
                    " owners: [...d.querySelectorAll('rect[data-owner]')]"
                    ".map(r => r.dataset.owner)}))"
                    f"({card})",
                    within=10,
                )
                await snap(page, artifacts, "no-telemetry", show="#gpus")
    [unit] = st["backends"]["a"]["units"]
    assert unit["state"] == "resident" and unit["vramBytes"] is None, unit
    assert st["gpuPlan"][0]["plannedBytes"] is None and st["telemetry"]["notice"]
    assert shown, f"no segment for the unit that holds the GPU: {page.errors}"
    assert shown["used"] == DASH and shown["total"] == DASH, shown
    assert shown["owners"] == ["a"] and shown["width"] >= 999, shown
    assert shown["notice"] == st["telemetry"]["notice"], shown
    assert page_errors(page) == []


async def test_an_empty_config_says_so_once_the_broker_answered() -> None:
    texts = (
        "[document.querySelector('#gpus .empty'), document.getElementById('backends-empty')]"
        ".map(e => !e.hidden && e.getClientRects().length > 0 && e.textContent.trim())"
    )
    async with (
        broker_running(make_config({}, telemetry="none")) as ep,
        chromium_page(ep.status_url + "/ui/") as page,
    ):
        await opened(page)
        shown = await page.evaluate(texts)
    assert shown == ["no GPUs known", "no backends configured"], shown
    assert page_errors(page) == []


async def test_a_per_model_backend_is_made_owner_on_its_unit_rows_only() -> None:
    """The API answers 400 to a swap to a backend whose units are models: no such button."""
    visible = "(e => !!e && !e.hidden && e.getClientRects().length > 0)(document.querySelector({}))"
    async with broker() as (ep, client), chromium_page(ep.status_url + "/ui/") as page:
        units = (await status(client, ep))["backends"]["ollama"]["units"]
        [unit] = [u for u in units if u["model"]]
        model = f'button[data-action="swap"][data-unit="{unit["name"]}"]'
        await opened(page)
        assert await page.wait_for(visible.format(json.dumps(model)), within=10), f"no {model}"
        shown = {
            name: await page.evaluate(
                visible.format(json.dumps(f'button[data-action="swap"][data-backend="{name}"]'))
            )
            for name in ("a", "b", "ollama")
        }
    assert unit["model"].startswith("small"), unit
    assert shown == {"a": True, "b": True, "ollama": False}, shown
