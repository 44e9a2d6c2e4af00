"""The one endpoint: the ``apiPort`` app that serves every model of every backend.

Holds the ASGI app that routes OpenAI (``/v1/…``) and Ollama (``/api/…``) requests by their
``model`` and ``/proxy/{backend}/…`` by name (``app``), the model catalogue it routes by
(``catalogue``: static ``models:`` or discovery, and which backend to prefer), reading a body
just far enough to find its model (``body``), errors in each protocol's own shape (``errors``),
who is asking (``keys``) and each model's residency as ``/v1/models`` shows it (``occupancy``).

A request is handed to the chosen backend's :class:`~gpubroker.proxy.app.ProxyApp`, so the
classifier, queue, swaps, headers, events and metrics are the proxy port's own.

Sits above ``proxy`` and ``scheduling`` (it reads residency through the narrow
``catalogue.Residency`` protocol) and below ``runtime``: may import ``config``, ``errors``,
``responses``, ``plugins`` (Ollama's model names), ``proxy`` and ``scheduling``; never
``observe``, ``workers`` or ``cli``.
"""
