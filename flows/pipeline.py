"""The fine-tuning pipeline as one Prefect flow: each stage of ``tuneops.stages``
wrapped as a task, run in order. The flow only wires; the stage code is the same
that ``dvc repro`` runs through the CLI.
"""
from __future__ import annotations

import os
from typing import Any

from prefect import flow, runtime, task
from prefect.cache_policies import NO_CACHE

from tuneops import env, stages
from tuneops.config import load_config

TASKS = {spec.name: task(spec.load(), name=spec.name, cache_policy=NO_CACHE, task_run_name=spec.name)
         for spec in stages.STAGES}


@flow(name="tuneops-finetune", log_prints=True)
def finetune(params_file: str = "params.yaml", overrides: list[str] | None = None,
             start: str | None = None) -> dict[str, Any]:
    cfg = load_config(params_file, overrides or [])
    env.configure(cfg.state_dir)
    os.environ["TUNEOPS_PREFECT_FLOW_RUN_ID"] = str(runtime.flow_run.id)
    names = stages.STAGE_NAMES[stages.STAGE_NAMES.index(start):] if start else stages.STAGE_NAMES
    return {name: TASKS[name](cfg) for name in names}
