"""The one endpoint for every model (issue 12): the ``apiPort`` app, its catalogue and its keys."""
