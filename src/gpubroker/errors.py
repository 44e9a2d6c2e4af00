"""Every error gpubroker raises on purpose, in one tree.

    GPUBrokerError                 base: carries a one-line message fit for a terminal
    ├── ConfigError                a config file or env var is wrong (CLI exit code 2)
    ├── PluginError                a plugin failed to import or to register (exit code 2)
    ├── UsageError                 a command was used wrongly (exit code 2)
    └── BrokerUnreachable          the CLI cannot reach a running broker (exit code 3)

Errors a *client of the proxy* sees are not exceptions: they are JSON responses built in
``gpubroker.responses`` (502 unreachable, 503 queue timeout, 504 upstream timeout, 507 never fits).
"""

from __future__ import annotations


class GPUBrokerError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with when this reaches it."""

    exit_code = 1


class ConfigError(GPUBrokerError):
    """A configuration problem, located as precisely as we can: file:line:col: key.path: why."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
        keypath: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.column = column
        self.keypath = keypath
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.source:
            where = self.source
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        key = f"{self.keypath}: " if self.keypath else ""
        return f"{where}{key}{self.message}"


class PluginError(GPUBrokerError):
    exit_code = 2


class UsageError(GPUBrokerError):
    exit_code = 2


class BrokerUnreachable(GPUBrokerError):
    exit_code = 3
