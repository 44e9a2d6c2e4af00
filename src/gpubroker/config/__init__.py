"""Configuration: YAML and environment variables into frozen, typed objects.

``model`` is what a resolved config is (``Config``, ``BackendConfig``, ``GpuSpec``, ``Policy``
and the defaults), ``keys`` names each file key with the parser of its value, ``load`` reads and
validates a file or the env-var quick mode (every error located at file:line:col: key), finds
the config a command uses and sums it up; ``rules`` checks and resolves the residency rules
between backends and models (``exclusiveWith``, ``pinned``); ``units`` reads sizes and
durations; ``hosts`` is what a Host name is (the ``allowedHosts`` key and the status port's Host
check share it).

The bottom of the house: imports nothing of gpubroker's but ``errors``.
"""
