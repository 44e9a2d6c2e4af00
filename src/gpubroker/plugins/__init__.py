"""The plugin API and the builtins, all through one pluggy hook set.

``hookspecs`` is the contract for authors (``gpubroker.hookimpl``); ``manager`` builds the
plugin manager, loads the ``gpubroker`` entry-point group and picks the telemetry source;
``builtin`` registers every builtin in one place, through the same hooks; ``strategies/`` and
``classifiers/`` hold the base types and the builtin implementations (``strategies/process``
stops and starts managed workers).

May import ``config``, ``errors``, ``vram``, ``telemetry`` and ``workers`` (the supervisor the
``process`` strategy drives); never ``scheduling``, ``proxy``, ``observe`` or ``cli``.
"""
