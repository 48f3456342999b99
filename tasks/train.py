"""Stage `train`: fine-tune the base model with the planned method (peft + Trainer).

Outputs in ``paths.train_dir``: ``adapter/`` (PEFT methods) or ``model/`` (full),
``metrics.json`` (incl. the MLflow run id) and ``history.json`` (the loss curve).
Step metrics (loss, lr, grad norm, tokens/s, peak RSS) go to MLflow; the Trainer's
progress bar shows the ETA.
"""
from __future__ import annotations

import resource
import time
from typing import Any

from tuneops import tracking
from tuneops.chat import Collator
from tuneops.config import Config
from tuneops.io import fresh_dir, md5_file, read_json, read_jsonl, write_json
from tuneops.lm import encode
from tuneops.models import load_causal_lm, load_tokenizer

SUPPORTED_METHODS = ("full", "lora", "dora")


def apply_method(model: Any, plan: dict[str, Any]) -> Any:
    """Wrap the base model for the planned method: a flag per variant, not a copy."""
    method = plan["method"]
    if method == "full":
        return model
    if method in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        p = plan["peft"]
        cfg = LoraConfig(r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"],
                         target_modules=list(p["target_modules"]), use_dora=method == "dora",
                         task_type="CAUSAL_LM")
        return get_peft_model(model, cfg)
    raise ValueError(f"train: method {method!r} is not supported by this train stage "
                     f"(supported: {', '.join(SUPPORTED_METHODS)})")


class _CountingCollator(Collator):
    """Pads batches and counts the real (non-pad) tokens seen, for tokens/s."""

    def __init__(self, pad_token_id: int):
        super().__init__(pad_token_id)
        self.tokens = 0

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        batch = super().__call__(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


def _callback(collator: _CountingCollator, history: list[dict[str, float]]) -> Any:
    import mlflow
    from transformers import TrainerCallback

    class MlflowSteps(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            metrics["tokens_per_s"] = collator.tokens / max(time.perf_counter() - self.t0, 1e-9)
            metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            mlflow.log_metrics(metrics, step=state.global_step)
            if "loss" in metrics:
                history.append({"step": state.global_step, **metrics})

    return MlflowSteps()


def run(cfg: Config) -> dict[str, Any]:
    import mlflow
    import torch
    from transformers import Trainer, TrainingArguments

    t = cfg.train
    plan = read_json(cfg.path("plan"))
    if plan["method"] not in SUPPORTED_METHODS:
        apply_method(None, plan)  # raises the clear error before any loading
    out = fresh_dir(cfg.path("train_dir"))
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)

    base_dir = cfg.path("base_model_dir")
    tokenizer = load_tokenizer(base_dir)
    features = encode(read_jsonl(cfg.path("clean_train_data")), tokenizer, cfg.model.max_seq_len)
    model = apply_method(load_causal_lm(base_dir), plan)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), max_steps=t.max_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, seed=t.seed, data_seed=t.seed,
        per_device_train_batch_size=plan["micro_batch_size"], gradient_accumulation_steps=plan["grad_accum"],
        activation_checkpointing=bool(plan.get("gradient_checkpointing")), save_strategy="no", report_to="none",
        use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False, remove_unused_columns=False,
        disable_tqdm=False,
    )
    collator = _CountingCollator(tokenizer.pad_token_id)
    history: list[dict[str, float]] = []
    tracking.setup(cfg)
    with mlflow.start_run(run_name=f"{plan['method']}-{cfg.register.model_name}", tags=tracking.run_tags()) as run:
        mlflow.log_params({"method": plan["method"], "micro_batch_size": plan["micro_batch_size"],
                           "grad_accum": plan["grad_accum"], "max_seq_len": cfg.model.max_seq_len,
                           "trainable_params": trainable, "total_params": total,
                           "data.train.md5": md5_file(cfg.path("clean_train_data")),
                           "params_hash": cfg.sections_hash(),
                           **{f"train.{k}": v for k, v in t.model_dump().items()},
                           **{f"peft.{k}": v for k, v in (plan.get("peft") or {}).items()}})
        trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator,
                          callbacks=[_callback(collator, history)])
        t0 = time.perf_counter()
        result = trainer.train()
        runtime = time.perf_counter() - t0
        artifact = out / ("model" if plan["method"] == "full" else "adapter")
        model.save_pretrained(artifact)
        tokenizer.save_pretrained(artifact)
        metrics = {
            "mlflow_run_id": run.info.run_id, "method": plan["method"], "artifact": artifact.name,
            "steps": result.global_step, "train_loss": result.training_loss,
            "first_loss": history[0]["loss"] if history else None,
            "final_loss": history[-1]["loss"] if history else None,
            "tokens": collator.tokens, "tokens_per_s": collator.tokens / runtime, "runtime_s": runtime,
            "trainable_params": trainable, "total_params": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        mlflow.log_metrics({"runtime_s": runtime, "final_train_loss": result.training_loss})
    write_json(out / "history.json", history)
    write_json(out / "metrics.json", metrics)
    return {"train_dir": str(out), **metrics}
