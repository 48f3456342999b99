"""The data watcher: compare the tracked datasets' md5s with the last trained version
recorded in MLflow and, when they differ, emit ``orchestrate.event`` to Prefect.

The event's resource carries the dataset fingerprint as label ``tuneops.data.md5``; the
fine-tuning deployment's trigger buckets on that label, so a fingerprint starts one
retrain however often it is emitted within ``orchestrate.dedupe_window_s``.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any

from tuneops.registry import tracking
from tuneops.config import Config
from tuneops.io import md5_file
from tuneops.registry.provenance import dvc_lock_md5s

DATASETS = ("train", "eval")   # paths.train_data / paths.eval_data: what `register` tags as data.<key>.md5


def resource_id(cfg: Config) -> str:
    return f"tuneops.dataset.{cfg.register.model_name}"


def fingerprint(md5s: dict[str, str | None]) -> str:
    """One md5 for the whole dataset (every split): the de-duplication key."""
    blob = "".join(f"{path}:{md5}\n" for path, md5 in sorted(md5s.items()))
    return hashlib.md5(blob.encode()).hexdigest()


def last_trained(cfg: Config) -> dict[str, Any] | None:
    """Data md5s recorded on the newest registered version of ``register.model_name``."""
    from mlflow import MlflowClient

    tracking.setup(cfg)
    found = MlflowClient().search_model_versions(f"name='{cfg.register.model_name}'")
    if not found:
        return None
    newest = max(found, key=lambda v: int(v.version))
    return {"version": newest.version, "run_id": newest.run_id,
            "md5s": {newest.tags.get(f"data.{k}.path", ""): newest.tags.get(f"data.{k}.md5") for k in DATASETS}}


def check(cfg: Config) -> dict[str, Any]:
    """Current dataset md5s vs the last trained version: ``changed`` and the files that differ."""
    current: dict[str, str | None] = {}
    for key in DATASETS:
        path = cfg.path(f"{key}_data")
        current[os.path.relpath(path, cfg.root)] = md5_file(path) if path.is_file() else None
    last = last_trained(cfg)
    previous = last["md5s"] if last else {}
    lock = dvc_lock_md5s(cfg.root)
    files = [{"path": p, "md5": m, "previous_md5": previous.get(p), "dvc_lock_md5": lock.get(p),
              "changed": m != previous.get(p)} for p, m in current.items()]
    missing = [f["path"] for f in files if f["md5"] is None]
    return {
        "dataset": cfg.data.scenario,
        "md5": fingerprint(current),
        "changed": bool(not missing and any(f["changed"] for f in files)),
        "missing": missing,
        "files": files,
        "last_trained_version": last["version"] if last else None,
        "model_name": cfg.register.model_name,
    }


def emit(cfg: Config, change: dict[str, Any], params_file: str) -> str | None:
    """Send the data-changed event; returns its id (None when events are not sent)."""
    from prefect.events import emit_event

    event = emit_event(
        event=cfg.orchestrate.event,
        resource={"prefect.resource.id": resource_id(cfg), "prefect.resource.name": change["dataset"],
                  "tuneops.data.md5": change["md5"], "tuneops.model": cfg.register.model_name},
        payload={"dataset": change["dataset"], "md5": change["md5"], "params_file": params_file,
                 "files": change["files"], "last_trained_version": change["last_trained_version"]},
    )
    return str(event.id) if event is not None else None
