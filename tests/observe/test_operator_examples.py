"""The operator's examples, ``examples/grafana-dashboard.json`` and
``examples/prometheus-alerts.yaml``, read as shipped and checked against a running broker's
``/metrics``: a metric or label renamed in the broker, or misspelt in a file, fails here rather
than leaving a panel empty or an alert that can never fire."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from gpubroker.plugins.manager import Provided, create_plugins
from gpubroker.sim import GenericEmulator, GiB, SimGPU, gpu_app, running
from gpubroker.telemetry.base import TelemetrySnapshot
from gpubroker.telemetry.sim import SimTelemetry
from gpubroker.testing import broker_running, make_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
DASHBOARD = EXAMPLES / "grafana-dashboard.json"
ALERTS = EXAMPLES / "prometheus-alerts.yaml"

TARGET_LABELS = frozenset({"instance", "job"})  # Prometheus adds these to every scraped series
# Grafana's variables, as Grafana would put them in before the query goes to Prometheus
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "6h", "$instance": ".*", "$backend": ".*"}
NAME = re.compile(r"\b(gpubroker_[a-z0-9_]+)\b")
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)[^,]*,\s*(\w+)\s*\)")
DURATION = re.compile(r"^\d+[smhdwy]$")


@dataclass
class Scrape:
    """Every series name in one ``/metrics`` answer, with the labels and values it carries."""

    labels: dict[str, dict[str, set[str]]] = field(default_factory=lambda: defaultdict(dict))

    @classmethod
    def of(cls, text: str) -> Scrape:
        scrape = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                seen = scrape.labels[s.name]
                for label, value in s.labels.items():
                    seen.setdefault(label, set()).add(value)
        return scrape

    def problems(self, expr: str) -> list[str]:
        """What in ``expr`` this scrape does not have: metric names, matched labels and literal
        values, grouping labels. ``up`` is Prometheus' own series and has only target labels."""
        names = set(NAME.findall(expr))
        out = [f"no series {n}" for n in sorted(names) if n not in self.labels]
        own: set[str] = set(TARGET_LABELS)
        for name in names & self.labels.keys():
            own |= self.labels[name].keys()
        for name, body in SELECTOR.findall(expr):
            if name != "up" and not name.startswith("gpubroker_"):
                out.append(f"{name} is neither a gpubroker series nor up")
                continue
            have = {} if name == "up" else self.labels.get(name, {})
            for label, op, value in MATCHER.findall(body):
                if label in TARGET_LABELS:
                    continue
                if label not in have:
                    out.append(f"{name} has no label {label}")
                elif op == "=" and "$" not in value and value not in have[label]:
                    out.append(f'{name} has no {label}="{value}"')
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                if label not in own and not (label == "le" and "_bucket" in expr):
                    out.append(f"grouping by {label}, a label none of its series has")
        return out


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel query and every query variable."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            for metric, label in LABEL_VALUES.findall(var["query"]):
                yield f"variable {var['name']}", f"sum by ({label}) ({metric})"


def alert_rules() -> list[dict[str, Any]]:
    data = YAML(typ="safe").load(ALERTS)
    return [rule for group in data["groups"] for rule in group["rules"]]


def balanced(expr: str) -> bool:
    """Brackets nest and close, string literals aside."""
    pairs, stack, quoted, escaped = {")": "(", "]": "[", "}": "{"}, [], False, False
    for ch in expr:
        if escaped:
            escaped = False
        elif quoted:
            escaped, quoted = ch == "\\", ch != '"'
        elif ch == '"':
            quoted = True
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack and not quoted


