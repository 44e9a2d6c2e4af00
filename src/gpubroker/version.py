"""The installed version, in one place (the package and the plugin manager both report it)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gpubroker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
