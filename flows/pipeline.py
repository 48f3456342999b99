"""The fine-tuning pipeline as one Prefect flow: each stage of ``tuneops.stages``
wrapped as a task, run in order. The flow only wires; the stage code is the same
that ``dvc repro`` runs through the CLI.

Tasks are cached on their inputs' md5s + params + code deps and retried on
transient failures (``tuneops.orchestrate.caching``; settings under ``orchestrate``).
The whole run holds the project lock (``tuneops.orchestrate.lock``): a second run of the
same project waits or refuses (``orchestrate.lock``).
In a DVC project each stage's ``dvc.lock`` entry is committed after it ran
(``tuneops.dvc_record``), so ``dvc status`` is clean after the flow.
Each stage's wall time and peak RSS (``tuneops.resources``) are in its summary line and in the
result's ``resources`` entry, after the stages' own results.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, runtime, task

from tuneops import dvc_record, env, log, preflight, resources, stages
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
    preflight.check(cfg, start, overrides or [])    # late stages' params, before the first stage runs
    record = _records_dvc(cfg, params_file, overrides)
    results: dict[str, Any] = {}
    usage: dict[str, resources.Usage] = {}
    t0 = time.perf_counter()
    with project_lock(cfg, f"tuneops run (Prefect flow run {runtime.flow_run.id})"):
        for name in names:
            # register gets this flow run's own train/evaluate/optimize results (never another run's files)
            kwargs = {"upstream": {k: results[k] for k in BOUND if k in results}} if name == "register" else {}
            with resources.measure() as usage[name]:
                results[name] = caching.run_stage(TASKS[name], cfg, name, **kwargs)
            print(log.stage_summary(name, results[name], usage[name].wall_s, usage[name].peak_rss_bytes)
                  + (_record(cfg, name) if record else ""))
    # after the stages: keys before it are stage names (the CLI and callers iterate over them)
    results["resources"] = resources.summary(usage, time.perf_counter() - t0)
    return results


def _record(cfg: Any, name: str) -> str:
    """Commit the stage's dvc.lock entry; a DVC failure (another DVC command holding the repo lock)
    is reported, not allowed to fail a run whose stage succeeded (`dvc commit -f STAGE` repairs it)."""
    try:
        return f" (+ dvc.lock entry {dvc_record.commit_stage(cfg.root, name):.2f} s)"
    except Exception as exc:  # noqa: BLE001 - the stage's work is done; say what is missing
        print(f"WARNING: dvc.lock not updated for {name}: {type(exc).__name__}: {exc} "
              f"(run `dvc commit -f {name}`)")
        return ""


def _records_dvc(cfg: Any, params_file: str, overrides: list[str] | None) -> bool:
    """Whether this run's stages go into dvc.lock (a DVC project, its own params.yaml as is)."""
    if not dvc_record.is_project(cfg.root):
        return False
    if overrides or Path(params_file).resolve() != cfg.root / "params.yaml":
        print("not recorded in dvc.lock: this run's params are not params.yaml's (--set / another params "
              "file); edit params.yaml or use `dvc exp run -S KEY=VALUE`")
        return False
    return True
