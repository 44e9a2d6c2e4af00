"""Which files under examples/ are gpubroker configs: one list for every test that loads them."""

from __future__ import annotations

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# YAML in examples/ that is not a gpubroker config (e.g. a compose file) is named here; the
# Prometheus rule file has tests of its own (tests/observe/test_operator_examples.py).
NOT_CONFIGS = {
    "compose.yaml",
    "compose.yml",
    "docker-compose.yaml",
    "docker-compose.yml",
    "prometheus-alerts.yaml",
}
# the keys examples read with `key: env:VAR` (compose/gpubroker.yaml)
EXAMPLE_ENV = {"GPUBROKER_API_KEY": "k" * 48}
# manifests (tests/e2e/test_kubernetes_example.py), a gateway's config (test_scale_out.py)
NOT_CONFIG_DIRS = {"kubernetes", "litellm"}
CONFIGS = sorted(
    p
    for p in [*EXAMPLES.rglob("*.yaml"), *EXAMPLES.rglob("*.yml")]
    if p.name not in NOT_CONFIGS and not NOT_CONFIG_DIRS & set(p.relative_to(EXAMPLES).parts)
)
