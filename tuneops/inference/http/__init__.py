"""The inference HTTP layer (OpenAI-compatible): the routes, the request schema, errors and the
``tuneops serve`` app; the jobs API (``tuneops.service``) mounts the same routes for its models.

This file imports nothing."""
