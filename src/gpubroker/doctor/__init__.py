"""``gpubroker doctor``: checks a set-up and says, for each finding, what to change.

``findings`` is what a check reports (:class:`Finding`: a severity, a message, a fix) and its
JSON shape; ``run`` runs every check at once, each bounded in time (:func:`diagnose`). One module
per family of checks: ``gpu`` (NVML and the driver, declared sizes against the cards),
``services`` (each upstream reachable, what it is, its version; the vLLM, Ollama and ComfyUI
specifics in ``vllm``, ``ollama`` and ``comfyui``), ``local`` (the process behind a loopback
upstream, or the one ``command:`` starts: its argv and environment), ``ports`` (the broker's own
ports free, or held by a running gpubroker), ``setup`` (config warnings and managed workers'
commands).

Reads the config, telemetry, workers (their launch and process helpers) and the scheduler's
capacities; imported only by ``cli``.
"""

from gpubroker.doctor.findings import Finding, Severity, exit_code
from gpubroker.doctor.run import diagnose

__all__ = ["Finding", "Severity", "diagnose", "exit_code"]
