"""The same plan on other platforms: one module per platform, each a function
``export(cfg) -> {files, ...}`` that writes that platform's job definitions from the plan
(``paths.plan``, made by ``tuneops select``) and checks them with the platform's own schema.

- ``kaito``: a Kaito tuning ``Workspace`` (kaito.sh/v1beta1) and its ConfigMap, validated against
  the vendored CRD schema (``schemas/``) with ``jsonschema``.
- ``azureml``: an Azure ML CLI v2 ``command`` job (torchrun-style ``pytorch`` distribution) and,
  where the method allows, a managed ``finetuning`` job, validated with ``azure.ai.ml.load_job``.

This package holds what the platform modules share; ``tuneops export PLATFORM`` (tuneops/cli.py)
imports the platform's module (the platforms import this package, never the reverse).

Settings: ``params.yaml`` ``platforms:``. A plan a platform cannot express is refused
(``PlatformError``, exit 2) with what to change.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneops.errors import InvalidInput

PLATFORMS = ("kaito", "azureml")


class PlatformError(InvalidInput):
    """The plan cannot be expressed on the platform; the message says what to change."""


def load_plan(cfg: Any) -> dict[str, Any]:
    path = cfg.path("plan")
    if not path.is_file():
        raise PlatformError(f"{path}: no plan yet; run `tuneops select` (or `tuneops run`) first")
    return json.loads(path.read_text())


def out_dir(cfg: Any, platform: str) -> Path:
    d = (cfg.root / cfg.platforms.out_dir / platform).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d
