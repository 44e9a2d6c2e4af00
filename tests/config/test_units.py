from __future__ import annotations

import pytest

from gpubroker.config.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10.0),
        ("2m", 120.0),
        ("1.5h", 5400.0),
        ("250ms", 0.25),
        (" 3 s ", 3.0),
        ("7", 7.0),
        (0, 0.0),
        (30, 30.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "10 sec", "-5s", "1d", "", True, None, -1, float("nan")])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="a duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("9GiB", 9 * 2**30),
        ("512MiB", 512 * 2**20),
        ("24GB", 24 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("9gib", 9 * 2**30),
        ("2 Gi", 2 * 2**30),
        ("100", 100),
        ("100B", 100),
        ("4k", 4000),
        ("1TiB", 2**40),
        (2048, 2048),
    ],
)
def test_parse_size(text: object, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("bad", ["lots", "9 gigs", "-1GiB", "GiB", True, None, -1, 1.5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="a size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (None, "?"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1536, "1.5 KiB"),
        (512 * 2**20, "512.0 MiB"),
        (9 * 2**30, "9.0 GiB"),
        (2 * 2**40, "2048.0 GiB"),
    ],
)
def test_format_size(nbytes: int | None, text: str) -> None:
    assert format_size(nbytes) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (10, "10s"), (90, "90s"), (120, "2m"), (1.5, "1.5s"), (3600, "60m")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [0.25, 1, 10, 90, 120, 600, 3600])
def test_format_duration_reads_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds
