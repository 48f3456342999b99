"""Process environment: offline, no telemetry, all tool state inside the project.

Called first by every entry point (CLI, Prefect flow, tests) before heavy imports,
because Prefect, MLflow, DVC and Hugging Face read these variables at import time.
Values already set by the user win (``setdefault``).
"""
from __future__ import annotations

import os
from pathlib import Path

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "ORT_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def state_paths(state_dir: Path) -> dict[str, Path]:
    """Where each tool keeps its state, under the project's state dir."""
    return {
        "prefect_home": state_dir / "prefect",
        "hf_home": state_dir / "hf",
        "dvc_site_cache": state_dir / "dvc-site-cache",
        "torch_extensions": state_dir / "torch-extensions",
        "mlflow_db": state_dir / "mlflow.db",
        "mlflow_artifacts": state_dir / "mlartifacts",
        "cache": state_dir / "cache",
        "gx": state_dir / "gx",
    }


def configure(state_dir: str | Path) -> dict[str, Path]:
    """Set offline/telemetry variables and point every tool's state into ``state_dir``."""
    state_dir = Path(state_dir).resolve()
    paths = state_paths(state_dir)
    for key, value in OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(paths["prefect_home"]))
    os.environ.setdefault("HF_HOME", str(paths["hf_home"]))
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(paths["dvc_site_cache"]))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(paths["torch_extensions"]))
    os.environ.setdefault("MPLCONFIGDIR", str(state_dir / "matplotlib"))
    for p in ("prefect_home", "hf_home", "cache"):
        try:
            paths[p].mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            from .errors import InvalidInput

            raise InvalidInput(f"paths.state_dir: {state_dir}: cannot create {paths[p].name}/ there "
                               f"({exc.strerror or type(exc).__name__}); point it at a writable folder") from None
    return paths
