"""The pipeline's stages, in order: the one list that the CLI, the Prefect flow and
the dvc.yaml agreement test all read.

Each stage lives in ``tasks/<name>.py`` as a plain function ``run(cfg) -> dict`` over
the paths and params sections declared here. ``deps``/``outs`` are keys of the
``paths`` section of params.yaml; ``params`` are the sections the stage reads; ``code``
are the sources the stage runs (its ``tasks/`` module and the ``tuneops`` modules it
imports, directly or not, other than the shared plumbing in ``PLUMBING``). ``dvc.yaml``
lists them as deps and the Prefect stage cache hashes the same files, so both runners
see a stage as stale for the same data, params and code changes.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class StageSpec:
    name: str
    help: str
    params: tuple[str, ...]
    deps: tuple[str, ...] = ()
    outs: tuple[str, ...] = ()
    uncached_outs: tuple[str, ...] = ()   # side-effect records (e.g. registry), not DVC-cached
    code: tuple[str, ...] = ()            # source files/folders (repo-relative) whose change makes the stage stale
    editable_outs: bool = False   # outputs are user data: edited in place, they are the new data (cache kept)

    @property
    def module(self) -> str:
        return f"tasks.{self.name}"

    def load(self) -> Callable[..., dict[str, Any]]:
        return importlib.import_module(self.module).run


STAGES: tuple[StageSpec, ...] = (
    StageSpec("model", "prepare the base model (GGUF -> safetensors, or the tiny model)",
              params=("model",), outs=("base_model_dir",),
              code=("tasks/model.py", "tuneops/models.py", "tuneops/chat.py", "tuneops/families.py")),
    StageSpec("ingest", "materialize the scenario's dataset (data.scenario) with a fixed-seed train/eval split",
              params=("ingest", "data"), outs=("train_data", "eval_data", "ingest_manifest"),
              code=("tasks/ingest.py", "tuneops/data"), editable_outs=True),
    StageSpec("validate", "data gate: record checks + Great Expectations suite (stops bad data before compute)",
              params=("validate", "data", "model.max_seq_len"),
              deps=("base_model_dir", "train_data", "eval_data"),
              outs=("validation_dir", "clean_train_data", "clean_eval_data"),
              code=("tasks/validate.py", "tuneops/data", "tuneops/models.py", "tuneops/chat.py", "tuneops/families.py")),
    StageSpec("select", "choose the fine-tuning method from params, model and hardware",
              params=("select", "model.max_seq_len"),
              deps=("base_model_dir", "validation_dir"), outs=("plan",),
              code=("tasks/select.py", "tuneops/planner", "tuneops/training/heads.py", "tuneops/training/methods.py",
                    "tuneops/families.py")),
    StageSpec("train", "fine-tune (LoRA via peft + transformers Trainer), metrics to MLflow",
              params=("train", "model.max_seq_len", "tracking"),
              deps=("base_model_dir", "clean_train_data", "plan"), outs=("train_dir",),
              code=("tasks/train.py", "tuneops/training", "tuneops/chat.py", "tuneops/lm.py",
                    "tuneops/models.py", "tuneops/registry/tracking.py", "tuneops/families.py", "tuneops/secrets.py")),
    StageSpec("evaluate", "perplexity of base vs fine-tuned on the held-out split, sample generations",
              params=("evaluate", "model.max_seq_len"),
              deps=("base_model_dir", "clean_eval_data", "train_dir"), outs=("evaluate_dir",),
              code=("tasks/evaluate.py", "tuneops/chat.py", "tuneops/finetuned.py", "tuneops/lm.py",
                    "tuneops/models.py", "tuneops/training/heads.py", "tuneops/training/methods.py",
                    "tuneops/families.py")),
    StageSpec("optimize", "merge adapter, fp32 ONNX graph with KV cache (onnxruntime-genai builder or "
              "torch.onnx), ORT parity, quantized variants per target profile (INT8/INT4/QDQ), gates, coverage reports",
              params=("optimize", "model.max_seq_len"),
              deps=("base_model_dir", "clean_train_data", "clean_eval_data", "train_dir"), outs=("optimize_dir",),
              code=("tasks/optimize.py", "tuneops/export", "tuneops/chat.py", "tuneops/finetuned.py", "tuneops/lm.py",
                    "tuneops/models.py", "tuneops/onnx_lm.py", "tuneops/targets", "tuneops/training/heads.py",
                    "tuneops/training/methods.py", "tuneops/families.py", "tuneops/genai.py")),
    StageSpec("register", "log and register the model in MLflow; champion only if it beats base and champion",
              params=("register", "tracking", "evaluate", "optimize", "model.max_seq_len"),
              deps=("train_dir", "evaluate_dir", "optimize_dir", "plan", "validation_dir"),
              uncached_outs=("register_dir",),
              code=("tasks/register.py", "tuneops/registry", "tuneops/chat.py", "tuneops/finetuned.py",
                    "tuneops/models.py", "tuneops/onnx_lm.py", "tuneops/serving.py",
                    "tuneops/training/heads.py", "tuneops/training/methods.py", "tuneops/families.py",
                    "tuneops/chat_engine.py", "tuneops/faults.py", "tuneops/secrets.py",
                    "tuneops/lm.py")),
)

STAGE_NAMES = tuple(s.name for s in STAGES)

# Shared plumbing every stage imports (config, paths, errors, env, the stage list, the CLI):
# not a code dep of any stage, so that a CLI or config change does not rerun the pipeline.
PLUMBING = ("tuneops/__init__.py", "tuneops/config.py", "tuneops/io.py", "tuneops/errors.py", "tuneops/env.py",
            "tuneops/stages.py", "tuneops/cli.py", "tuneops/log.py", "tasks/__init__.py")
# Files never hashed as code (bytecode caches; .dvcignore lists the same).
CODE_IGNORE = ("__pycache__", ".pyc")


def code_root(project: "Path | str | None" = None) -> "Path":
    """Where the stage code deps resolve: the project folder when it holds the sources (a
    checkout, a jobs-API working dir with its code copy), else this package's checkout."""
    from pathlib import Path

    if project is not None and all((Path(project) / c).exists() for s in STAGES for c in s.code):
        return Path(project).resolve()
    return Path(__file__).resolve().parents[1]

# params sections that steer how the pipeline runs (server, schedules, retries, caching),
# not what it computes: read by the Prefect flow and the CLI, not by a stage.
ORCHESTRATION_PARAMS = ("orchestrate",)
SERVICE_PARAMS = ("service",)        # the jobs API (tuneops/service): not a stage input either
SERVE_PARAMS = ("serve",)           # `tuneops serve` and the jobs API's chat endpoint: not a stage input
PLATFORM_PARAMS = ("platforms",)     # exports to other platforms and the image (tuneops/platforms, deploy --image)


def get(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(name)
