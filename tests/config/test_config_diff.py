"""What a reload sees changed, and what of it waits for a restart."""

from __future__ import annotations

from typing import Any

from gpubroker.config.diff import applicable, diff
from gpubroker.config.load import parse_config


def config(backends: list[dict[str, Any]], **top: Any) -> Any:
    return parse_config({**top, "backends": backends}, source="f.yaml")


def backend(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "proxyPort": port, "upstream": "http://127.0.0.1:9", **extra}


def test_backends_added_removed_and_changed_in_the_files_own_key_names() -> None:
    old = config([backend("a", 5001), backend("b", 5002, vram="4GiB")])
    new = config([backend("b", 5002, vram="6GiB", priority=2), backend("c", 5003)])
    changes = diff(old, new)
    assert changes.added == ("c",) and changes.removed == ("a",)
    assert changes.changed == {"b": ("vram", "priority")}
    assert changes.summary() == "added c; removed a; changed b (vram, priority)"
    assert not changes.empty and not changes.restart


def test_the_same_file_again_changes_nothing() -> None:
    old = config([backend("a", 5001)], queueTimeout="30s")
    changes = diff(old, config([backend("a", 5001)], queueTimeout="30s"))
    assert changes.empty and changes.summary() == "nothing changed"


def test_what_cannot_change_live_is_reported_and_kept_at_its_running_value() -> None:
    old = config([backend("a", 5001, gpu=0)], bind="127.0.0.1")
    new = config(
        [backend("a", 5001, gpu=1, priority=1)],
        statusPort=6000,
        policy="budget",
        queueTimeout="1m",
        holdTime="5s",
    )
    changes = diff(old, new)
    assert changes.restart == ("statusPort", "policy", "backends[a].gpu")
    assert changes.top == ("queueTimeout", "holdTime")
    assert changes.changed == {"a": ("priority",)}
    assert changes.summary().endswith("needs a restart: statusPort, policy, backends[a].gpu")
    running = applicable(old, new)
    assert (running.status_port, running.policy) == (old.status_port, "exclusive")
    assert running.queue_timeout == 60.0 and running.backends[0].priority == 1
    assert running.backends[0].gpu == old.backends[0].gpu
    again = diff(running, new)  # the same file later: the restart is still owed, nothing else
    assert again.empty and again.restart == changes.restart


def test_a_key_this_module_does_not_know_needs_a_restart() -> None:
    old = config([backend("a", 5001)])
    new = config([backend("a", 5001)], stateDir="/tmp/elsewhere", apiPort=5100)
    assert set(diff(old, new).restart) == {"stateDir", "apiPort"}
