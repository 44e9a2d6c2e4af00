"""The data path: one transparent reverse proxy per backend port.

Holds the ASGI proxy app (``app``), the upstream connection pool and HTTP/1.1 client
(``upstream``, over ``http1``: one socket's buffer and the request/response heads), WebSocket
passthrough (``websocket``), the header rules shared by both (``forwarding``), request-target
checks (``target``), the name a request's caller is shown by (``caller``), the SSE comments a
waiting stream gets (``progress``), the hardened listeners every port is served by
(``listener``: Hypercorn, or uvicorn with ``server: uvicorn``, ``uvicorn_server``) and the
serving process's memory (``memory``: the start-up heap frozen, the collector's thresholds,
the free heap given back after a burst). It asks the broker for a lease
through the one ``LeaseBroker`` interface (``lease``) and knows nothing else of it.

May import ``config``, ``errors``, ``responses`` and the classifier base type
(``plugins.classifiers.base``); never ``scheduling``, ``observe``, ``workers`` or ``cli``.
"""
