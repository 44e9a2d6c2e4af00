"""Configuration: YAML and environment variables into frozen, typed objects.

``load`` parses and validates (every error located at file:line:col: key), ``units`` reads
sizes and durations, ``initfile`` writes the ``gpubroker init`` template, ``detect`` finds the
GPUs and services ``init`` offers. Imports nothing of gpubroker's but ``errors`` and the
telemetry base types ``detect`` reads.
"""
