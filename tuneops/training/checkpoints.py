"""Crash-safe checkpoints: written by the Trainer every ``train.save_steps`` steps, marked
complete only after every file is on disk, resumed automatically.

A checkpoint counts only when its ``tuneops_complete.json`` marker exists and every file it
lists still has the recorded size: a checkpoint that was being written when the process was
killed (no marker) or was truncated afterwards (size mismatch) is skipped, and the next older
complete one is used. Checkpoints live under ``paths.checkpoint_dir/<run key>``, outside the
stage's output folder (DVC deletes outputs before it re-runs a stage), where the run key hashes
everything that makes two runs the same run: train/select params, the plan, the training data
and the base model. Another key never resumes from them.
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


def run_key(cfg: Any, plan: dict[str, Any], data_md5: str) -> str:
    from tuneops.models import provenance

    base = cfg.path("base_model_dir")
    files = {p.name: p.stat().st_size for p in sorted(base.glob("*")) if p.is_file()} if base.is_dir() else {}
    blob = json.dumps({"train": cfg.section("train"), "select": cfg.section("select"), "plan": plan,
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


def callback(world_rank: int) -> Any:
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
                              {"step": state.global_step})

    return MarkComplete()
