"""The warnings engine, rule by rule, on plain data."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gpubroker.config.model import BackendConfig
from gpubroker.observe.alerts import Alerts, Facts
from gpubroker.observe.attribution import Attribution, OwnedProcess
from gpubroker.telemetry.base import GpuSample, TelemetrySnapshot
from gpubroker.vram import freed_goal

GiB = 2**30
MiB = 2**20

OLLAMA = BackendConfig("ollama", 5001, "http://127.0.0.1:11434", vram=6 * GiB)
COMFY = BackendConfig("comfyui", 5002, "http://127.0.0.1:8188", gpu=(0,))


def facts(
    now: float = 100.0,
    *,
    used: int | None = 8 * GiB,
    processes: tuple[OwnedProcess, ...] = (),
    measured: dict[str, dict[str, int | None]] | None = None,
    states: dict[str, str] | None = None,
    health: dict[str, Any] | None = None,
    error: str | None = None,
) -> Facts:
    gpu = GpuSample("GPU-a", 0, "card", memory_total=24 * GiB, memory_used=used)
    return Facts(
        now=now,
        snapshot=TelemetrySnapshot(taken_at=now, gpus=(gpu,), error=error),
        attribution=Attribution(processes, measured or {}),
        backends=(OLLAMA, COMFY),
        states=states or {"ollama": "resident", "comfyui": "absent"},
        gpus={"ollama": ("0",), "comfyui": ("0",)},
        health=health or {},
    )


def codes(alerts: Alerts) -> list[tuple[str, str]]:
    return [(a.code, a.subject) for a in alerts.current()]


def test_quiet_when_all_is_well() -> None:
    alerts = Alerts()
    ok = OwnedProcess("0", 10, "ollama", 6 * GiB, "ollama")
    assert alerts.evaluate(facts(processes=(ok,), measured={"ollama": {"0": 6 * GiB}})) == ([], [])


def test_backend_down_keeps_its_since_and_names_the_last_good_probe() -> None:
    alerts = Alerts()
    up = {"ollama": {"status": "up", "latencyMs": 12.0, "checkedAt": 90.0}}
    alerts.evaluate(facts(90.0, health=up))
    down = {"ollama": {"status": "down", "latencyMs": 2000.0, "error": "ConnectError"}}
    raised, _ = alerts.evaluate(facts(100.0, health=down))
    assert [a.code for a in raised] == ["backend_down"]
    assert raised[0].since == 100.0 and raised[0].backend == "ollama"
    assert raised[0].message == (
        "ollama fails its health probe (ConnectError); last good probe took 12 ms, 10s ago"
    )
    raised, _ = alerts.evaluate(facts(130.0, health=down))
    assert raised == []  # still the same alert…
    (alert,) = alerts.current()
    assert alert.since == 100.0 and "40s ago" in alert.message  # …with its first since
    _, cleared = alerts.evaluate(facts(140.0, health=up))
    assert [a.code for a in cleared] == ["backend_down"] and alerts.current() == []


def test_backend_down_from_the_start_says_so() -> None:
    alerts = Alerts()
    alerts.evaluate(facts(health={"comfyui": {"status": "down", "code": 503}}))
    (alert,) = alerts.current()
    assert alert.message == (
        "comfyui fails its health probe (HTTP 503); no probe has succeeded since the broker started"
    )


def test_unmanaged_process_but_not_small_or_invisible_ones() -> None:
    alerts = Alerts()
    procs = (
        OwnedProcess("0", 77, "python3", 3 * GiB, None),
        OwnedProcess("0", 78, "Xorg", 100 * MiB, None),  # a desktop's few MiB
        OwnedProcess("0", 79, None, 5 * GiB, None, visible=False),  # another pid namespace
        OwnedProcess("0", 80, "mystery", None, None),  # size unknown, still worth a look
    )
    alerts.evaluate(facts(processes=procs))
    assert codes(alerts) == [
        ("unmanaged_gpu_process", "pid 77 on GPU 0"),
        ("unmanaged_gpu_process", "pid 80 on GPU 0"),
    ]
    first = alerts.current()[0].message
    assert first.startswith("pid 77 (python3) holds 3.0 GiB on GPU 0 and belongs to no backend")


def test_gpu_near_full_at_the_threshold() -> None:
    alerts = Alerts(near_full=0.9)
    alerts.evaluate(facts(used=int(21.5 * GiB)))
    assert codes(alerts) == []
    alerts.evaluate(facts(used=int(21.7 * GiB)))
    assert codes(alerts) == [("gpu_near_full", "GPU 0")]
    assert alerts.current()[0].message == "GPU 0 memory is 90% used (21.7 GiB of 24.0 GiB)"
    alerts.evaluate(facts(used=None))  # unknown is not "full"
    assert codes(alerts) == []


def test_worker_on_the_wrong_gpu_only_when_a_gpu_was_set() -> None:
    alerts = Alerts()
    procs = (
        OwnedProcess("1", 20, "python", 2 * GiB, "comfyui"),  # set to GPU 0, runs on 1
        OwnedProcess("1", 10, "ollama", 2 * GiB, "ollama"),  # no gpu: set, so wherever it likes
    )
    alerts.evaluate(facts(processes=procs))
    assert codes(alerts) == [("pinned-to-wrong-GPU", "comfyui on GPU 1")]
    assert "pin it with CUDA_VISIBLE_DEVICES" in alerts.current()[0].message


def test_a_managed_worker_is_pinned_even_without_a_gpu_set() -> None:
    """gpubroker pins a managed worker itself (to GPU 0 unless ``gpu:`` says otherwise), so a
    worker found elsewhere is worth one warning: this rule's, there is no other."""
    worker = BackendConfig("worker", 5003, "http://127.0.0.1:9000", command=("serve",))
    alerts = Alerts()
    on_1 = OwnedProcess("1", 30, "serve", 2 * GiB, "worker")
    base = facts(processes=(on_1,))
    pinned = replace(base, backends=(*base.backends, worker), gpus={**base.gpus, "worker": ("0",)})
    raised, _ = alerts.evaluate(pinned)
    assert [(a.code, a.subject, a.backend) for a in raised] == [
        ("pinned-to-wrong-GPU", "worker on GPU 1", "worker")
    ]
    assert raised[0].message == (
        "worker is set to GPU 0 but its pid 30 (serve) runs on GPU 1; gpubroker pins it with "
        "CUDA_VISIBLE_DEVICES: does its command choose a device itself?"
    )
    on_0 = replace(on_1, gpu="0")
    _, cleared = alerts.evaluate(replace(pinned, attribution=Attribution((on_0,), {})))
    assert [a.code for a in cleared] == ["pinned-to-wrong-GPU"] and alerts.current() == []


