"""Serve a model over HTTP with the OpenAI API (``python -m bminf serve``; needs ``pip install bminf[server]``).

``engine``: the batching engine (no HTTP); ``tasks``: OpenAI requests to engine jobs; ``protocol``:
request schemas and error bodies; ``app``: the FastAPI routes and ``serve``. Import the submodules you
need: this package imports nothing at import time, so the engine runs without FastAPI installed.

>>> from bminf.serving.app import serve                              # doctest: +SKIP
>>> serve(bminf.models.CPM2(version="cpm2-demo"), port=8000)          # doctest: +SKIP
"""
