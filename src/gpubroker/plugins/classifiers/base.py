"""What a GPU-endpoint classifier is: a fast, pure decision on one request line."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import ClassVar


class Classifier:
    """Base class; subclass it, set ``name`` and override ``is_gpu``.

    ``is_gpu`` runs for every proxied request, so it must be quick and must not do I/O.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""

    def is_gpu(self, method: str, path: str) -> bool:
        """True when ``method path`` (path without the query string) needs the GPU."""
        return False


class RouteClassifier(Classifier):
    """A classifier from a fixed table of ``"METHOD /path"`` patterns (``*`` globs allowed).

    A pattern without a method matches POST only, since GPU work is never a GET on the services
    we know; ``"* /path"`` matches any method.
    """

    routes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, routes: Iterable[str] | None = None) -> None:
        exact: set[tuple[str, str]] = set()
        globs: list[tuple[str, str]] = []
        for route in self.routes if routes is None else routes:
            method, _, path = route.strip().rpartition(" ")
            method = (method.strip() or "POST").upper()
            if any(c in path for c in "*?["):
                globs.append((method, path))
            else:
                exact.add((method, path))
        self._exact = frozenset(exact)
        self._globs = tuple(globs)

    def is_gpu(self, method: str, path: str) -> bool:
        if (method, path) in self._exact or ("*", path) in self._exact:
            return True
        return any(
            (m == "*" or m == method) and fnmatch.fnmatchcase(path, pattern)
            for m, pattern in self._globs
        )