def test_declared_vram_far_from_measured_while_resident() -> None:
    alerts = Alerts()
    alerts.evaluate(facts(measured={"ollama": {"0": int(6.5 * GiB)}}))
    assert codes(alerts) == []  # close enough
    alerts.evaluate(facts(measured={"ollama": {"0": int(9.3 * GiB)}}))
    assert codes(alerts) == [("vram_mismatch", "ollama")]
    assert alerts.current()[0].message == (
        "ollama declares vram 6.0 GiB but holds 9.3 GiB; set `vram: 10GiB`"
    )
    alerts.evaluate(facts(measured={"ollama": {"0": 500 * MiB}}))
    assert codes(alerts) == []  # resident but nearly empty: it unloaded itself, not mis-sized
    alerts.evaluate(facts(measured={"ollama": {"0": 3 * GiB}}))
    assert alerts.current()[0].message == (
        "ollama declares vram 6.0 GiB but holds 3.0 GiB; set `vram: 3.5GiB`"
    )
    absent = {"ollama": "absent", "comfyui": "absent"}
    alerts.evaluate(facts(measured={"ollama": {"0": int(9.3 * GiB)}}, states=absent))
    assert codes(alerts) == []


def test_a_model_placed_by_itself_is_held_to_its_own_declared_vram() -> None:
    alerts = Alerts()
    # Ollama holds 15 GiB in all for two models: no longer a mismatch of the backend's 6 GiB,
    # but llama3's own declared 4 GiB against the 9.3 GiB measured for it is.
    models = {
        "ollama/llama3:latest": ("ollama", 4 * GiB, int(9.3 * GiB)),
        "ollama/small:latest": ("ollama", 6 * GiB, int(5.8 * GiB)),
    }
    split = replace(
        facts(measured={"ollama": {"0": 15 * GiB}}), models=models, split=frozenset({"ollama"})
    )
    alerts.evaluate(split)
    assert codes(alerts) == [("vram_mismatch", "ollama/llama3:latest")]
    [alert] = alerts.current()
    assert alert.backend == "ollama" and alert.message == (
        "ollama/llama3:latest declares vram 4.0 GiB but holds 9.3 GiB; set `vram: 10GiB` on "
        "that model under ollama's models:"
    )


