"""Stage 6: the Ray Serve HTTP API (``app.py``) and its subject store (``store.py``)."""
