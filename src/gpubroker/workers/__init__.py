"""Managed workers: the GPU services gpubroker starts, pins, supervises and stops itself.

``supervisor`` holds the worker state machine, adoption after a restart and crash recovery;
``procs`` the process-tree work (signals, reaping, port checks), run in threads; ``parts`` the
log ring buffer and restart backoff; ``routes`` the ``/api/workers`` admin routes. May import
``config``, ``errors``, ``events`` and ``observe.telemetry.base``; the routes also reach the
broker, through ``scheduling``, and list workers from the status app's read model.
"""
