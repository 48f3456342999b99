"""The fine-tuning pipeline as one Prefect flow: each stage of ``tuneops.stages``
wrapped as a task, run in order. The flow only wires; the stage code is the same
that ``dvc repro`` runs through the CLI.

Tasks are cached on their inputs' md5s + params + code version and retried on
transient failures (``tuneops.orchestrate.caching``; settings under ``orchestrate``).
The whole run holds the project lock (``tuneops.orchestrate.lock``): a second run of the
same project waits or refuses (``orchestrate.lock``).
"""
from __future__ import annotations

import os
from typing import Any

from prefect import flow, runtime, task

from tuneops import env, stages
from tuneops.config import load_config
from tuneops.orchestrate import caching
from tuneops.orchestrate.lock import project_lock

BOUND = ("train", "evaluate", "optimize")   # the results register reads from the same flow run

TASKS = {spec.name: task(spec.load(), name=spec.name, task_run_name=spec.name, cache_key_fn=caching.cache_key_fn,
                         persist_result=True, retry_condition_fn=caching.is_transient)
         for spec in stages.STAGES}


@flow(name="tuneops-finetune", log_prints=True)
def finetune(params_file: str = "params.yaml", overrides: list[str] | None = None,
             start: str | None = None, data_md5: str | None = None) -> dict[str, Any]:
    """``data_md5``: the dataset fingerprint of the data-change event that started this run (if any)."""
    cfg = load_config(params_file, overrides or [])
    env.configure(cfg.state_dir)
    os.environ["TUNEOPS_PREFECT_FLOW_RUN_ID"] = str(runtime.flow_run.id)
    names = stages.STAGE_NAMES[stages.STAGE_NAMES.index(start):] if start else stages.STAGE_NAMES
    results: dict[str, Any] = {}
    with project_lock(cfg, f"tuneops run (Prefect flow run {runtime.flow_run.id})"):
        for name in names:
            # register gets this flow run's own train/evaluate/optimize results (never another run's files)
            kwargs = {"upstream": {k: results[k] for k in BOUND if k in results}} if name == "register" else {}
            results[name] = caching.run_stage(TASKS[name], cfg, name, **kwargs)
    return results
