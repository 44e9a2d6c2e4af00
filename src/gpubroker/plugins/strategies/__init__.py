"""Unload strategies: how each kind of service frees its VRAM and comes back."""

from gpubroker.plugins.strategies.base import Strategy, StrategyContext

__all__ = ["Strategy", "StrategyContext"]
