"""The pipeline's stages, in order: the one list that the CLI, the Prefect flow and
the dvc.yaml agreement test all read.

Each stage lives in ``tasks/<name>.py`` as a plain function ``run(cfg) -> dict`` over
the paths and params sections declared here. ``deps``/``outs`` are keys of the
``paths`` section of params.yaml; ``params`` are the sections and dotted keys the stage
reads, all of them: the stage gets a view of the config with only those (and ``paths``),
so any other read fails (``config.ConfigView``, ``StageSpec.load``); ``code``
are the sources the stage runs (its ``tasks/`` module and the ``tuneops`` modules it
imports, directly or not, other than the shared plumbing in ``PLUMBING``). ``dvc.yaml``
lists them as deps and the Prefect stage cache hashes the same files, so both runners
see a stage as stale for the same data, params and code changes.
"""
from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
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
        return entry_point(self.name).partition(":")[0]

    def view(self, cfg: Any) -> Any:
        """``cfg`` as this stage may read it: its ``params`` and ``paths`` (``config.ConfigView``)."""
        return cfg.view(self.name, self.params)

    def load(self) -> Callable[..., dict[str, Any]]:
        """The stage's ``run``, handed its view of the config whatever the caller passes: every
        runner (the CLI and so ``dvc repro``, the Prefect flow and so the jobs API, the tests) gets
        the stage through here, so an undeclared read fails in each of them."""
        return _viewed_run(self.name)


STAGES: tuple[StageSpec, ...] = (
    StageSpec("model", "prepare the base model (GGUF -> safetensors, or the tiny model)",
              params=("model",), outs=("base_model_dir",),
              code=("tasks/model.py", "tuneops/models.py", "tuneops/inference/chat.py",
                    "tuneops/inference/toolcalls.py", "tuneops/families.py")),
    StageSpec("ingest", "materialize the scenario's dataset (data.scenario) with a fixed-seed train/eval split",
              params=("ingest", "data"), outs=("train_data", "eval_data", "ingest_manifest"),
              code=("tasks/ingest.py", "tuneops/data"), editable_outs=True),
    StageSpec("validate", "data gate: record checks + Great Expectations suite (stops bad data before compute)",
              params=("validate", "data", "model.max_seq_len"),
              deps=("base_model_dir", "train_data", "eval_data"),
              outs=("validation_dir", "clean_train_data", "clean_eval_data"),
              code=("tasks/validate.py", "tuneops/data", "tuneops/models.py", "tuneops/inference/chat.py",
                    "tuneops/inference/toolcalls.py",
                    "tuneops/families.py", "tuneops/training/heads.py", "tuneops/training/preference.py",
                    "tuneops/training/objectives.py")),
    StageSpec("select", "choose the fine-tuning method from params, model and hardware",
              params=("select", "model.max_seq_len", "train.objective", "train.reference"),
              deps=("base_model_dir", "validation_dir"), outs=("plan",),
              code=("tasks/select.py", "tuneops/planner", "tuneops/training/heads.py", "tuneops/training/methods.py",
                    "tuneops/training/objectives.py", "tuneops/export/basequant.py", "tuneops/families.py")),
    StageSpec("train", "fine-tune (LoRA via peft + transformers Trainer), metrics to MLflow",
              params=("train", "model", "select", "tracking", "register.model_name"),
              deps=("base_model_dir", "clean_train_data", "plan"), outs=("train_dir",),
              code=("tasks/train.py", "tuneops/training", "tuneops/data", "tuneops/export/basequant.py",
                    "tuneops/inference/chat.py",
                    "tuneops/inference/toolcalls.py", "tuneops/inference/scoring.py",
                    "tuneops/models.py", "tuneops/registry/tracking.py", "tuneops/families.py", "tuneops/secrets.py")),
    StageSpec("evaluate", "perplexity of base vs fine-tuned on the held-out split, sample generations",
              params=("evaluate", "model.max_seq_len"),
              deps=("base_model_dir", "clean_eval_data", "train_dir"), outs=("evaluate_dir",),
              code=("tasks/evaluate.py", "tuneops/inference/chat.py",
                    "tuneops/inference/toolcalls.py", "tuneops/inference/finetuned.py",
                    "tuneops/inference/scoring.py", "tuneops/inference/decode.py", "tuneops/inference/runtimes.py",
                    "tuneops/inference/sampling.py", "tuneops/inference/graders.py", "tuneops/models.py",
                    "tuneops/training/heads.py", "tuneops/training/methods.py", "tuneops/export/basequant.py",
                    "tuneops/families.py", "tuneops/training/preference.py", "tuneops/training/objectives.py", "tuneops/data")),
    StageSpec("optimize", "merge adapter, fp32 ONNX graph with KV cache (onnxruntime-genai builder or "
              "torch.onnx), ORT parity, quantized variants per target profile (INT8/INT4/QDQ), gates, coverage reports",
              params=("optimize", "model.max_seq_len"),
              deps=("base_model_dir", "clean_train_data", "clean_eval_data", "train_dir"), outs=("optimize_dir",),
              code=("tasks/optimize.py", "tuneops/export", "tuneops/inference/chat.py",
                    "tuneops/inference/toolcalls.py",
                    "tuneops/inference/finetuned.py", "tuneops/inference/scoring.py", "tuneops/models.py",
                    "tuneops/inference/runtimes.py", "tuneops/targets", "tuneops/training/heads.py",
                    "tuneops/training/methods.py", "tuneops/families.py")),
    StageSpec("register", "log and register the model in MLflow; champion only if it beats base and champion",
              params=("register", "tracking", "evaluate", "optimize", "model.max_seq_len"),
              deps=("train_dir", "evaluate_dir", "optimize_dir", "plan", "validation_dir"),
              uncached_outs=("register_dir",),
              code=("tasks/register.py", "tuneops/registry", "tuneops/inference/chat.py",
                    "tuneops/inference/toolcalls.py", "tuneops/inference/finetuned.py",
                    "tuneops/models.py", "tuneops/inference/runtimes.py", "tuneops/inference/pyfunc.py",
                    "tuneops/training/heads.py", "tuneops/training/methods.py", "tuneops/export/basequant.py",
                    "tuneops/families.py",
                    "tuneops/inference/engine.py", "tuneops/inference/constrain.py", "tuneops/inference/logprobs.py",
                    "tuneops/inference/layout.py", "tuneops/inference/pool.py", "tuneops/inference/resolve.py",
                    "tuneops/inference/scheduler.py",
                    "tuneops/faults.py", "tuneops/secrets.py",
                    "tuneops/inference/scoring.py", "tuneops/inference/decode.py", "tuneops/inference/sampling.py",
                    "tuneops/training/objectives.py", "tuneops/inference/graders.py")),
)

