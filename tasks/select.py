"""Stage `select`: choose the fine-tuning method, ZeRO stage and batch layout from the
params' goals, the model's config (read without loading weights), the detected or
declared hardware and the validated data. Writes ``plan.json`` with its reasons.

The data's format (from the validate report) is the planner's scenario; its task head comes
from the head specs (``tuneops/training/heads.py``: classification -> sequence classification,
ner -> token classification, the rest causal LM) unless ``select.task_head`` names one:
``causal_lm`` trains every format as chat prompts; a label head must be the data format's. A
head the model family lacks in transformers (Gemma 3 has no token classification) falls back to the causal LM, with the reason in the plan; an encoder has no
causal LM (``PlanError``). A head plan carries the label names (``labels``) from the report.
"""
from __future__ import annotations

from typing import Any

from tuneops.config import Config
from tuneops.io import read_json, write_json
from tuneops.planner import Goals, Hardware, ModelSpec, PlanError, make_plan
from tuneops.training import heads


def choose_head(choice: str, fmt: str, model: ModelSpec) -> tuple[str, str]:
    """(task head, why) for ``select.task_head`` and the data format."""
    if choice != "auto":
        head = heads.get(choice)
        if head.generative:
            return head.name, f"select.task_head {head.name}: the {fmt} data trains as chat prompts"
        if head.data_format != fmt:
            raise PlanError(f"select.task_head {head.name}: the head trains on {head.data_format} data "
                            f"(the data is {fmt}); use auto or {heads.CAUSAL_LM}")
        if not head.supports(model.model_type):
            raise PlanError(f"select.task_head {head.name}: {model.name} ({model.model_type}) has no "
                            f"{head.name} head in transformers")
        return head.name, f"{fmt} data trains a {head.name} head (select.task_head {head.name})"
    head = heads.for_format(fmt)
    if head.generative:
        return head.name, f"{fmt} data trains the causal LM"
    if head.supports(model.model_type):
        return head.name, f"{fmt} data trains a {head.name} head (select.task_head auto)"
    if model.is_encoder:
        raise PlanError(f"{model.name} ({model.model_type}) has no {head.name} head in transformers")
    return heads.CAUSAL_LM, (f"{model.model_type} has no {head.name} head in transformers: the {fmt} data trains as "
                             "chat prompts (causal LM)")


def run(cfg: Config) -> dict[str, Any]:
    select = cfg.section("select")
    choice = select.pop("task_head", "auto")
    report = read_json(cfg.path("validation_dir") / "report.json")
    fmt = report.get("format") or "chat"
    model = ModelSpec.from_path(cfg.path("base_model_dir"))
    head, why = choose_head(choice, fmt, model)
    plan = make_plan(
        model,
        Hardware.from_params(select["hardware"]),
        seq_len=cfg.model.max_seq_len,
        goals=Goals.from_params(select),
        scenario=fmt,
        tokens=report.get("train_tokens"),
        task_head=head,
        objective=cfg.train.objective,
        reference=cfg.train.reference,
    ).to_dict()
    if not heads.get(head).generative:
        labels = report.get("labels")
        if not labels or len(labels) < 2:
            raise PlanError(f"{cfg.path('validation_dir') / 'report.json'}: labels: the {head} head needs at least "
                            f"2 labels (got {labels!r}); rerun validate")
        plan["labels"] = labels
        why += f" with {len(labels)} labels"
    if fmt != "chat" or choice != "auto":
        plan["reasons"].insert(0, {"rule": "R0-task-head", "text": why})
    write_json(cfg.path("plan"), plan)
    return {"plan": str(cfg.path("plan")), "method": plan["method"], "fits": plan["fits"]}
