"""Data: the record formats, the bundled scenario datasets, record parsing and the
validation gate (record checks, then a Great Expectations suite per format).

This package's ``__init__`` stays import-light: ``tuneops.config`` validates names against the registries.
"""
from __future__ import annotations

# The record formats (``FORMATS``: formats.FORMAT_SPECS) and the scenarios (``SCENARIOS``: name ->
# the format of its dataset, from scenarios.REGISTRY; ``user`` is a dataset added with ``tuneops
# data add``, in ``data.format``) are read from their registries when first asked for.


def __getattr__(name: str):
    if name == "FORMATS":
        from .formats import FORMAT_SPECS

        return tuple(FORMAT_SPECS)
    if name == "SCENARIOS":
        from .scenarios import REGISTRY

        return {n: s.format for n, s in REGISTRY.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
