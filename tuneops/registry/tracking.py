"""MLflow wiring: SQLite tracking + registry inside the project's state dir by default."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneops.config import Config
from tuneops.env import state_paths


def tracking_uri(cfg: Config) -> str:
    return cfg.tracking.tracking_uri or f"sqlite:///{state_paths(cfg.state_dir)['mlflow_db']}"


def use_store(cfg: Config) -> None:
    """Point MLflow (tracking and model registry) at the configured store."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    mlflow.set_registry_uri(tracking_uri(cfg))


def setup(cfg: Config) -> Any:
    """Point MLflow at the configured store and return the experiment id (created if new)."""
    import mlflow

    use_store(cfg)
    name = cfg.tracking.experiment
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        location = cfg.tracking.artifact_location or str(state_paths(cfg.state_dir)["mlflow_artifacts"])
        if "://" not in location:
            location = Path(location).resolve().as_uri()
        exp_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def run_tags() -> dict[str, str]:
    """Tags that tie an MLflow run to the orchestrator that started it."""
    tags = {}
    if os.environ.get("TUNEOPS_PREFECT_FLOW_RUN_ID"):
        tags["prefect.flow_run_id"] = os.environ["TUNEOPS_PREFECT_FLOW_RUN_ID"]
    if os.environ.get("DVC_STAGE") or os.environ.get("DVC_ROOT"):
        tags["orchestrator"] = "dvc"
    return tags
