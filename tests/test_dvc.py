"""One pipeline, one record: a Prefect flow run leaves DVC as `dvc repro` would have
(`dvc status` clean, `dvc repro` runs nothing), both runners see the same stages stale
(params, data, code), DVC's own tools (metrics, plots, exp) work on the outputs, and a
registered version's data comes back in another clone from the DVC remote.

Default suite: everything on the one shared flow run (`flow_run`, conftest) plus cheap
`dvc` commands; the slow set reruns stages for real (`dvc repro`, `dvc exp run`)."""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tuneops import stages
from tuneops.io import md5_file, read_json

from tests.conftest import TEST_ROOT, git_dvc_project, sh

ARTIFACTS = TEST_ROOT / "artifacts"


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _timed(cmd: list[str], cwd: Path) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = sh(cmd, cwd)
    return out, time.perf_counter() - t0


def _timings(**values: float) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "dvc-timings.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update({k: round(v, 2) for k, v in values.items()})
    path.write_text(json.dumps(data, indent=1))


@pytest.fixture(scope="module")
def project(flow_run) -> Path:
    root, state, _ = flow_run
    assert state.is_completed(), state
    return root


def test_flow_run_leaves_dvc_clean_and_repro_runs_nothing(project, flow_run):
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert tuple(lock) == stages.STAGE_NAMES
    train_md5 = next(o["md5"] for o in lock["ingest"]["outs"] if o["path"] == "data/chat/train.jsonl")
    assert train_md5 == md5_file(project / "data/chat/train.jsonl")
    assert {d["path"] for d in lock["train"]["deps"]} >= set(stages.get("train").code)
    registration = read_json(project / "artifacts/register/registration.json")
    assert registration["tags"]["dvc.lock.train.md5"] == train_md5

    status, status_s = _timed(["dvc", "status"], project)
    assert "Data and pipelines are up to date" in status, status
    repro, repro_s = _timed(["dvc", "repro"], project)
    print(f"after the flow ({flow_run[2]:.0f} s): dvc status {status_s:.2f} s, no-op dvc repro {repro_s:.2f} s")
    _timings(flow_s=flow_run[2], dvc_status_s=status_s, noop_dvc_repro_s=repro_s)
    assert _ran(repro) == [] and "Data and pipelines are up to date" in repro


def test_a_code_change_makes_train_stale_for_dvc_and_the_flow_cache(project):
    from tuneops.config import load_config
    from tuneops.orchestrate import caching

    cfg = load_config(project / "params.yaml")
    assert caching.cache_valid(cfg, "train") and caching.cache_valid(cfg, "model")
    probe = project / "tuneops" / "training" / "probe.py"     # the project's code (stages.code_root)
    probe.write_text("# a code change\n")
    try:
        status = sh(["dvc", "status"], project)
        stale_in_flow = {name for name in stages.STAGE_NAMES if not caching.cache_valid(cfg, name)}
    finally:
        probe.unlink()
    stale_in_dvc = set(re.findall(r"^(\w+):\s*$", status, re.M))
    assert "train" in stale_in_dvc and "tuneops/training" in status
    assert stale_in_dvc == stale_in_flow == {"train"}
    assert "Data and pipelines are up to date" in sh(["dvc", "status"], project)


def test_dvc_metrics_and_params_show_the_run(project):
    metrics = json.loads(sh(["dvc", "metrics", "show", "--json"], project))
    data = metrics[""]["data"] if "" in metrics else next(iter(metrics.values()))["data"]
    ev = data["artifacts/evaluate/metrics.json"]["data"]
    assert ev["finetuned_perplexity"] == read_json(project / "artifacts/evaluate/metrics.json")["finetuned_perplexity"]
    assert "final_loss" in data["artifacts/train/metrics.json"]["data"]
    assert "fp32" in data["artifacts/optimize/metrics.json"]["data"]["variants"]
    assert "train.learning_rate" in sh(["dvc", "params", "diff", "--all"], project)


