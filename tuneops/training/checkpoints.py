"""Crash-safe checkpoints: written by the Trainer every ``train.save_steps`` steps, marked
complete only after every file is on disk, resumed automatically.

A checkpoint counts only when its ``tuneops_complete.json`` marker exists and every file it
lists still has the recorded size: a checkpoint that was being written when the process was
killed (no marker) or was truncated afterwards (size mismatch) is skipped, and the next older
complete one is used. Checkpoints live under ``paths.checkpoint_dir/<run key>``, outside the
stage's output folder (DVC deletes outputs before it re-runs a stage), where the run key hashes
everything that makes two runs the same run: train/select params, the plan, the training data
and the base model. Another key never resumes from them.

The process layout (world size, nodes, micro-batch x accumulation, ZeRO stage, offload) is not
part of the key: it changes how a step is computed, not what is learned (the global batch is in
the key). Each marker records the layout it was written with (``layout``); ``resume_plan`` says
how a run with another layout continues from it (a DeepSpeed universal checkpoint when the world
size changed) or refuses with the way out.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

MARKER = "tuneops_complete.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


# plan fields that say how the steps are laid out over processes, not what a step learns
LAYOUT_FIELDS = ("zero_stage", "offload", "micro_batch_size", "grad_accum", "gradient_checkpointing", "launcher",
                 "nproc_per_node", "nodes", "world_size")
# select params that only steer that layout (the planner's inputs for it)
_LAYOUT_SELECT = ("hardware", "zero_stage", "offload", "max_micro_batch_size", "memory_headroom")
# plan fields that define the training itself
_LEARNING_FIELDS = ("method", "peft", "precision", "global_batch_size", "seq_len", "scenario", "task_head", "labels")


def layout(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: plan.get(k) for k in LAYOUT_FIELDS}


def run_key(cfg: Any, plan: dict[str, Any], data_md5: str) -> str:
    from tuneops.models import provenance

    base = cfg.path("base_model_dir")
    files = {p.name: p.stat().st_size for p in sorted(base.glob("*")) if p.is_file()} if base.is_dir() else {}
    select = {k: v for k, v in cfg.section("select").items() if k not in _LAYOUT_SELECT}
    learning = {k: plan.get(k) for k in _LEARNING_FIELDS}
    blob = json.dumps({"train": cfg.section("train"), "select": select, "plan": learning,
                       "model": cfg.section("model"), "data": data_md5,
                       "base": {"provenance": provenance(base), "files": files}},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def mark_complete(checkpoint: Path, extra: dict[str, Any] | None = None) -> None:
    """Record every file's size, then atomically publish the marker (write + rename)."""
    files = {str(p.relative_to(checkpoint)): p.stat().st_size
             for p in sorted(checkpoint.rglob("*")) if p.is_file() and p.name != MARKER}
    tmp = checkpoint / (MARKER + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"files": files, **(extra or {})}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, checkpoint / MARKER)


def is_complete(checkpoint: Path) -> bool:
    marker = checkpoint / MARKER
    if not marker.is_file():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    for rel, size in files.items():
        p = checkpoint / rel
        if not p.is_file() or p.stat().st_size != size:
            return False
    return bool(files)


def step_of(checkpoint: Path) -> int:
    m = _STEP.match(checkpoint.name)
    return int(m.group(1)) if m else -1