def test_unload_that_did_not_free_memory() -> None:
    alerts = Alerts()
    gone = {"ollama": "absent", "comfyui": "absent"}
    alerts.unloaded("ollama", at=100.0, held_before=6 * GiB)
    held = {"ollama": {"0": 5 * GiB}}
    alerts.evaluate(facts(101.0, measured=held, states=gone))
    assert codes(alerts) == []  # a service may take a moment to hand memory back
    alerts.evaluate(facts(104.0, measured=held, states=gone))
    assert codes(alerts) == [("unload_not_freed", "ollama")]
    assert alerts.current()[0].message == (
        "ollama was unloaded 4s ago but still holds 5.0 GiB of 6.0 GiB"
    )
    alerts.evaluate(facts(106.0, measured={"ollama": {"0": 200 * MiB}}, states=gone))
    assert codes(alerts) == []  # freed at last; a CUDA context's worth may stay
    alerts.evaluate(facts(108.0, measured=held, states=gone))
    assert codes(alerts) == []  # that unload is settled; nothing re-raises it


@pytest.mark.parametrize(
    ("before", "after", "warned"),
    [
        (8 * GiB, 3 * GiB, True),  # more than a quarter still held: the unload did not free it
        (8 * GiB, 2 * GiB, False),  # a quarter: freed (the rule telemetry's confirmation uses)
        (1 * GiB, 500 * MiB, False),  # under the 512 MiB floor: a CUDA context may stay
        (1 * GiB, 600 * MiB, True),
    ],
)
def test_unload_not_freed_uses_the_one_freed_rule(before: int, after: int, warned: bool) -> None:
    alerts = Alerts()
    gone = {"ollama": "absent", "comfyui": "absent"}
    alerts.unloaded("ollama", at=100.0, held_before=before)
    alerts.evaluate(facts(104.0, measured={"ollama": {"0": after}}, states=gone))
    assert (codes(alerts) == [("unload_not_freed", "ollama")]) is warned
    assert (after > freed_goal(before)) is warned


def test_a_backend_brought_back_is_not_an_unload_that_failed() -> None:
    alerts = Alerts()
    alerts.unloaded("ollama", at=100.0, held_before=None)
    alerts.evaluate(facts(110.0, measured={"ollama": {"0": 6 * GiB}}))  # resident again
    assert codes(alerts) == []


def test_failed_telemetry_is_a_warning_and_hides_the_gpu_rules() -> None:
    alerts = Alerts(near_full=0.1)
    alerts.evaluate(facts())
    assert codes(alerts) == [("gpu_near_full", "GPU 0")]
    f = facts(error="NVML read failed: GPU is lost")
    f = replace(f, snapshot=replace(f.snapshot, gpus=(GpuSample("GPU-a", 0, "card"),)))
    raised, cleared = alerts.evaluate(f)
    assert [a.code for a in raised] == ["telemetry_failed"]
    assert [a.code for a in cleared] == ["gpu_near_full"]
    assert alerts.current()[0].message == "GPU telemetry failed: NVML read failed: GPU is lost"
