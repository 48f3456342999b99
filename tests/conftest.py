"""Test set-up: offline env and all tool state under .tuneops/pytest (never /tmp or
$HOME); one shared Prefect ephemeral server, MLflow db and tokenizer cache per session.

Projects made by ``make_project`` are real tuneops projects (params.yaml = the repo's,
with the tiny-model overrides below), so the tests run the real stage code.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEST_ROOT = REPO / ".tuneops" / "pytest"
STATE = TEST_ROOT / "state"

os.environ["PREFECT_HOME"] = str(STATE / "prefect")
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
from tuneops import env  # noqa: E402

paths = env.configure(STATE)
# Prefect stops the shared ephemeral server at interpreter exit, after pytest has closed
# the captured streams; its "Stopping temporary server" log line would print a
# "--- Logging error ---" traceback. Nothing is lost by not reporting that.
logging.raiseExceptions = False
# Caches (tokenizer, DeepSpeed ops) persist between sessions; the registry starts empty.
paths["mlflow_db"].unlink(missing_ok=True)
shutil.rmtree(paths["mlflow_artifacts"], ignore_errors=True)

# The tiny random Gemma-3 and a small slice of the bundled data: fast, same code paths.
TINY = (
    "model.source=tiny", "ingest.max_conversations=100", "validate.min_rows=5",
    "train.max_steps=8", "train.learning_rate=0.02",
    "select.max_micro_batch_size=2", "select.global_batch_size=4",
    "evaluate.max_samples=16", "evaluate.generations=2", "evaluate.max_new_tokens=8",
    "optimize.parity_samples=2", "optimize.ppl_samples=8", "optimize.targets=[]",
)
# The stage-by-stage project (tests/test_stages.py, test_optimize_onnx.py, test_report.py) builds every
# target's variants; the other tiny pipelines (flow, dvc, orchestration, ...) export fp32 only.
ALL_TARGETS = ("optimize.targets=[cpu,fpga,npu]", "optimize.extra_variants=[int4]")  # int4: opt-in

# The unit tier (`make test-unit`, a couple of minutes) is every test marked neither slow nor
# pipeline. Marked pipeline here: every test whose fixture closure names one of the fixtures that
# build a project and run stages on it, and every test of the modules (listed by hand) that drive
# the CLI, a Prefect server, DVC, DeepSpeed launchers or the jobs API in subprocesses.
PIPELINE_FIXTURES = {"tiny_project", "tiny_cfg", "stage", "tokenizer", "flow_run", "orchestra", "svc",
                     "project", "reg_project", "registry_project", "sentiment", "ner", "minilm_dir", "rows"}
PIPELINE_MODULES = {"test_dvc", "test_faults", "test_flow", "test_orchestration", "test_platforms",
                    "test_readme_commands", "test_robustness", "test_scale_out", "test_service",
                    "test_training", "test_image", "test_serve_mlflow_env"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if PIPELINE_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                item.module.__name__.rsplit(".", 1)[-1] in PIPELINE_MODULES:
            item.add_marker(pytest.mark.pipeline)


def wait_for(predicate, timeout: float, what: str, logs=(), interval: float = 2.0):
    """Poll ``predicate`` until it returns something truthy (returned); on timeout fail with the
    tails of ``logs`` (the server / worker / API logs that say why)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-5000:]}" for p in logs if p.is_file())
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


def make_project(name: str, overrides: tuple[str, ...] = ()) -> Path:
    """A fresh project folder with a params.yaml for the tiny model."""
    from tuneops.config import apply_overrides

    root = TEST_ROOT / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw = apply_overrides(raw, TINY + overrides)
    raw["paths"]["state_dir"] = str(STATE)          # shared caches + MLflow db
    raw["register"]["model_name"] = f"test-{name}"  # registry entries do not collide
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return root


@pytest.fixture(scope="session")
def tiny_project() -> Path:
    return make_project("stages", ALL_TARGETS)


@pytest.fixture(scope="session")
def tiny_cfg(tiny_project: Path):
    from tuneops.config import load_config

    return load_config(tiny_project / "params.yaml")


class StageRunner:
    """Runs the real stages in pipeline order, once each, and keeps their results."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.results: dict[str, dict] = {}

    def __call__(self, name: str) -> dict:
        from tuneops import stages

        for spec in stages.STAGES:
            if spec.name not in self.results:
                self.results[spec.name] = spec.load()(self.cfg)
            if spec.name == name:
                return self.results[name]
        raise KeyError(name)


@pytest.fixture(scope="session")
def stage(tiny_cfg) -> StageRunner:
    return StageRunner(tiny_cfg)


@pytest.fixture(scope="session")
def tokenizer(stage, tiny_cfg):
    from tuneops.models import load_tokenizer

    stage("model")
    return load_tokenizer(tiny_cfg.path("base_model_dir"))


# The pipeline's cheap end-to-end settings (flow, dvc): fp32 export only, few steps and samples.
E2E = ("train.max_steps=4", "evaluate.max_samples=8", "evaluate.generations=1",
       "optimize.ppl_samples=4", "optimize.parity_samples=1")


def sh(cmd: list[str], cwd, timeout: float = 900) -> str:
    """Run a command (a user's shell line); fail with its output tails unless it exits 0."""
    import subprocess

    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def git_dvc_project(name: str, overrides: tuple[str, ...] = ()) -> Path:
    """A tiny project that is a git + DVC repo of this pipeline (dvc.yaml, its code deps, the
    default local remote), committed, like a fresh clone of this repository."""
    from tuneops import dvc_record

    root = make_project(name, overrides)
    sh(["git", "init", "-q"], root)
    sh(["git", "config", "user.email", "t@example.com"], root)
    sh(["git", "config", "user.name", "tuneops tests"], root)
    dvc_record.init_project(root, scm=True)
    (root / ".gitignore").write_text("/.tuneops/\n")
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "project"], root)
    return root


@pytest.fixture(scope="session")
def flow_run():
    """One Prefect flow run of the whole pipeline in a git + DVC project: (project, final state,
    seconds)."""
    from flows.pipeline import finetune

    root = git_dvc_project("flow", E2E)
    t0 = time.perf_counter()
    state = finetune(params_file=str(root / "params.yaml"), return_state=True)
    return root, state, time.perf_counter() - t0
