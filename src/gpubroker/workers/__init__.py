"""Managed workers: the GPU services gpubroker starts, pins, supervises and stops itself.

``supervisor`` holds the worker state machine (start, stop, crash recovery, health checks) and
is the one entry point; ``worker`` the record of one worker (its state, command and log);
``adopt`` what an earlier run left (adopted, waited for or stopped, by one rule: ``judge``) and
strays (``stop --pid``); ``records`` the state file's record of each worker's process;
``deathsig`` the wrapper that makes a worker die with its broker (Linux); ``spawn`` starting a
process, tied or detached; ``procs`` the process-tree work (signals, reaping, port checks), run
in threads; ``parts`` the log ring buffer and restart backoff; ``start`` the one on-demand
start. The start-up ``preload:`` of a worker is a preload too (``scheduling/preload.py``).

**Who starts a worker.** On demand, exactly one path: the broker's load effect calls
``start.start_before_load`` (the one call of ``Supervisor.start`` outside the supervisor)
before the backend's strategy's ``load()``, whatever the strategy. A request that queues for a
stopped worker gets there through the scheduler's plan; ``gpubroker workers start|ensure|
restart`` through ``broker.preload`` (``observe/worker_routes.py``), which first forces the
eviction of a worker the scheduler still counts resident while its process is not ready, so the
scheduler stays truthful. The supervisor starts workers by itself only for ``autostart`` and to
restart after a crash. The ``process`` strategy (``plugins/strategies/process.py``) stops them
to free their VRAM; its ``load()`` only confirms the worker is ready.

May import ``config``, ``errors``, ``events``, ``statefile`` and ``telemetry``; nothing above
them.
"""
