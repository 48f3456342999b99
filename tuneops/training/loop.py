"""The training loop every method and process count shares: Hugging Face Trainer (+ DeepSpeed
when the plan has a ZeRO stage or offload), run in this process or in each rank that
``torchrun`` started (``tuneops.training.launch``).

Writes, on rank 0, ``<train_dir>/{adapter|model}/``, ``metrics.json`` and ``history.json`` (the
loss curve, continued across resumes). Checkpoints go to ``paths.checkpoint_dir/<run key>``.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from tuneops.registry import tracking
from tuneops.inference.chat import Collator
from tuneops.config import Config
from tuneops.io import md5_file, read_jsonl, write_json

from . import checkpoints, heads, methods, objectives
from .packing import PackedCollator, pack


def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from the launcher's environment (1 process: 0, 0, 1)."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def uses_deepspeed(plan: dict[str, Any]) -> bool:
    return plan["zero_stage"] > 0 or plan["offload"]["optimizer"] or plan["offload"]["params"]


def ds_config(plan: dict[str, Any], max_grad_norm: float) -> dict[str, Any]:
    """DeepSpeed config generated from the plan (never a hand-kept JSON): batch layout
    (train_batch = micro x accum x world), ZeRO stage and offload, precision, clipping."""
    import torch

    gpu = torch.cuda.is_available()
    zero: dict[str, Any] = {"stage": plan["zero_stage"], "overlap_comm": False, "contiguous_gradients": True}
    if plan["zero_stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True   # else adapters/models save empty
    if plan["offload"]["optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if plan["offload"]["params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    precision = methods.compute_precision(plan)
    return {
        "train_micro_batch_size_per_gpu": plan["micro_batch_size"],
        "gradient_accumulation_steps": plan["grad_accum"],
        "train_batch_size": plan["micro_batch_size"] * plan["grad_accum"] * plan["world_size"],
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # the Trainer's own AdamW (fused torch) is used at every stage, also with optimizer offload:
        # DeepSpeedCPUAdam would JIT-compile for ~80 s on first use
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _init_distributed(plan: dict[str, Any], world_size: int) -> None:
    """Accelerate's state for this rank: gloo on CPU, nccl on CUDA; with DeepSpeed, the recipe
    that makes the Trainer see the launcher's world: ``ACCELERATE_USE_DEEPSPEED`` set while the
    state is created, DeepSpeed's shared-memory comm op off on CPU (its JIT build takes 87 s)."""
    if world_size == 1 and not uses_deepspeed(plan):
        return
    import torch
    from accelerate import PartialState

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if uses_deepspeed(plan):
        import deepspeed

        if not torch.cuda.is_available():
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # avoid an 87 s JIT build
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend=backend)
        finally:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    else:
        PartialState(backend=backend)


def _features(cfg: Config, tokenizer: Any, packing: bool, plan: dict[str, Any]) -> list[dict[str, Any]]:
    from tuneops.inference.scoring import encode

    rows = read_jsonl(cfg.path("clean_train_data"))
    if heads.is_head(plan):      # classification / NER heads: the native records, never packed
        return heads.encode(rows, tokenizer, cfg.model.max_seq_len, plan)
    feats = encode(rows, tokenizer, cfg.model.max_seq_len)
    return pack(feats, cfg.model.max_seq_len) if packing else feats


