"""The plugin API and the builtins, all through one pluggy hook set.

``hookspecs`` is the contract for authors (``gpubroker.hookimpl``), ``manager`` loads the
``gpubroker`` entry-point group and the builtins through the same hooks, ``strategies/`` and
``classifiers/`` hold the base types and the builtin implementations. May import ``config``,
``errors`` and ``workers.strategy`` (the ``process`` strategy, registered with the builtins).
"""