def test_dvc_plots_render_offline_in_headless_chromium(project):
    from tests.registry.test_report import CHROMIUM, headless

    out = project / ".tuneops" / "plots"
    sh(["dvc", "plots", "show", "-o", str(out)], project)
    page = (out / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "https://" not in page.split("<script>", 1)[0]
    for title in ("Training loss", "Base vs fine-tuned", "ONNX variants"):
        assert title in page
    if CHROMIUM is None:
        pytest.skip("Debian chromium not installed (make test-deps)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    dom, console = headless(out / "index.html", ARTIFACTS / "dvc-plots.png")
    assert not [line for line in console if "rror" in line or "Uncaught" in line], console
    assert dom.count("<svg") >= 3 or dom.count("<canvas") >= 3, "the three plots did not render"


def test_a_second_clone_checks_out_the_champions_data_from_the_remote(project):
    from tuneops.cli import main

    clone = TEST_ROOT / "flow-clone"
    shutil.rmtree(clone, ignore_errors=True)
    sh(["git", "clone", "-q", str(project), str(clone)], TEST_ROOT)
    assert not (clone / "data/chat/train.jsonl").exists()     # outputs are not in git
    tags = read_json(project / "artifacts/register/registration.json")["tags"]
    assert tags["data.remote"] == str(project / ".tuneops" / "dvc-remote")
    name = yaml.safe_load((clone / "params.yaml").read_text())["register"]["model_name"]
    out = sh(["tuneops", "data", "checkout", f"{name}@champion", "--json"], clone)
    restored = json.loads(out[out.index("{"):])
    assert [f["path"] for f in restored["files"]] == ["data/chat/train.jsonl", "data/chat/eval.jsonl"]
    for split in ("train", "eval"):
        assert md5_file(clone / tags[f"data.{split}.path"]) == tags[f"data.{split}.md5"]
    assert main(["--params", str(clone / "params.yaml"), "data", "checkout", f"{name}@99"]) == 1   # RegistryError


def test_a_dvc_exp_temp_copy_uses_the_projects_state_dir(monkeypatch, tmp_path):
    """`dvc exp run --temp|--queue` runs in .dvc/tmp/exps/...: MLflow runs and versions still go to
    the project's store (DVC_ROOT), not to a store inside the temporary copy."""
    from tuneops.config import load_config

    exp = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    exp.mkdir(parents=True)
    raw = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    (exp / "params.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(exp / "params.yaml").state_dir == exp / ".tuneops"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert load_config(exp / "params.yaml").state_dir == tmp_path / ".tuneops"


def test_a_train_param_change_reruns_exactly_train_and_what_follows(project):
    """Last on the shared project: it retrains (tiny model, ~1 min) and registers a second version."""
    params = project / "params.yaml"
    before = params.read_text()
    raw = yaml.safe_load(before)
    raw["train"]["learning_rate"] = raw["train"]["learning_rate"] / 2
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        status = sh(["dvc", "status"], project)
        assert set(re.findall(r"^(\w+):\s*$", status, re.M)) == {"train"}
        rerun, rerun_s = _timed(["dvc", "repro"], project)
    finally:
        params.write_text(before)
    print(f"dvc repro after a train.learning_rate change: {rerun_s:.1f} s")
    _timings(dvc_repro_train_change_s=rerun_s)
    assert _ran(rerun) == ["train", "evaluate", "optimize", "register"]


@pytest.mark.slow   # a full dvc repro and two experiments (~4 min)
def test_dvc_repro_from_scratch_and_two_experiments_compare():
    from tests.registry.test_report import CHROMIUM, headless

    root = git_dvc_project("dvc-exp", ("train.max_steps=4", "evaluate.max_samples=8", "evaluate.generations=0",
                                       "optimize.ppl_samples=4", "optimize.parity_samples=1"))
    first, full_s = _timed(["dvc", "repro"], root)
    assert _ran(first) == list(stages.STAGE_NAMES)
    sh(["git", "add", "-A"], root)
    sh(["git", "commit", "-qm", "baseline"], root)
    for lr in ("0.01", "0.05"):
        sh(["dvc", "exp", "run", "-n", f"lr-{lr}", "-S", f"train.learning_rate={lr}"], root)
    text = sh(["dvc", "exp", "show", "--no-pager", "--md"], root)
    assert "lr-0.01" in text and "lr-0.05" in text and "finetuned_perplexity" in text
    out = root / ".tuneops" / "plots-diff"
    sh(["dvc", "plots", "diff", "lr-0.01", "lr-0.05", "-o", str(out)], root)
    page = (out / "index.html").read_text()
    assert "lr-0.01" in page and "lr-0.05" in page
    _timings(dvc_repro_full_s=full_s)
    if CHROMIUM is not None:
        dom, console = headless(out / "index.html", ARTIFACTS / "dvc-plots-diff.png")
        assert not [line for line in console if "rror" in line or "Uncaught" in line], console
