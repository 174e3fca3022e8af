"""Hardware backends. Nothing here knows about HTTP."""
