"""The OpenAI-compatible HTTP layer of the inference engine, shared by ``tuneops serve`` and the
jobs API (``tuneops api``, ``tuneops.service``):

- ``routes``: ``POST /v1/chat/completions`` and ``POST /v1/classify`` (request fields, statuses,
  streaming, cancellation: its docstring), ``EventStream``;
- ``schema``: the request body (size and depth caps) and ``ChatRequest``;
- ``errors``: OpenAI-shaped errors, ``CatchAll``;
- ``auth``: bearer tokens (the route dependency and the body-less 401 gate);
- ``server``: ``GET /health`` readiness and uvicorn with a graceful shutdown;
- ``app``: the ``tuneops serve`` app (one model); ``job_models``: the jobs API's model router.

This file imports nothing.
"""
