"""Registry: champion/challenger through the evaluation gate only, `tuneops models
list|show|promote|rollback`, model cards and `tuneops lineage NAME@ALIAS --json`.

One project trains three versions on the tiny model (stages run in-process, no
Prefect): v1 (4 steps), v2 (12 steps: better), v3 forced worse by params (lr 1e-6, one
step). dvc.lock is written with `dvc commit` so lineage can be checked against it.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from tuneops import stages
from tuneops.cli import main as cli

from tests.conftest import git_dvc_project

# ~3 min (three registered versions); champion vs a worse model is also in tests/test_stages.py
pytestmark = pytest.mark.slow

TRAIN_ON = ("train", "evaluate", "optimize", "register")


def _sh(cmd: list[str], cwd) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"


@pytest.fixture(scope="module")
def registry_project():
    from tuneops.config import load_config

    root = git_dvc_project("registry", ("optimize.targets=[]", "train.max_steps=4", "evaluate.generations=0",
                                        "evaluate.max_samples=8", "optimize.ppl_samples=4",
                                        "optimize.parity_samples=1"))
    params = root / "params.yaml"
    cfg = load_config(params)
    results = {}
    for spec in stages.STAGES[:-1]:
        spec.load()(cfg)
    _sh(["dvc", "commit", "-f", "-q", "ingest"], root)   # dvc.lock records the dataset md5s
    results["v1"] = stages.get("register").load()(cfg)
    for key, overrides in (("v2", ["train.max_steps=12"]),
                           ("v3", ["train.max_steps=1", "train.learning_rate=1e-6", "train.warmup_steps=0"])):
        cfg_n = load_config(params, overrides)
        for name in TRAIN_ON:
            out = stages.get(name).load()(cfg_n)
        results[key] = out
    return root, cfg, results


def _run_cli(capsys, root, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli(["--params", str(root / "params.yaml"), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_worse_model_forced_by_params_never_takes_champion(registry_project, capsys):
    root, cfg, r = registry_project
    assert r["v1"]["alias"] == "champion"
    assert r["v2"]["alias"] == "champion", r["v2"]["reason"]
    assert r["v3"]["alias"] == "challenger"
    assert "does not beat base" in r["v3"]["reason"] or "worse than the champion" in r["v3"]["reason"]
    code, out, _ = _run_cli(capsys, root, "models", "list", "--json")
    rows = {v["version"]: v for v in json.loads(out)}
    assert code == 0 and set(rows) == {1, 2, 3}
    assert rows[2]["aliases"] == ["champion"] and rows[3]["aliases"] == ["challenger"]
    # promotion only through the gate: the worse version is refused, nothing moves
    code, _, err = _run_cli(capsys, root, "models", "promote", "default@3")
    assert code == 1 and "not promoted" in err
    code, out, _ = _run_cli(capsys, root, "models", "list", "--json")
    assert {v["version"]: v["aliases"] for v in json.loads(out)}[2] == ["champion"]


def test_rollback_restores_the_previous_champion_and_promote_goes_through_the_gate(registry_project, capsys):
    root, cfg, r = registry_project
    code, out, _ = _run_cli(capsys, root, "models", "rollback")
    assert code == 0 and "champion is v1 again (was v2)" in out
    code, out, _ = _run_cli(capsys, root, "models", "show", "default@champion", "--json")
    shown = json.loads(out)
    assert shown["version"] == 1 and shown["aliases"] == ["champion"]
    code, out, _ = _run_cli(capsys, root, "models", "show", "default@2", "--json")
    assert "rolled_back" in json.loads(out)["tags"]
    # v2 still beats v1, so the gate lets it back in; the worse v3 stays out
    code, out, _ = _run_cli(capsys, root, "models", "promote", "default@2")
    assert code == 0 and "v2 is champion" in out
    code, _, err = _run_cli(capsys, root, "models", "promote", "default@challenger")
    assert code == 1
    code, out, _ = _run_cli(capsys, root, "models", "rollback")
    assert code == 0 and "champion is v1 again" in out
    code, _, err = _run_cli(capsys, root, "models", "rollback")
    assert code == 1 and "no earlier champion" in err


def test_model_card_per_version(registry_project, capsys):
    root, cfg, r = registry_project
    for key in ("v1", "v2", "v3"):
        code, out, _ = _run_cli(capsys, root, "models", "show", f"default@{r[key]['version']}")
        assert code == 0 and out.startswith(f"# test-registry v{r[key]['version']}")
        assert r[key]["tags"]["data.train.md5"] in out and "## ONNX variants" in out
    card = (cfg.path("register_dir") / "model_card.md").read_text()
    assert "**Alias at registration:** `challenger`" in card       # the last registration (v3)


def test_lineage_json_has_every_field_and_md5s_match_dvc_lock(registry_project):
    root, cfg, r = registry_project
    proc = subprocess.run(["tuneops", "lineage", "default@champion", "--json"], cwd=root, capture_output=True,
                          text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lineage = json.loads(proc.stdout)
    champion = lineage["model"]["version"]
    assert lineage["model"]["aliases"] == ["champion"]
    assert lineage["git_commit"] and lineage["params"]["hash"]
    assert lineage["params"]["values"]["train"]["max_steps"] == {1: 4, 2: 12}[champion]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["ingest"]["outs"]
    lock_md5 = {o["path"]: o["md5"] for o in lock}
    assert [d["path"] for d in lineage["datasets"]] == ["data/chat/train.jsonl", "data/chat/eval.jsonl"]
    for d in lineage["datasets"]:
        assert d["md5"] == lock_md5[d["path"]] == d["dvc_lock_md5"] and d["matches_dvc_lock"] is True
    v = lineage["validation"]
    assert v["success"] is True and v["counts"]["train"]["accepted"] > 0
    assert lineage["base_model"]["id"].startswith("tiny-gemma3") and len(lineage["base_model"]["hash"]) == 32
    assert lineage["plan"]["method"] == "lora" and lineage["plan"]["reasons"]
    assert lineage["metrics"]["eval_perplexity"] < lineage["metrics"]["eval_base_perplexity"]
    fp32 = lineage["onnx"]["variants"]["fp32"]
    assert fp32["accepted"] is True and "max abs logits diff" in fp32["gate"]
    assert "prefect_flow_run_id" in lineage           # None: these stages ran outside Prefect
    assert lineage["mlflow_run_id"] == {1: r["v1"], 2: r["v2"]}[champion]["mlflow_run_id"]
    human = subprocess.run(["tuneops", "lineage", "default@champion"], cwd=root, capture_output=True, text=True,
                           timeout=300, env=os.environ.copy())
    assert human.returncode == 0 and "matches dvc.lock" in human.stdout
