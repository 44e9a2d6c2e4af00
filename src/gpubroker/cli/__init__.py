"""gpubroker's command line: thin Typer commands over the library.

``main`` is the command tree; ``serve``, ``admin`` (``status``, ``swap``, ``unload``) and
``workers`` its groups; ``client`` talks to a running broker's status port; ``watch`` renders the
status JSON (``status --watch``); ``demo`` runs the no-GPU demo; ``initfile`` and ``detect`` write
and fill ``gpubroker init``'s template; ``doctor`` prints :mod:`gpubroker.doctor`'s findings. The
top of the house: nothing in the library imports it.
"""
