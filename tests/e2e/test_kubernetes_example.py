"""examples/kubernetes/: every manifest valid against the Kubernetes schemas (offline: the
``kubernetes-validate`` package bundles them), the ServiceMonitor against the part of the
Prometheus Operator's CRD it uses, and the pieces agreeing with each other and with the config
the ConfigMap holds, which ``gpubroker serve --check`` accepts."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from gpubroker.cli.main import app
from gpubroker.config.load import load_config_file

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

K8S = Path(__file__).resolve().parents[2] / "examples" / "kubernetes"
VERSION = "1.30"  # the oldest Kubernetes the example is for (still supported by the big clouds)
KEY_VAR = "GPUBROKER_GATEWAY_KEY"

# The ServiceMonitor fields the example may use, as the Prometheus Operator's CRD
# (monitoring.coreos.com_servicemonitors.yaml, v1) types them: spec needs endpoints and
# selector; a duration is Prometheus' (e.g. 15s, 1m30s); scheme is one of four spellings.
# Unlike the API server, which drops unknown fields of a CRD silently, this refuses them, so a
# misspelt field fails here instead of being ignored in a cluster.
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {
            "type": "string",
            "enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "labelmap", "LabelMap"],
        },
        "sourceLabels": _STRINGS,
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "replacement": {"type": "string"},
        "separator": {"type": "string"},
    },
}
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["endpoints", "selector"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": _STRINGS},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABEL},
                        },
                    },
                },
            },
        },
    },
}


def manifests() -> dict[str, dict[str, Any]]:
    """Every object of every file in examples/kubernetes/, by ``Kind/name``."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in YAML(typ="safe").load_all(path.read_text()):
            if doc is not None:
                out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


OBJECTS = manifests()
BUILTIN = {k: v for k, v in OBJECTS.items() if not k.startswith("ServiceMonitor/")}


def the(kind: str) -> dict[str, Any]:
    [obj] = [v for k, v in OBJECTS.items() if k.startswith(kind + "/")]
    return obj


def test_the_example_has_every_part() -> None:
    kinds = {k.split("/")[0] for k in OBJECTS}
    assert {"Namespace", "ConfigMap", "DaemonSet", "Service", "ServiceMonitor"} <= kinds


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_each_manifest_is_valid_against_the_kubernetes_schema(name: str) -> None:
    # strict: a field the schema does not know is an error, not silently dropped
    kubernetes_validate.validate(BUILTIN[name], VERSION, strict=True)


def test_a_misspelt_field_fails_the_schema_check() -> None:
    broken = copy.deepcopy(the("DaemonSet"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSION, strict=True)


def test_the_service_monitor_matches_the_operator_crd_subset() -> None:
    monitor = the("ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR)
    for bad in ({"interval": "15 seconds"}, {"scheme": "tcp"}, {"portt": "status"}):
        broken = copy.deepcopy(monitor)
        broken["spec"]["endpoints"][0].update(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, SERVICE_MONITOR)
    missing = copy.deepcopy(monitor)
    del missing["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(missing, SERVICE_MONITOR)


def config_text() -> str:
    return str(the("ConfigMap")["data"]["gpubroker.yaml"])


def test_the_configmap_holds_a_config_serve_check_accepts(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = clean_env / "gpubroker.yaml"
    path.write_text(config_text())
    monkeypatch.setenv(KEY_VAR, "k" * 48)  # what the Secret gives the pod
    result = CliRunner().invoke(app, ["serve", "--check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    # without the Secret's key the broker refuses to start: an open apiPort beyond loopback
    monkeypatch.delenv(KEY_VAR)
    result = CliRunner().invoke(app, ["serve", "--check", "--config", str(path)])
    assert result.exit_code == 2 and KEY_VAR in result.output


def test_the_pod_the_config_and_the_service_agree(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_VAR, "k" * 48)
    path = clean_env / "gpubroker.yaml"
    path.write_text(config_text())
    cfg = load_config_file(path)
    pod = the("DaemonSet")["spec"]["template"]["spec"]
    broker, *services = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
    assert ports == {"api": cfg.api_port, "status": cfg.status_port}
    # probes on the status port's /health; the config is the ConfigMap, mounted where serve
    # reads it; the key comes from a Secret under the variable the config names
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert broker[probe]["httpGet"] == {"path": "/health", "port": "status"}
    [config_arg] = [a for a in broker["args"] if a.endswith(".yaml")]
    [mount] = [m for m in broker["volumeMounts"] if m["name"] == "config"]
    assert config_arg == f"{mount['mountPath']}/gpubroker.yaml"
    [volume] = [v for v in pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == the("ConfigMap")["metadata"]["name"]
    [env] = [e for e in broker["env"] if e["name"] == KEY_VAR]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "gpubroker-keys", "key": "gateway"}
    assert [k.env for k in cfg.api_keys] == [KEY_VAR]
    # the state directory is a volume, not the container's own disk
    [state] = [m for m in broker["volumeMounts"] if m["name"] == "state"]
    assert cfg.state_dir == state["mountPath"]
    # every container that uses the card asks the device plugin for it
    assert all(c["resources"]["limits"]["nvidia.com/gpu"] == 1 for c in pod["containers"])
    # the services listen on the pod's loopback, where the config's upstreams point
    upstreams = {b.name: b.upstream for b in cfg.backends}
    assert upstreams == {"ollama": "http://127.0.0.1:11434", "comfyui": "http://127.0.0.1:8188"}
    [ollama] = [c for c in services if c["name"] == "ollama"]
    assert {"name": "OLLAMA_HOST", "value": "127.0.0.1:11434"} in ollama["env"]
    [comfyui] = [c for c in services if c["name"] == "comfyui"]
    assert comfyui["args"][:4] == ["--listen", "127.0.0.1", "--port", "8188"]
    # in-flight responses end before the kubelet's SIGKILL
    assert pod["terminationGracePeriodSeconds"] > cfg.shutdown_grace
    # the Service, the NetworkPolicy and the ServiceMonitor reach the broker's named ports
    service = the("Service")
    assert service["spec"]["clusterIP"] == "None"  # one endpoint per node, never balanced
    labels = the("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"api", "status"}
    allowed = {p["port"] for p in the("NetworkPolicy")["spec"]["ingress"][0]["ports"]}
    assert allowed == {cfg.api_port, cfg.status_port}  # not the proxy ports
    monitor = the("ServiceMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [(e["port"], e["path"]) for e in monitor["endpoints"]] == [("status", "/metrics")]


def test_every_object_is_in_the_examples_namespace() -> None:
    for name, obj in OBJECTS.items():
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == the("Namespace")["metadata"]["name"], name
