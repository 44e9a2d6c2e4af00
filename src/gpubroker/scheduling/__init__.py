"""Who may hold the GPU, and when: the pure scheduler and the broker that carries out its effects.

``scheduler`` decides synchronously and does no I/O (it is replayed with a fake clock in the
tests), in three parts (``scheduler`` the state and events, ``planning`` the decisions,
``sizing`` the arithmetic) over ``slots`` (its records), ``waitqueue`` and ``unitindex`` (the
indexes that keep an event's cost flat as the queue grows); ``effects`` are the words it
answers in; ``victims`` is its eviction choice, a pure rule; ``domains`` groups backends by
the GPUs they share and builds the scheduler for a config (``build_scheduler``); ``broker``
runs each effect (drain, unload, load) in its own time-bounded task and feeds the outcome
back, with ``jobs`` (its ``JobFollower``) following the services' own queues, ``notes``
naming the scheduler's notes as events and ``swaplog`` logging each swap's phases with their
timings; ``preload`` makes the start-up ``preload:`` resident and ``memory`` is what a restart
keeps of the broker (the state file's ``broker`` section).

May import ``config``, ``errors``, ``events``, ``logs``, ``vram``, ``statefile``, ``telemetry``,
``plugins`` (the strategy base type) and ``workers`` (to start a managed worker); never
``proxy``, ``observe`` or ``cli``.
"""
