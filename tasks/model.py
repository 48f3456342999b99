"""Stage `model`: prepare the base model folder once (a DVC-cached output)."""
from __future__ import annotations

from typing import Any

from tuneops import env, log, models
from tuneops.config import Config


def run(cfg: Config) -> dict[str, Any]:
    out = cfg.path("base_model_dir")
    with log.step(f"model: preparing {cfg.model.source} base model"):
        models.prepare(cfg.model, out, env.state_paths(cfg.state_dir)["cache"])
    return {"base_model_dir": str(out), **models.provenance(out)}