def latest_complete(folder: Path) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint or None, the incomplete/truncated ones that were skipped)."""
    if not folder.is_dir():
        return None, []
    skipped = []
    for ck in sorted((p for p in folder.iterdir() if p.is_dir() and _STEP.match(p.name)), key=step_of, reverse=True):
        if is_complete(ck):
            return ck, skipped
        skipped.append(ck)
    return None, skipped


def callback(world_rank: int, plan: dict[str, Any] | None = None) -> Any:
    """Trainer callback: after the Trainer has saved ``checkpoint-N`` (on every rank, DeepSpeed
    shards included), wait for all ranks, then rank 0 writes the marker."""
    from transformers import TrainerCallback

    class MarkComplete(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            if world_rank == 0:
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                              {"step": state.global_step, **({"layout": layout(plan)} if plan else {})})

    return MarkComplete()


def _uses_deepspeed(lay: dict[str, Any]) -> bool:
    off = lay.get("offload") or {}
    return bool(lay.get("zero_stage")) or bool(off.get("optimizer")) or bool(off.get("params"))


def _describe(lay: dict[str, Any]) -> str:
    off = lay.get("offload") or {}
    what = [k for k in ("optimizer", "params") if off.get(k)]
    engine = f"DeepSpeed ZeRO-{lay.get('zero_stage')}" if _uses_deepspeed(lay) else "no DeepSpeed"
    return f"{engine}{' + ' + '+'.join(what) + ' offload' if what else ''}, {lay.get('world_size')} process(es)"


def _offload_value(lay: dict[str, Any]) -> str:
    off = lay.get("offload") or {}
    return "optimizer+params" if off.get("params") else "optimizer" if off.get("optimizer") else "none"


def resume_mode(checkpoint: Path, plan: dict[str, Any]) -> str:
    """How a run with ``plan`` continues from ``checkpoint``: ``same`` (the Trainer loads it as it
    is: same layout, or no DeepSpeed, whose optimizer state is whole at any world size) or
    ``universal`` (DeepSpeed, another world size: convert to a universal checkpoint, load with
    ``checkpoint.load_universal``). A combination DeepSpeed cannot load raises ``InvalidInput``
    naming the params that resume it, or ``train.resume=false``."""
    from tuneops.errors import InvalidInput

    try:
        old = json.loads((checkpoint / MARKER).read_text()).get("layout")
    except (OSError, ValueError):
        old = None
    if not old:              # a marker from before layouts were recorded: same layout by construction
        return "same"
    new = layout(plan)
    fresh = "or start from step 0 with --set train.resume=false"
    if _uses_deepspeed(old) != _uses_deepspeed(new):
        raise InvalidInput(
            f"train.resume: {checkpoint} was written with {_describe(old)}; this plan has {_describe(new)}. "
            f"A DeepSpeed checkpoint and a plain Trainer one do not load into each other: resume with "
            f"--set select.zero_stage={old.get('zero_stage')} --set select.offload={_offload_value(old)} {fresh}")
    if not _uses_deepspeed(new):
        return "same"
    if old.get("zero_stage") != new.get("zero_stage") or (old.get("offload") or {}) != (new.get("offload") or {}):
        raise InvalidInput(
            f"train.resume: {checkpoint} was written with {_describe(old)}; this plan has {_describe(new)}. "
            f"The process count may change (universal checkpoint), the ZeRO stage and offload may not: resume with "
            f"--set select.zero_stage={old.get('zero_stage')} --set select.offload={_offload_value(old)} {fresh}")
    return "same" if old.get("world_size") == new.get("world_size") else "universal"


def to_universal(checkpoint: Path) -> Path:
    """Convert the DeepSpeed checkpoint in ``checkpoint`` (``global_stepN/``, written at any world
    size) into DeepSpeed's universal format next to it (``global_stepN_universal/`` and the
    ``latest_universal`` tag file, which ``load_universal`` reads). Done once; a conversion that
    died half-way is redone. The original files stay, so the checkpoint's marker still holds."""
    import subprocess
    import sys

    tag = (checkpoint / "latest").read_text().strip()
    out = checkpoint / f"{tag}_universal"
    done = checkpoint / "tuneops_universal.json"
    if done.is_file() and (checkpoint / "latest_universal").is_file() and out.is_dir():
        return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(checkpoint / tag), "--output_folder", str(out),
                           "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train: converting {checkpoint / tag} to a DeepSpeed universal checkpoint failed "
                           f"(exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    done.write_text(json.dumps({"from": tag, "to": out.name}))
    return out