class _TrlTokens:
    """``tokens`` as the step callback reads it: the real tokens TRL's DPOTrainer has counted."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    @property
    def tokens(self) -> int:
        return int(getattr(self.trainer, "_total_train_tokens", 0))


class _CountingCollator(Collator):
    """Pads batches and counts the real (non-pad) tokens seen, for tokens/s."""

    def __init__(self, pad_token_id: int):
        super().__init__(pad_token_id)
        self.tokens = 0

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        batch = super().__call__(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


class LengthBatches:
    """Batches of similar length in random order: a sampler over ``lengths`` that shuffles the
    examples, sorts each window of ``window`` batches by length, cuts it into batches of
    ``batch`` and shuffles the batches (Trainer's ``group_by_length`` sampler keeps them longest
    first, which sorts the loss curve by length). Same examples per step as random batches, far
    less padding (chat rows: 55% real tokens in random batches of 8, 96% grouped). Its seed is
    drawn from torch's global generator per pass, as ``RandomSampler``'s is, so a resumed run
    (Trainer restores that generator) replays the same order."""

    def __init__(self, lengths: list[int], batch: int, window: int = 50):
        self.lengths, self.batch, self.window = lengths, batch, window

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        import torch

        g = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        span = self.batch * self.window
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch] for i in range(0, len(chunk), self.batch)]
        for k in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[k]


def _loss_ends(history: list[dict[str, Any]]) -> dict[str, Any]:
    losses = [h["loss"] for h in history]
    if not losses:
        return {}
    k = max(1, min(5, len(losses) // 4))
    return {"loss_start": sum(losses[:k]) / k, "loss_end": sum(losses[-k:]) / k, "loss_mean_of_steps": k}


def _trainer(group_by_length: bool) -> Any:
    """``Trainer``, or one whose training sampler is ``LengthBatches`` over micro batches: each
    micro batch is of similar length (the padding saved), the micro batches an optimizer step
    accumulates come from different length groups (its loss stays a mix of lengths)."""
    from transformers import Trainer

    if not group_by_length:
        return Trainer

    class LengthGroupedTrainer(Trainer):
        def _get_train_sampler(self, train_dataset: Any = None) -> Any:
            data = train_dataset if train_dataset is not None else self.train_dataset
            return LengthBatches([len(f["input_ids"]) for f in data],
                                 self.args.per_device_train_batch_size)
    return LengthGroupedTrainer


def cap_heap_retention(threshold: int) -> bool:
    """CPU training: glibc malloc serves every allocation of at least ``threshold`` bytes with its own
    mmap, so a freed activation goes back to the OS at once (``mallopt(M_MMAP_THRESHOLD)``; setting it
    also stops glibc's dynamic threshold, which otherwise rises to the size of the largest freed block
    and moves activations of up to 32 MiB onto the heap, where fragmentation keeps them resident).
    Measured (bench/calibrate_memory.py, SmolLM2-135M LoRA, 4 x 512 tokens, 2-core CPU): peak RSS
    7.67 GiB with glibc's default, 4.92 GiB with 64 KiB, s/step unchanged. ``threshold`` 0 keeps
    glibc's default. Returns whether it was applied (not glibc: nothing happens)."""
    if threshold <= 0:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))     # M_MMAP_THRESHOLD = -3 (malloc.h)
    except (OSError, AttributeError):
        return False


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mlflow_callback(collator: Any, world_size: int) -> Any:
    import mlflow
    from transformers import TrainerCallback

    class MlflowSteps(TrainerCallback):
        """loss, learning rate, grad norm (from the Trainer's logs), tokens/s (all ranks), peak memory."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.t0, self.tokens0 = time.perf_counter(), collator.tokens

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
            metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            metrics["tokens_per_s"] = (collator.tokens - self.tokens0) * world_size / elapsed
            metrics["peak_memory_mb"] = peak_memory_mb()
            mlflow.log_metrics(metrics, step=state.global_step, synchronous=False)   # off the step path

    return MlflowSteps()


def _pair_args(cfg: Config, obj: Any) -> tuple[Any, dict[str, Any]]:
    """DPOConfig and its objective arguments: beta, the TRL loss type, precomputed reference
    log-probs; rows are already tokenized and checked against model.max_seq_len by validate."""
    from trl import DPOConfig

    t = cfg.train
    return DPOConfig, {"beta": float(t.beta), "loss_type": objectives.loss_type(obj, t.loss_type),
                       "precompute_ref_log_probs": t.reference == "precomputed",
                       "max_length": None, "disable_dropout": True}


def _load_base(cfg: Config, plan: dict[str, Any]) -> Any:
    model = methods.method_for(plan).load(cfg.path("base_model_dir"), plan)
    model.config.use_cache = False
    return model


def start_adapter(cfg: Config) -> Path:
    """``train.start_from`` (a registered model, ``models:/NAME@ALIAS`` or ``/VERSION``) as a local
    adapter folder: the version's logged adapter, downloaded from the MLflow store once per version."""
    import mlflow

    from tuneops.errors import TuneopsError

    uri = cfg.train.start_from
    tracking.setup(cfg)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri.rstrip("/") + "/artifacts/adapter"))
    except Exception as exc:      # noqa: BLE001 - MLflow raises several types for a missing model or alias
        raise TuneopsError(f"train.start_from: {uri}: no registered model version with a LoRA adapter "
                           f"({str(exc).splitlines()[0][:200]})") from None
    if not (local / "adapter_config.json").is_file():
        raise TuneopsError(f"train.start_from: {uri}: the version has no adapter (adapter_config.json) to start from")
    return local


