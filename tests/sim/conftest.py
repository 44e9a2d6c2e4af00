"""Fixtures shared by the emulator tests: every test runs on asyncio (Hypercorn needs it)."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
