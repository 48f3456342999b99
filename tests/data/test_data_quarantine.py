"""Policy: `fail` stops on any bad row; `quarantine` sends bad rows (with their reasons)
to rejects.jsonl and trains on the good ones; counts add up; offline Data Docs."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tuneops.config import load_config
from tuneops.io import md5_file, read_json, read_jsonl, write_jsonl

from tests.conftest import make_project

BAD = {
    11: "{\"messages\": [{\"role\": \"user\", \"content\": \"cut",                                    # json
    22: json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),                         # assistant_turn
    33: json.dumps({"messages": [{"role": "user", "content": "x " * 400},
                                 {"role": "assistant", "content": "ok"}]}),                          # max_seq_len
}


def _project(stage, name: str, *overrides: str):
    good = read_jsonl(stage("ingest")["train_data"])          # 90 rows (tiny project); runs the model stage
    root = make_project(name, ("train.max_steps=2", *overrides))
    cfg = load_config(root / "params.yaml")
    shutil.copytree(stage.cfg.path("base_model_dir"), cfg.path("base_model_dir"))
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    for no in sorted(BAD):
        lines.insert(no - 1, BAD[no])
    lines.insert(43, lines[0])                                                                       # 44: duplicate
    cfg.path("train_data").parent.mkdir(parents=True, exist_ok=True)
    cfg.path("train_data").write_text("\n".join(lines) + "\n", encoding="utf-8")
    eval_rows = read_jsonl(stage.cfg.path("eval_data")) + [good[5]]                              # 11: leakage
    write_jsonl(cfg.path("eval_data"), eval_rows)
    return cfg, good


@pytest.fixture(scope="module")
def quarantined(stage):
    from tasks.validate import run

    cfg, good = _project(stage, "quarantine", "data.policy=quarantine", "data.max_rejected_fraction=0.1")
    return cfg, good, run(cfg)


def test_quarantine_counts_add_up_and_rejects_have_reasons(quarantined):
    cfg, good, out = quarantined
    report = read_json(cfg.path("validation_dir") / "report.json")
    assert report["success"] and report["policy"] == "quarantine"
    c = report["counts"]
    assert c["train"] == {"read": 94, "accepted": 90, "rejected": 4,
                          "rejected_by_rule": {"assistant_turn": 1, "duplicate": 1, "json": 1, "max_seq_len": 1}}
    assert c["eval"] == {"read": 11, "accepted": 10, "rejected": 1, "rejected_by_rule": {"leakage": 1}}
    for split in ("train", "eval", "total"):
        assert c[split]["read"] == c[split]["accepted"] + c[split]["rejected"]
        assert sum(c[split]["rejected_by_rule"].values()) == c[split]["rejected"]
    rejects = read_jsonl(cfg.path("validation_dir") / "rejects.jsonl")
    assert [(r["split"], r["line"], [x["rule"] for x in r["reasons"]]) for r in rejects] == [
        ("train", 11, ["json"]), ("train", 22, ["assistant_turn"]), ("train", 33, ["max_seq_len"]),
        ("train", 44, ["duplicate"]), ("eval", 11, ["leakage"])]
    assert rejects[0]["record"] is None and rejects[0]["raw"] == BAD[11]
    assert rejects[1]["record"] == json.loads(BAD[22])
    assert rejects[3]["reasons"][0]["message"] == "same record as line 1 (validate.max_duplicate_fraction 0.0)"
    train_path = cfg.path("train_data")
    assert rejects[4]["reasons"][0]["message"] == f"same record as {train_path}:6 (train/eval leakage)"
    # The clean split is exactly the accepted rows, in order.
    assert read_jsonl(cfg.path("clean_train_data")) == good
    assert len(read_jsonl(cfg.path("clean_eval_data"))) == 10
    assert out["rejected_rows"] == 5 and report["rejects"] == "rejects.jsonl"


def test_data_docs_are_offline_html(quarantined):
    cfg, _, _ = quarantined
    page = (cfg.path("validation_dir") / "data_docs" / "index.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "PASSED" in page
    assert "expect_column_values_to_be_between" in page and "max_seq_len" in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page and "<script" not in page and "<link" not in page


def test_train_reads_only_the_accepted_rows(quarantined):
    """select + train on the quarantined project: the MLflow run records the md5 of the
    clean split (the accepted rows), not of the raw file with its bad lines."""
    import mlflow

    from tasks import select, train
    from tuneops.registry import tracking

    cfg, _, _ = quarantined
    select.run(cfg)
    out = train.run(cfg)
    tracking.setup(cfg)
    params = mlflow.MlflowClient().get_run(out["mlflow_run_id"]).data.params
    assert params["data.train.md5"] == md5_file(cfg.path("clean_train_data"))
    assert params["data.train.md5"] != md5_file(cfg.path("train_data"))
    assert out["steps"] == 2


def test_fail_policy_stops_on_the_same_data(stage):
    from tasks.validate import DataValidationError, run

    cfg, _ = _project(stage, "quarantine-fail", "data.policy=fail")
    with pytest.raises(DataValidationError) as err:
        run(cfg)
    lines = [str(p) for p in err.value.problems]
    t, e = cfg.path("train_data"), cfg.path("eval_data")
    assert [ln.split(": ")[0] + ": " + ln.split(": ")[2] for ln in lines] == [
        f"{t}:11: json", f"{t}:22: assistant_turn", f"{t}:33: max_seq_len", f"{t}:44: duplicate", f"{e}:11: leakage"]
    assert not cfg.path("clean_train_data").exists() and not cfg.path("clean_eval_data").exists()
    report = read_json(cfg.path("validation_dir") / "report.json")
    assert report["success"] is False and report["counts"]["total"]["rejected"] == 5
    assert "FAILED" in (cfg.path("validation_dir") / "data_docs" / "index.html").read_text()


def test_quarantine_fails_when_too_many_rows_are_rejected(stage):
    from tasks.validate import DataValidationError, run

    cfg, _ = _project(stage, "quarantine-over", "data.policy=quarantine", "data.max_rejected_fraction=0.01")
    with pytest.raises(DataValidationError) as err:
        run(cfg)
    lines = [str(p) for p in err.value.problems]
    assert lines[:2] == [
        f"{cfg.path('train_data')}:0: (dataset): max_rejected_fraction: 4 of 94 rows rejected (4.3%) > 1.0% "
        "(data.max_rejected_fraction)",
        f"{cfg.path('eval_data')}:0: (dataset): max_rejected_fraction: 1 of 11 rows rejected (9.1%) > 1.0% "
        "(data.max_rejected_fraction)"]
    assert not cfg.path("clean_train_data").exists()


def test_fail_mode_clean_split_is_a_byte_identical_copy(stage, tiny_cfg):
    stage("validate")
    assert md5_file(tiny_cfg.path("clean_train_data")) == md5_file(tiny_cfg.path("train_data"))
    assert md5_file(tiny_cfg.path("clean_eval_data")) == md5_file(tiny_cfg.path("eval_data"))
    report = read_json(tiny_cfg.path("validation_dir") / "report.json")
    assert report["counts"]["total"]["rejected"] == 0 and report["suites"]["chat"]["version"] == 2
