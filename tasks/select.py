"""Stage `select`: choose the fine-tuning method, ZeRO stage and batch layout from the
params' goals, the model's config (read without loading weights), the detected or
declared hardware and the validated data. Writes ``plan.json`` with its reasons."""
from __future__ import annotations

from typing import Any

from tuneops.config import Config
from tuneops.io import read_json, write_json
from tuneops.planner import Goals, Hardware, ModelSpec, make_plan


def run(cfg: Config) -> dict[str, Any]:
    select = cfg.section("select")
    report = read_json(cfg.path("validation_dir") / "report.json")
    plan = make_plan(
        ModelSpec.from_path(cfg.path("base_model_dir")),
        Hardware.from_params(select["hardware"]),
        seq_len=cfg.model.max_seq_len,
        goals=Goals.from_params(select),
        scenario="chat",
        tokens=report.get("train_tokens"),
    ).to_dict()
    write_json(cfg.path("plan"), plan)
    return {"plan": str(cfg.path("plan")), "method": plan["method"], "fits": plan["fits"]}
