"""What the broker sees and shows: telemetry, attribution, alerts, metrics and the status app.

``telemetry/`` reads the GPUs (NVML, the simulator, or nothing), ``attribution`` names the
backend behind each GPU process, ``alerts`` turns what is seen into warnings, ``monitor`` runs
that loop, ``health`` probes the upstreams, ``metrics`` is ``/metrics``, ``sse`` the ``/events``
stream, ``status`` the status and admin app that mounts them, and ``guard`` keeps web pages away
from that port. The sensing half (telemetry, attribution,
alerts) imports only ``config`` and ``events``; the showing half reads ``scheduling`` and
``workers`` and is imported by nothing but ``runtime``.
"""