def _continue(cfg: Config, plan: dict[str, Any], start: Path) -> Any:
    """SFT from a registered adapter: the same adapter trained further (PEFT methods), or merged
    into the weights first (full fine-tuning)."""
    from peft import PeftModel

    m = methods.method_for(plan)
    base = _load_base(cfg, plan)
    if m.wrap is None:
        return PeftModel.from_pretrained(base, str(start)).merge_and_unload()
    if m.prepare is not None:
        base = m.prepare(base, plan)
    model = PeftModel.from_pretrained(base, str(start), is_trainable=True)
    methods.disable_cpu_bf16_repack(model)
    return model


def train(cfg: Config, plan: dict[str, Any], train_dir: Path) -> dict[str, Any]:
    """Train on this rank; rank 0 writes the outputs and returns the metrics."""
    import torch
    from transformers import TrainingArguments

    t = cfg.train
    rank, local_rank, world_size = world()
    if world_size != plan["world_size"]:
        raise RuntimeError(f"train: the plan is for {plan['world_size']} process(es), launched with {world_size}")
    if t.packing and methods.spec(plan["method"]).virtual_tokens:
        raise ValueError("train.packing: not supported with prompt_tuning (virtual tokens are prepended to "
                         "every row, across packed examples); set train.packing=false")
    if t.packing and heads.is_head(plan):
        raise ValueError(f"train.packing: not supported with the {plan['task_head']} head (one label per "
                         "example or per word, not next-token labels); set train.packing=false")
    if t.packing and objectives.of(plan).pairs:
        raise ValueError(f"train.packing: not supported with the {plan['objective']} objective (chosen and rejected "
                         "are scored per sequence); set train.packing=false")
    if t.threads and world_size == 1:
        torch.set_num_threads(t.threads)
    if not torch.cuda.is_available():
        cap_heap_retention(t.cpu_mmap_threshold)
    torch.manual_seed(t.seed)
    _init_distributed(plan, world_size)

    data_md5 = md5_file(cfg.path("clean_train_data"))
    key = checkpoints.run_key(cfg, plan, data_md5)
    ckpt_root = cfg.path("checkpoint_dir") / key
    resume, skipped = checkpoints.latest_complete(ckpt_root) if t.resume else (None, [])
    # another process layout resumes too: as it is, or through a DeepSpeed universal checkpoint
    mode = checkpoints.resume_mode(resume, plan) if resume else "fresh"
    if rank == 0:
        if not t.resume:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        for bad in skipped:      # a checkpoint being written when the process died: never used
            shutil.rmtree(bad, ignore_errors=True)
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if mode == "universal":
            checkpoints.to_universal(resume)
    if mode == "universal":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()      # the other ranks wait for rank 0's conversion

    gpu = torch.cuda.is_available()
    precision = methods.compute_precision(plan)
    ds = ds_config(plan, t.max_grad_norm) if uses_deepspeed(plan) else None
    if ds is not None and mode == "universal":
        ds["checkpoint"] = {"load_universal": True}
    obj = objectives.of(plan)
    # a pair objective (dpo, ...): TRL's DPOConfig (a TrainingArguments) with the objective's loss
    args_cls, pair_args = (TrainingArguments, {}) if not obj.pairs else _pair_args(cfg, obj)
    # TrainingArguments before the model: with ZeRO-3 it makes from_pretrained partition while loading.
    args = args_cls(
        output_dir=str(ckpt_root), max_steps=t.max_steps, learning_rate=t.learning_rate,
        weight_decay=t.weight_decay, warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, seed=t.seed, data_seed=t.seed,
        per_device_train_batch_size=plan["micro_batch_size"], gradient_accumulation_steps=plan["grad_accum"],
        activation_checkpointing=bool(plan.get("gradient_checkpointing")) and methods.spec(plan["method"]).trainer_checkpointing,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit, save_only_model=False, report_to="none",
        use_cpu=not gpu, dataloader_pin_memory=False, remove_unused_columns=False, disable_tqdm=rank != 0,
        bf16=gpu and precision == "bf16", fp16=gpu and precision == "fp16",
        ddp_backend="gloo" if (world_size > 1 and not gpu) else None, deepspeed=ds,
        accelerator_config={"use_configured_state": True} if (ds or world_size > 1) else None, **pair_args,
    )
    from tuneops.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.path("base_model_dir"))
    start = start_adapter(cfg) if t.start_from else None
    if obj.pairs:
        from . import preference

        features = preference.pair_features(cfg.path("clean_train_data"), tokenizer, cfg.model.max_seq_len)
        m = methods.method_for(plan)
        pm = preference.build_models(
            lambda: _load_base(cfg, plan), peft_config=(lambda mdl: m.config(mdl, plan)) if m.config else None,
            start_adapter=start, reference=t.reference, adapter="continue",   # (the SFT adapter trained on: serveable)
            prepare=(lambda mdl: m.prepare(mdl, plan)) if m.prepare else None)
        callbacks = [checkpoints.callback(rank, plan)]
        # TRL adds the adapter and the reference itself; the real tokens it counts feed tokens/s
        trainer = preference.trainer(pm, features, tokenizer, args, callbacks=callbacks)
        model, collator = trainer.model, _TrlTokens(trainer)
    else:
        features = _features(cfg, tokenizer, t.packing, plan)
        model = methods.build(cfg.path("base_model_dir"), plan) if start is None else _continue(cfg, plan, start)
        collator = (heads.HeadCollator(tokenizer.pad_token_id, methods.label_prefix(plan)) if heads.is_head(plan)
                    else PackedCollator(tokenizer.pad_token_id) if t.packing else _CountingCollator(tokenizer.pad_token_id))
        callbacks = [checkpoints.callback(rank, plan)]
        trainer = None
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())

    run_file = ckpt_root / "mlflow_run.json"
    run_ctx = None
    if rank == 0:
        import mlflow

        tracking.setup(cfg)
        previous = json.loads(run_file.read_text())["run_id"] if resume and run_file.is_file() else None
        run_ctx = mlflow.start_run(run_id=previous) if previous else mlflow.start_run(
            run_name=f"{plan['method']}-{cfg.register.model_name}", tags=tracking.run_tags())
        run = run_ctx.__enter__()
        run_file.write_text(json.dumps({"run_id": run.info.run_id}))
        if not previous:
            mlflow.log_params({
                "method": plan["method"], "micro_batch_size": plan["micro_batch_size"],
                "grad_accum": plan["grad_accum"], "world_size": world_size, "zero_stage": plan["zero_stage"],
                "offload_optimizer": plan["offload"]["optimizer"], "offload_params": plan["offload"]["params"],
                "max_seq_len": cfg.model.max_seq_len, "trainable_params": trainable, "total_params": total,
                "data.train.md5": data_md5, "params_hash": cfg.sections_hash(), "checkpoint_key": key,
                **{f"train.{k}": v for k, v in t.model_dump().items()},
                **{f"peft.{k}": v for k, v in (plan.get("peft") or {}).items()},
                **({"objective": obj.name, "beta": float(t.beta), "loss_type": ",".join(args.loss_type)
                    if isinstance(args.loss_type, list) else args.loss_type,
                    **{f"reference.{k}": v for k, v in pm.record.items()}} if obj.pairs
                   else {"objective": obj.name})})
        if trainer is None:
            callbacks.append(_mlflow_callback(collator, world_size))
        else:
            trainer.add_callback(_mlflow_callback(collator, world_size))
    try:
        if trainer is None:
            # similar lengths per batch: less padding, same examples per step (packing has none to save)
            trainer = _trainer(t.group_by_length and not t.packing)(
                model=model, args=args, train_dataset=features, data_collator=collator, callbacks=callbacks)
        if methods.spec(plan["method"]).nf4_base:
            methods.disable_cpu_bf16_repack(trainer.model)
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        runtime = time.perf_counter() - t0
        start_step = checkpoints.step_of(resume) if resume else 0
        tokens = torch.tensor([collator.tokens], dtype=torch.long)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tokens)
        artifact = train_dir / methods.method_for(plan).artifact
        trainer.save_model(str(artifact))        # gathers ZeRO-3 shards; adapters save as peft folders
        metrics: dict[str, Any] = {}
        if rank == 0:
            import mlflow

            tokenizer.save_pretrained(artifact)
            gen_cfg = cfg.path("base_model_dir") / "generation_config.json"
            if gen_cfg.is_file() and not (artifact / gen_cfg.name).is_file():
                shutil.copyfile(gen_cfg, artifact / gen_cfg.name)    # stop ids for serving (tuneops.inference.chat.stop_ids)
            history = [{"step": h["step"], **{k: v for k, v in h.items() if k != "step"}}
                       for h in trainer.state.log_history if "loss" in h]
            peak = peak_memory_mb()
            metrics = {
                "mlflow_run_id": run.info.run_id, "method": plan["method"], "artifact": artifact.name,
                "steps": result.global_step, "resumed_from_step": start_step, "resume_mode": mode,
                "skipped_checkpoints": [p.name for p in skipped],
                "train_loss": result.training_loss,
                "first_loss": history[0]["loss"] if history else None,
                "final_loss": history[-1]["loss"] if history else None,
                # the mean of the first / last k steps' losses (k = 5, fewer on short runs): one
                # batch's loss moves with its examples (more so in length-grouped batches)
                **_loss_ends(history),
                "tokens": int(tokens.item()), "tokens_per_s": int(tokens.item()) / runtime, "runtime_s": runtime,
                "trainable_params": trainable, "total_params": total, "world_size": world_size,
                "zero_stage": plan["zero_stage"], "packing": t.packing,
                **({"task_head": plan["task_head"], "labels": plan["labels"]} if heads.is_head(plan) else {}),
                "peak_memory_mb": peak, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "objective": obj.name, **({"start_from": t.start_from} if t.start_from else {}),
            }
            if obj.pairs:       # the reference choice and the last logged preference metrics
                from .preference import PREFERENCE_METRICS

                last = next((h for h in reversed(history) if "rewards/margins" in h), {})
                metrics.update(beta=float(t.beta), loss_type=",".join(args.loss_type) if isinstance(args.loss_type, list)
                               else args.loss_type, reference=pm.record,
                               **{f"final_{k.replace('/', '_')}": last[k] for k in PREFERENCE_METRICS if k in last})
            mlflow.log_metrics({"runtime_s": runtime, "final_train_loss": result.training_loss,
                                "tokens_per_s_total": metrics["tokens_per_s"]})
            write_json(train_dir / "history.json", history)
            write_json(train_dir / "metrics.json", metrics)
            if not t.keep_checkpoints:
                shutil.rmtree(ckpt_root, ignore_errors=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return metrics
    finally:
        if run_ctx is not None:
            import sys

            run_ctx.__exit__(*sys.exc_info())
