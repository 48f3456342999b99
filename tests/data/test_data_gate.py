"""The validate stage stops bad data before compute, naming file, line, field and rule."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tuneops.config import load_config
from tuneops.io import read_jsonl, write_jsonl

from tests.conftest import make_project

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture(scope="module")
def bad_project(stage):
    """A project sharing the tiny base model, with a broken train split."""
    root = make_project("bad-data")
    cfg = load_config(root / "params.yaml")
    rows = read_jsonl(stage("ingest")["train_data"])[:30]     # runs the model stage first
    shutil.copytree(stage.cfg.path("base_model_dir"), cfg.path("base_model_dir"))
    write_jsonl(cfg.path("eval_data"), read_jsonl(stage.cfg.path("eval_data")))
    write_jsonl(cfg.path("train_data"), rows)
    with cfg.path("train_data").open("a", encoding="utf-8") as f:
        f.write('{"messages": [{"role": "user", "content": "no reply"}]}\n')              # line 31
        f.write('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"\n')  # line 32
        f.write(json.dumps({"messages": [{"role": "user", "content": "x " * 400},
                                         {"role": "assistant", "content": "ok"}]}) + "\n")  # line 33
        f.write(json.dumps({"messages": [{"role": "bot", "content": "?"}, GOOD["messages"][1]]}) + "\n")  # 34
    return root, cfg


def test_each_bad_line_is_reported_with_its_rule(bad_project):
    from tasks.validate import DataValidationError, run

    root, cfg = bad_project
    with pytest.raises(DataValidationError) as err:
        run(cfg)
    lines = [str(p) for p in err.value.problems]
    path = str(cfg.path("train_data"))
    assert f"{path}:31: messages: assistant_turn: needs at least one assistant turn with non-empty content or tool calls" in lines
    assert any(line.startswith(f"{path}:32: (line): json: invalid JSON") for line in lines)
    assert any(line.startswith(f"{path}:33: messages: max_seq_len: ")
               and "tokens > max_seq_len 256 (model tokenizer)" in line for line in lines)
    assert f"{path}:34: messages[0].role: enum: role must be one of system, user, assistant, tool, function (got 'bot')" in lines
    assert len(lines) == 4, lines
    report = json.loads((cfg.path("validation_dir") / "report.json").read_text())
    assert report["success"] is False and len(report["problems"]) == 4


def test_cli_exits_1_with_problem_lines_and_no_traceback(bad_project):
    root, cfg = bad_project
    proc = subprocess.run([sys.executable, "-m", "tuneops", "validate"], cwd=root, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"{cfg.path('train_data')}:31: messages: assistant_turn" in proc.stderr


def test_empty_and_undecodable_files_are_problems_not_crashes(tmp_path, tokenizer):
    from tuneops.data.gate import validate_split

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\xff\xfe\x00garbage\n")
    r = validate_split(empty, tokenizer, 256, 1, 0.5)
    assert [str(p) for p in r.problems] == [f"{empty}:1: (file): non_empty: no records (file is empty or blank)"]
    r = validate_split(binary, tokenizer, 256, 1, 0.5)
    assert [str(p) for p in r.problems] == [f"{binary}:2: (line): utf8: invalid UTF-8 at byte 0"]
    assert len(r.records) == 1  # BOM + CRLF line accepted
