"""What the broker sees and shows, and the status port that shows it.

Sensing: ``attribution`` names the backend behind each GPU process, ``alerts`` turns what is
seen into warnings, ``monitor`` runs that loop over the telemetry samples and confirms unloads
for the broker, ``health`` probes the upstreams. Showing: ``readmodel`` is the one view of
everything shown (made of ``views``, with each unit's residency and each GPU's plan from
``residency``; ``schema`` declares its JSON), ``metrics`` is ``/metrics``, ``sse`` the
``/events`` stream, ``status`` the status app that mounts them with the admin verbs,
``worker_routes`` the ``/api/workers`` verbs, ``admin`` the gate every verb passes, ``guard``
the Host/Origin/CORS checks in front of the whole port.

May import every room below it (``config``, ``telemetry``, ``workers``, ``plugins``,
``scheduling``, ``events``, ``errors``, ``responses``, ``vram``); only ``runtime`` and ``cli``
import it.
"""
