"""The same stages under `dvc repro`: full run, no-op rerun, and a params change that
reruns only `train` and what follows."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest
import yaml

from tuneops import stages
from tuneops.io import md5_file, read_json

from .conftest import REPO, make_project


def _run(cmd: list[str], cwd) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=1500, env=os.environ.copy())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


@pytest.mark.slow   # ~4 min of CLI processes (CI time); dvc.yaml vs the stages is checked in test_pipeline_definition
def test_dvc_repro_reproduces_and_reruns_only_what_changed():
    root = make_project("dvc", ("train.max_steps=4", "evaluate.max_samples=8", "evaluate.generations=0",
                                "optimize.ppl_samples=4", "optimize.parity_samples=1"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    _run(["git", "init", "-q"], root)
    _run(["dvc", "init", "-q"], root)

    first = _run(["dvc", "repro"], root)
    assert _ran(first) == list(stages.STAGE_NAMES)
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    train_md5 = next(o["md5"] for o in lock["ingest"]["outs"] if o["path"] == "data/chat/train.jsonl")
    assert train_md5 == md5_file(root / "data/chat/train.jsonl")
    registration = read_json(root / "artifacts/register/registration.json")
    assert registration["tags"]["dvc.lock.train.md5"] == train_md5

    t0 = time.perf_counter()
    second = _run(["dvc", "repro"], root)
    print(f"no-op dvc repro: {time.perf_counter() - t0:.2f}s")
    assert _ran(second) == []
    assert "up to date" in _run(["dvc", "status"], root)

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"]["max_steps"] += 1
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], root)
    assert _ran(third) == ["train", "evaluate", "optimize", "register"]
