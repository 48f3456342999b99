"""The registry side: the MLflow model registry and everything a registered version carries.

Modules:

- ``versions``: versions, aliases ``champion`` / ``challenger``, the champion history,
  ``promote`` / ``rollback``, ``lineage`` read back from MLflow, the model card;
- ``promotion``: the promotion gate (``decide``) and the like-for-like re-scoring of the
  champion (``rescore`` for language models, ``rescore_head`` for task heads);
- ``provenance``: the lineage facts recorded on a version (git commit, ``dvc.lock`` md5s,
  the base model's identity);
- ``remote``: the train/eval files of every version on the DVC remote (``tuneops data checkout``);
- ``report``: the HTML run report;
- ``tracking``: MLflow wiring (tracking + registry store, experiment, run tags).

The names below are the public API that the stages, the CLI, the jobs API, serving and the
tests use: ``from tuneops.registry import alias_version, decide, tracking``. They load on first
use (PEP 562), so that importing one module (``tracking``, used by training and serving) does
not load the others: a stage's code deps (``tuneops/stages.py``) list only what it runs.
"""
from __future__ import annotations

import importlib
from typing import Any

_MODULES = ("versions", "promotion", "provenance", "remote", "report", "tracking")

# public name -> the module that defines it
_API = {
    **dict.fromkeys((
        "CHAMPION", "CHALLENGER", "HISTORY_TAG", "REGISTRATION_TAG", "RegistryError",
        "client", "model_name", "parse_ref", "get_version", "alias_version", "current_champion",
        "champion_stack", "record_champion", "move_alias", "set_alias", "find_registration",
        "summary", "list_versions", "show", "gate", "promote", "rollback", "lineage", "model_card"),
        "versions"),
    **dict.fromkeys(("SCORER", "HEAD_SCORER", "GRADER_SCORER", "decide", "rescore", "rescore_head", "registered_fp32",
                     "score_onnx", "score_graders", "eval_rows"), "promotion"),
    **dict.fromkeys(("git_commit", "dvc_lock_md5s", "base_model_identity"), "provenance"),
}

__all__ = sorted(_API) + list(_MODULES)


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    elif name in _MODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