def test_the_dashboard_is_an_importable_grafana_dashboard() -> None:
    text = DASHBOARD.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"  # as diffs stay small
    assert data["schemaVersion"] >= 36 and data["uid"] == "gpubroker"
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"instance", "backend"} <= variables.keys()
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    taken: dict[tuple[int, int], int] = {}
    for panel in data["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for cell in ((x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                     for y in range(pos["y"], pos["y"] + pos["h"])):  # fmt: skip
            assert cell not in taken, f"panel {panel['id']} overlaps panel {taken[cell]}"
            taken[cell] = panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"].strip()
    for where, expr in dashboard_queries():
        assert balanced(expr), where


def test_every_alert_rule_is_complete_and_well_formed() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {"GpubrokerDown", "GpubrokerGpuNearFull", "GpubrokerUnloadFailures",
            "GpubrokerQueueWaitP95High", "GpubrokerNeverFitsRefusals",
            "GpubrokerUnmanagedMemory"} <= set(names)  # fmt: skip
    for rule in rules:
        assert rule.keys() == {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert DURATION.match(str(rule["for"])), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert balanced(rule["expr"]), rule["alert"]


def test_the_checks_catch_a_renamed_metric_label_or_value() -> None:
    """The checker itself: a rename in the broker must not pass unseen."""
    scrape = Scrape.of(
        'gpubroker_queue_wait_seconds_bucket{backend="a",le="1.0"} 0\n'
        'gpubroker_unit_state{backend="a",model="",state="resident"} 1\n'
    )
    good = 'sum by (le, backend) (rate(gpubroker_queue_wait_seconds_bucket{backend=~"$b"}[5m]))'
    assert scrape.problems(good) == []
    assert scrape.problems('gpubroker_unit_state{state="resident", instance="x"}') == []
    assert scrape.problems("rate(gpubroker_queue_waits_seconds_bucket[5m])") == [
        "no series gpubroker_queue_waits_seconds_bucket"
    ]
    assert scrape.problems('gpubroker_unit_state{unit="a"}') == [
        "gpubroker_unit_state has no label unit"
    ]
    assert scrape.problems('gpubroker_unit_state{state="loaded"}') == [
        'gpubroker_unit_state has no state="loaded"'
    ]
    assert scrape.problems("sum by (gpu) (gpubroker_unit_state)") == [
        "grouping by gpu, a label none of its series has"
    ]
    assert scrape.problems('node_memory_bytes{job="x"}') == [
        "node_memory_bytes is neither a gpubroker series nor up"
    ]
    assert not balanced("sum(rate(x[5m])") and not balanced('a{b="("}]') and balanced('a{b="("}')


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    checked = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    records = []
    for i, (_, expr) in enumerate(dashboard_queries()):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        records.append({"record": f"dashboard:query{i}", "expr": expr})
    rules = tmp_path / "dashboard-rules.yaml"
    rules.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


class NvmlLikeSim(SimTelemetry):
    """The simulated card, plus the readings only a real driver gives (utilisation, power,
    temperature…), so every GPU gauge the dashboard draws is in the scrape."""

    name = "sim-nvml-like"

    async def sample(self) -> TelemetrySnapshot:
        snap = await super().sample()
        gpus = tuple(
            replace(g, utilization=37.0, power_draw=120.0, power_limit=300.0, temperature=55.0,
                    fan=40.0, sm_clock=1800, mem_clock=9000)
            for g in snap.gpus
        )  # fmt: skip
        return replace(snap, gpus=gpus)


@pytest.mark.anyio
async def test_every_series_the_dashboard_and_alerts_use_is_in_a_running_brokers_metrics() -> None:
    gpu = SimGPU(16 * GiB, name="Sim 16G")
    gpu.allocate("desktop", GiB)  # memory no backend owns
    a = GenericEmulator(gpu, 10 * GiB, owner="a")
    b = GenericEmulator(gpu, 10 * GiB, owner="b")
    plugins = create_plugins(env={}, entry_points=False)
    plugins.telemetry[NvmlLikeSim.name] = Provided(NvmlLikeSim.name, NvmlLikeSim, "t", "t", "0")
    async with running(a.app) as ua, running(b.app) as ub, running(gpu_app(gpu)) as g:

        def generic(url: str) -> dict[str, Any]:
            return {"upstream": url, "unloadStrategy": "generic", "unloadEndpoint": "/unload"}

        cfg = make_config(
            {
                "a": {**generic(ua), "vram": "10GiB"},
                "b": {**generic(ub), "vram": "10GiB"},
                "huge": {**generic("http://127.0.0.1:9"), "vram": "20GiB"},  # down, too big
            },
            policy="budget",
            minResidency=0,
            telemetry=NvmlLikeSim.name,
            telemetryUrl=g,
            telemetryInterval="100ms",
        )
        queries = [*dashboard_queries(), *((r["alert"], r["expr"]) for r in alert_rules())]
        used = {name for _, expr in queries for name in NAME.findall(expr)}
        async with broker_running(cfg, plugins) as ep, httpx.AsyncClient(timeout=10) as client:
            for name in ("a", "b"):  # a swap: b evicts a (huge's unload fails on the way)
                r = await client.post(ep.proxies[name] + "/generate", json={})
                assert r.status_code == 200, r.text
            await client.get(ep.proxies["a"] + "/health")  # passthrough
            refused = await client.post(ep.proxies["huge"] + "/generate", json={})
            assert refused.status_code == 507
            scrape = Scrape()
            with anyio.move_on_after(10):  # until telemetry and the health probe have reported
                while not used <= (scrape := await _scrape(client, ep.status_url)).labels.keys():
                    await anyio.sleep(0.05)
    problems = [f"{where}: {p}" for where, expr in queries for p in scrape.problems(expr)]
    assert not problems, "\n".join(problems)
    # the families this issue added are drawn, and the extraction finds what it should
    assert {"gpubroker_unit_state", "gpubroker_unit_vram_bytes", "gpubroker_unmanaged_vram_bytes",
            "gpubroker_evictions_total", "gpubroker_queue_wait_seconds_bucket",
            "gpubroker_swap_duration_seconds_sum", "gpubroker_gpu_power_watts"} <= used  # fmt: skip
    assert scrape.labels["gpubroker_unmanaged_vram_bytes"]["gpu"] == {"0"}
    for rule in alert_rules():  # an annotation names only labels its expression keeps
        expr = rule["expr"]
        kept = set(TARGET_LABELS)
        for name in NAME.findall(expr):
            kept |= scrape.labels[name].keys()
        if grouped := BY.findall(expr):
            kept = {g.strip() for group in grouped for g in group.split(",")}
        text = " ".join(rule["annotations"].values())
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in kept, f"{rule['alert']} names {label}, which its expr drops"


async def _scrape(client: httpx.AsyncClient, status_url: str) -> Scrape:
    r = await client.get(status_url + "/metrics")
    r.raise_for_status()
    return Scrape.of(r.text)