STAGE_NAMES = tuple(s.name for s in STAGES)

# Shared plumbing every stage imports (config, paths, errors, env, the stage list, the CLI, child processes):
# not a code dep of any stage, so that a CLI or config change does not rerun the pipeline.
PLUMBING = ("tuneops/__init__.py", "tuneops/config.py", "tuneops/io.py", "tuneops/errors.py", "tuneops/env.py",
            "tuneops/stages.py", "tuneops/cli.py", "tuneops/log.py", "tuneops/procs.py", "tasks/__init__.py")
# Files never hashed as code (bytecode caches; .dvcignore lists the same).
CODE_IGNORE = ("__pycache__", ".pyc")


def code_root(project: "Path | str | None" = None) -> Path:
    """Where the stage code deps resolve: the project folder when it holds the sources (a
    checkout, a jobs-API working dir with its code copy), else ``source_root()``."""
    if project is not None and all((Path(project) / c).exists() for s in STAGES for c in s.code):
        return Path(project).resolve()
    return source_root()


# -- the one way up: what tuneops/ loads from the stage and flow code -----------------------------
# tasks/ (the stages) and flows/ (the Prefect flows) use tuneops/, never the reverse, except through
# this table: tuneops reaches them by name at run time (the CLI's stage commands and `run`/`watch`,
# the Prefect deployments' entrypoints), never by an import statement. tests/test_imports.py checks
# that no other tuneops module names tasks or flows, and that the import graph has no cycles.
# They are not installed packages (pyproject.toml installs tuneops only): they are loaded from the
# project's source folder (``source_root``).
ENTRY_POINTS: dict[str, str] = {
    **{spec.name: f"tasks.{spec.name}:run" for spec in STAGES},   # each stage: run(cfg) -> dict
    "finetune": "flows.pipeline:finetune",      # `tuneops run`, the fine-tuning deployment, the jobs API
    "watch": "flows.watch:watch",               # `tuneops watch`, the data-watch deployment
}
SOURCE_PACKAGES = ("tasks", "flows")


def entry_point(name: str) -> str:
    """``module:attribute`` of an entry point (``ENTRY_POINTS``)."""
    return ENTRY_POINTS[name]


def entry_file(name: str) -> str:
    """The entry point as a Prefect deployment entrypoint: ``flows/pipeline.py:finetune``."""
    module, _, attr = entry_point(name).partition(":")
    return f"{module.replace('.', '/')}.py:{attr}"


def source_root() -> Path:
    """The folder that holds tasks/ and flows/: this package's checkout (an editable install, a
    checkout on PYTHONPATH), else the working directory (the image's /app, where the CLI runs)."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd().resolve()):
        if all((root / p / "__init__.py").is_file() for p in SOURCE_PACKAGES):
            return root
    from .errors import TuneopsError

    raise TuneopsError(f"no tasks/ and flows/ beside {Path(__file__).resolve().parent} or in {Path.cwd()}: "
                       "run tuneops from the project's checkout")


def load_entry(name: str) -> Any:
    """Import an entry point from the project's source folder (put on ``sys.path`` when it is not)."""
    module, _, attr = entry_point(name).partition(":")
    root = str(source_root())
    if root not in sys.path and not any(Path(p or ".").resolve() == Path(root) for p in sys.path):
        sys.path.insert(0, root)
    return getattr(importlib.import_module(module), attr)


@functools.cache
def _viewed_run(name: str) -> Callable[..., dict[str, Any]]:
    spec, run = get(name), load_entry(name)

    @functools.wraps(run)
    def viewed(cfg: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return run(spec.view(cfg), *args, **kwargs)

    viewed.__prefect_task_source__ = run   # type: ignore[attr-defined]  # Prefect's task key: the stage's code
    return viewed

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
