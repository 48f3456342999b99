"""Stage `train`: fine-tune the base model with the planned method.

Every method (full, LoRA, DoRA, QLoRA, IA3, prompt tuning; ``tuneops/training/methods.py``) runs
through one loop (``tuneops/training/loop.py``: Hugging Face Trainer, plus DeepSpeed ZeRO 1-3 /
offload when the plan says so). One process trains here; a plan with several processes or a
ZeRO stage is launched with torchrun (``tuneops/training/launch.py``), gloo on CPU.

Outputs in ``paths.train_dir``: ``adapter/`` (PEFT methods) or ``model/`` (full),
``metrics.json`` (incl. the MLflow run id) and ``history.json`` (the loss curve). Checkpoints
every ``train.save_steps`` steps in ``paths.checkpoint_dir``; a rerun after a crash resumes
from the last complete one. Step metrics (loss, lr, grad norm, tokens/s, peak memory) go to
MLflow; the Trainer's progress bar shows the ETA.
"""
from __future__ import annotations

from typing import Any

from tuneops.config import Config
from tuneops.io import fresh_dir, read_json
from tuneops.training.methods import method_for


def check_resume(cfg: Config, plan: dict[str, Any]) -> None:
    if not cfg.train.resume:
        return
    from tuneops.io import md5_file
    from tuneops.training import checkpoints

    key = checkpoints.run_key(cfg, plan, md5_file(cfg.path("clean_train_data")))
    last, _ = checkpoints.latest_complete(cfg.path("checkpoint_dir") / key)
    if last is not None:
        checkpoints.resume_mode(last, plan)


def run(cfg: Config) -> dict[str, Any]:
    from tuneops.training.loop import train, uses_deepspeed

    plan = read_json(cfg.path("plan"))
    method_for(plan)  # an unknown method fails here, before anything is loaded
    check_resume(cfg, plan)     # a checkpoint this plan cannot load fails here, before any process starts
    out = fresh_dir(cfg.path("train_dir"))
    if plan["world_size"] > 1 or uses_deepspeed(plan):
        from tuneops.training.launch import launch

        metrics = launch(cfg, plan, out)
    else:
        metrics = train(cfg, plan, out)
    return {"train_dir": str(out), **metrics}
