"""`tuneops data add PATH --format F`: validate, copy to data/user/, `dvc add`, point
params.yaml at it (comments kept); a bad file changes nothing; ingest then splits the
DVC-tracked file, and refuses it once it changed behind params' back."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess

import pytest
import yaml

from tuneops.config import ConfigError, load_config
from tuneops.io import md5_file, read_json

from tests.conftest import make_project


def _sh(cmd: list[str], cwd) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def repo(stage):
    stage("model")
    root = make_project("data-add")
    shutil.copytree(stage.cfg.path("base_model_dir"), load_config(root / "params.yaml").path("base_model_dir"))
    _sh(["git", "init", "-q"], root)
    _sh(["dvc", "init", "-q"], root)
    params = root / "params.yaml"
    params.write_text("# my project's params: keep this comment\n" + params.read_text())
    return root


def _add(root, path, fmt, capsys) -> tuple[int, list[str], str]:
    from tuneops.cli import main

    rc = main(["--params", str(root / "params.yaml"), "data", "add", str(path), "--format", fmt])
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


def test_bad_dataset_is_refused_and_nothing_changes(repo, capsys):
    bad = repo / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine", "label": "a"}) + "\n" + json.dumps({"text": "", "label": "b"}) + "\n")
    before = (repo / "params.yaml").read_bytes()
    rc, lines, err = _add(repo, bad, "classification", capsys)
    assert rc == 1
    assert f"{bad}:2: text: non_empty: text is empty or whitespace" in lines
    assert "nothing was added or changed" in err
    assert (repo / "params.yaml").read_bytes() == before and not (repo / "data" / "user").exists()


def test_add_versions_the_data_and_points_params_at_it(repo, capsys, stage, tokenizer, monkeypatch):
    src = repo / "support tickets.csv"
    with src.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(60):
            w.writerow([f"ticket {i}: my {'invoice' if i % 2 else 'password'} is wrong", "billing" if i % 2 else "auth"])
    rc, lines, err = _add(repo, src, "classification", capsys)
    assert rc == 0, (lines, err)
    summary = json.loads("\n".join(lines))
    dest = repo / "data" / "user" / "support-tickets.jsonl"
    assert summary["path"] == "data/user/support-tickets.jsonl" and summary["records"] == 60
    dvc_file = yaml.safe_load((repo / "data/user/support-tickets.jsonl.dvc").read_text())
    assert dvc_file["outs"][0]["md5"] == md5_file(dest) == summary["md5"]
    text = (repo / "params.yaml").read_text()
    assert text.startswith("# my project's params: keep this comment\n")
    cfg = load_config(repo / "params.yaml")
    assert (cfg.data.scenario, cfg.data.format) == ("user", "classification")
    assert (cfg.data.user.path, cfg.data.user.md5) == ("data/user/support-tickets.jsonl", md5_file(dest))

    # The pipeline's ingest splits the tracked file; validate passes it.
    from tasks import ingest, validate

    manifest = ingest.run(cfg)
    assert manifest["md5"] == md5_file(dest) and manifest["train_rows"] + manifest["eval_rows"] == 60
    monkeypatch.setattr(validate, "load_tokenizer", lambda _: tokenizer)
    validate.run(cfg)
    report = read_json(cfg.path("validation_dir") / "report.json")
    assert report["success"] and report["format"] == "classification" and report["counts"]["total"]["read"] == 60

    # Changed behind params' back: ingest refuses it with one line.
    with dest.open("a") as f:
        f.write(json.dumps({"text": "sneaky", "label": "auth"}) + "\n")
    with pytest.raises(ConfigError, match=r"^data.user.md5: data/user/support-tickets.jsonl has md5 \w+, params "
                                          r"record \w+: the file changed since `tuneops data add`"):
        ingest.run(cfg)


def test_add_outside_a_dvc_repo_changes_nothing(stage, capsys):
    root = make_project("data-add-nodvc")
    good = root / "g.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i} about things"}) + "\n" for i in range(10)))
    before = (root / "params.yaml").read_bytes()
    rc, _, err = _add(root, good, "text", capsys)
    assert rc == 2 and "is not a DVC repository (run `dvc init`); nothing was changed" in err
    assert (root / "params.yaml").read_bytes() == before and not (root / "data" / "user").exists()


def test_add_with_a_held_out_file(repo, capsys):
    """`data add PATH --eval EVAL_PATH`: both validated together (a leaked eval row is refused),
    both `dvc add`ed, params point at both; ingest then trains on all of PATH."""
    from tuneops.cli import main

    def chat(i: int) -> str:
        return json.dumps({"messages": [{"role": "user", "content": f"how do I reset account {i} today?"},
                                        {"role": "assistant", "content": f"open settings, then account {i}."}]})

    train, held = repo / "faq.jsonl", repo / "faq-eval.jsonl"
    train.write_text("".join(chat(i) + "\n" for i in range(30)))
    held.write_text("".join(chat(i) + "\n" for i in (3, *range(100, 110))))      # row 3 leaks from train
    args = ["--params", str(repo / "params.yaml"), "data", "add", str(train), "--format", "chat", "--eval", str(held)]
    before = (repo / "params.yaml").read_bytes()
    assert main(args) == 1 and "nothing was added or changed" in capsys.readouterr().err
    assert (repo / "params.yaml").read_bytes() == before

    held.write_text("".join(chat(i) + "\n" for i in range(100, 110)))
    assert main(args) == 0, capsys.readouterr()
    summary = json.loads(capsys.readouterr().out)
    assert summary["eval"]["path"] == "data/user/faq.eval.jsonl" and summary["eval"]["records"] == 10
    cfg = load_config(repo / "params.yaml")
    assert (cfg.data.user.path, cfg.data.user.eval_path) == ("data/user/faq.jsonl", "data/user/faq.eval.jsonl")
    assert cfg.data.user.eval_md5 == md5_file(repo / "data/user/faq.eval.jsonl") == md5_file(held)
    assert (repo / "data/user/faq.eval.jsonl.dvc").is_file()
    from tasks import ingest

    manifest = ingest.run(cfg)
    assert (manifest["train_rows"], manifest["eval_rows"]) == (30, 10)
