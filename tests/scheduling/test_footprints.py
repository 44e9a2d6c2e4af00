"""The footprint book: learned sizes survive a restart, and a bad file or disk never stops us."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from gpubroker.scheduling.footprints import STALE_AFTER, FootprintBook
from gpubroker.testing import make_config
from gpubroker.vram import GiB

pytestmark = pytest.mark.anyio

NOW = 1_750_000_000.0
LOGGER = "gpubroker.scheduling.footprints"


def clock(t: float = NOW) -> Callable[[], float]:
    return lambda: t


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def write(path: Path, footprints: Any, version: Any = 1) -> None:
    path.write_text(json.dumps({"version": version, "footprints": footprints}))


async def test_footprints_survive_a_restart_in_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "gpubroker" / "footprints.json"
    book = FootprintBook(path, clock=clock())
    await book.load()  # no file yet: an empty book, nothing said
    book.record("ollama/llama3:latest", 6 * GiB)
    book.record("comfyui:sd_xl_base_1.0.safetensors", 7 * GiB)
    await book.save()

    again = FootprintBook(path, clock=clock(NOW + 60))
    await again.load()
    assert again.items() == {
        "ollama/llama3:latest": 6 * GiB,
        "comfyui:sd_xl_base_1.0.safetensors": 7 * GiB,
    }
    assert again.get("ollama/llama3:latest") == 6 * GiB and again.get("vllm") is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    on_disk = json.loads(path.read_text())
    assert on_disk["version"] == 1
    assert on_disk["footprints"]["ollama/llama3:latest"] == {"bytes": 6 * GiB, "at": NOW}
    assert os.listdir(path.parent) == ["footprints.json"]  # no temp file left


async def test_a_missing_file_is_an_empty_book_and_no_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    book = FootprintBook(tmp_path / "footprints.json")
    with caplog.at_level(logging.DEBUG, LOGGER):
        await book.load()
    assert book.items() == {} and warnings(caplog) == []


CORRUPT: dict[str, bytes | str] = {
    "not JSON": b'{"version": 1, "footprints": {',
    "not UTF-8": b"\xff\xfe\x00junk",
    "nested too deep": b"[" * 100_000,  # json.loads raises RecursionError, not ValueError
    "a list": b"[1, 2]",
    "version 2": json.dumps({"version": 2, "footprints": {}}).encode(),
    "no version": json.dumps({"footprints": {}}).encode(),
    "footprints a list": json.dumps({"version": 1, "footprints": [1]}).encode(),
    "entry a number": json.dumps({"version": 1, "footprints": {"a": 5}}).encode(),
    "negative bytes": json.dumps({"version": 1, "footprints": {"a": {"bytes": -1, "at": NOW}}}),
    "zero bytes": json.dumps({"version": 1, "footprints": {"a": {"bytes": 0, "at": NOW}}}),
    "string bytes": json.dumps({"version": 1, "footprints": {"a": {"bytes": "5", "at": NOW}}}),
    "float bytes": json.dumps({"version": 1, "footprints": {"a": {"bytes": 5.5, "at": NOW}}}),
    "bool bytes": json.dumps({"version": 1, "footprints": {"a": {"bytes": True, "at": NOW}}}),
    "17 TiB": json.dumps({"version": 1, "footprints": {"a": {"bytes": 17 * 2**40, "at": NOW}}}),
    "no time": json.dumps({"version": 1, "footprints": {"a": {"bytes": GiB}}}).encode(),
    "time a string": json.dumps(
        {"version": 1, "footprints": {"a": {"bytes": GiB, "at": "yesterday"}}}
    ),
    "time infinite": b'{"version": 1, "footprints": {"a": {"bytes": 1024, "at": Infinity}}}',
}


@pytest.mark.parametrize("why", list(CORRUPT))
async def test_a_corrupt_file_is_one_warning_and_an_empty_book_then_replaced(
    why: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "footprints.json"
    content = CORRUPT[why]
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    book = FootprintBook(path, clock=clock())
    with caplog.at_level(logging.DEBUG, LOGGER):
        await book.load()
    assert book.items() == {}
    (line,) = warnings(caplog)
    assert str(path) in line and "ignored (" in line
    book.record("a", GiB)  # the next save writes a good file over it
    await book.save()
    fresh = FootprintBook(path, clock=clock())
    await fresh.load()
    assert fresh.items() == {"a": GiB}


async def test_an_unreadable_file_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "footprints.json"
    path.mkdir()  # something is there, and it cannot be read as a file
    book = FootprintBook(path)
    with caplog.at_level(logging.DEBUG, LOGGER):
        await book.load()
    (line,) = warnings(caplog)
    assert str(path) in line and "unreadable" in line and book.items() == {}


async def test_footprints_not_seen_for_months_are_forgotten(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    write(
        path,
        {
            "old": {"bytes": GiB, "at": NOW - STALE_AFTER - 1},
            "recent": {"bytes": 2 * GiB, "at": NOW - 3600},
        },
    )
    book = FootprintBook(path, clock=clock())
    await book.load()
    assert book.items() == {"recent": 2 * GiB}


async def test_seeing_the_same_size_again_writes_nothing_until_it_would_go_stale(
    tmp_path: Path,
) -> None:
    now = [NOW]
    book = FootprintBook(tmp_path / "footprints.json", clock=lambda: now[0])
    book.record("a", GiB)
    await book.save()
    book.record("a", GiB)  # every sample of a resident unit says the same
    assert not book.dirty
    now[0] += 2 * 86400  # two days on, it is re-dated so it never expires while in use
    book.record("a", GiB)
    assert book.dirty
    await book.save()
    assert json.loads(book.path.read_text())["footprints"]["a"]["at"] == NOW + 2 * 86400  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [0, -GiB, True, 17 * 2**40, 1.5])
def test_only_a_positive_size_is_recorded(bad: Any) -> None:
    book = FootprintBook(None)
    book.record("a", bad)
    book.record("", GiB)
    assert book.items() == {} and not book.dirty


async def test_a_size_recorded_before_the_load_wins_over_the_files(tmp_path: Path) -> None:
    path = tmp_path / "footprints.json"
    write(path, {"a": {"bytes": GiB, "at": NOW}, "b": {"bytes": GiB, "at": NOW}})
    book = FootprintBook(path, clock=clock())
    book.record("a", 3 * GiB)
    await book.load()
    assert book.items() == {"a": 3 * GiB, "b": GiB}


async def test_an_in_memory_book_never_touches_a_disk(tmp_path: Path) -> None:
    book = FootprintBook(None)
    await book.load()
    book.record("a", GiB)
    await book.save()
    assert book.get("a") == GiB and not book.dirty


async def test_a_directory_that_cannot_be_written_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    book = FootprintBook(blocker / "gpubroker" / "footprints.json")
    with caplog.at_level(logging.DEBUG, LOGGER):
        book.record("a", GiB)
        await book.save()
        book.record("b", GiB)
        await book.save()  # the same trouble again: not said again
    (line,) = warnings(caplog)
    assert "footprints not saved to" in line and str(blocker) in line
    assert book.items() == {"a": GiB, "b": GiB} and book.dirty  # kept, and tried again later
    blocker.unlink()  # the disk is fixed: the next save writes it all
    await book.save()
    fresh = FootprintBook(book.path)
    await fresh.load()
    assert fresh.items() == {"a": GiB, "b": GiB}


async def test_a_write_that_fails_before_the_rename_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "footprints.json"
    book = FootprintBook(path, clock=clock())
    book.record("a", GiB)
    await book.save()
    before = path.read_bytes()

    def crash(src: Any, dst: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "replace", crash)
    book.record("a", 2 * GiB)
    with caplog.at_level(logging.DEBUG, LOGGER):
        await book.save()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["footprints.json"]  # the temp file is gone
    (line,) = warnings(caplog)
    assert "Read-only file system" in line
    monkeypatch.undo()
    await book.save()
    assert json.loads(path.read_text())["footprints"]["a"]["bytes"] == 2 * GiB


async def test_saves_asked_for_during_a_write_make_one_more_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "footprints.json"
    book = FootprintBook(path, clock=clock())
    real = os.replace
    entered, go = threading.Event(), threading.Event()
    writes: list[dict[str, Any]] = []

    def slow_replace(src: Any, dst: Any) -> None:
        writes.append(json.loads(Path(src).read_text())["footprints"])
        entered.set()
        go.wait(10)  # the first write is held here while the others are asked for
        real(src, dst)

    monkeypatch.setattr(os, "replace", slow_replace)
    book.record("a", GiB)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(book.save)
            while not entered.is_set():
                await anyio.sleep(0.01)
            book.record("b", 2 * GiB)  # learned while the first write is on disk's way
            for _ in range(5):
                tg.start_soon(book.save)
            await anyio.sleep(0.05)
            go.set()
    assert writes == [
        {"a": {"bytes": GiB, "at": NOW}},
        {"a": {"bytes": GiB, "at": NOW}, "b": {"bytes": 2 * GiB, "at": NOW}},
    ]
    assert not book.dirty


def test_the_book_lives_in_the_configs_state_directory(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
    cfg = make_config({"a": {"upstream": "http://a"}}, stateDir=str(tmp_path / "s"))
    assert FootprintBook.for_config(cfg, env).path == tmp_path / "s" / "footprints.json"
    plain = make_config({"a": {"upstream": "http://a"}})
    assert FootprintBook.for_config(plain, env).path == (
        tmp_path / "xdg" / "gpubroker" / "footprints.json"
    )


async def test_a_book_in_the_xdg_state_home_is_written_there(tmp_path: Path) -> None:
    xdg = tmp_path / "xdg-state"
    cfg = make_config({"a": {"upstream": "http://a"}})
    book = FootprintBook.for_config(cfg, {"XDG_STATE_HOME": str(xdg), "HOME": "/nonexistent"})
    book.record("vllm", 20 * GiB)
    await book.save()
    assert (
        json.loads((xdg / "gpubroker" / "footprints.json").read_text())["footprints"]["vllm"][
            "bytes"
        ]
        == 20 * GiB
    )
