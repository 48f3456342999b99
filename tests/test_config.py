"""params.yaml -> typed config: overrides, and one clear error line naming the key."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tuneops.config import ConfigError, apply_overrides, load_config

from tests.conftest import REPO, make_project


def test_repo_params_validate_and_resolve_paths():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.train.learning_rate > 0
    assert cfg.validate.min_rows >= 1 and cfg.register.model_name
    assert cfg.path("train_data") == REPO / "data" / "chat" / "train.jsonl"


def test_set_overrides_parse_yaml_values():
    cfg = load_config(REPO / "params.yaml", ["train.max_steps=7", "select.lora.target_modules=[q_proj]",
                                             "ingest.max_conversations=null"])
    assert cfg.train.max_steps == 7
    assert cfg.select.lora.target_modules == ["q_proj"]
    assert cfg.ingest.max_conversations is None


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=-0.1", "train.learning_rate"),
    ("select.method=magic", "select.method"),
    ("model.max_seq_len=0", "model.max_seq_len"),
    ("evaluate.batch_size=two", "evaluate.batch_size"),
])
def test_invalid_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", [override])
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and f": {key}: " in msg and msg.startswith(str(REPO / "params.yaml"))


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="unknown key train.lr"):
        apply_overrides({"train": {"learning_rate": 1}}, ["train.lr=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_unknown_key_in_file_is_named(tmp_path: Path):
    text = (REPO / "params.yaml").read_text().replace("  max_steps:", "  max_stepz: 3\n  max_steps:")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"train\.max_stepz: unknown key"):
        load_config(tmp_path / "params.yaml")


def _tuneops(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneops", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_invalid_params_fail_before_any_work():
    root = make_project("bad-params")
    for args, key in ((["train", "--set", "train.learning_rate=-1"], "train.learning_rate"),
                      (["--set", "select.method=magic", "run"], "select.method")):
        proc = _tuneops(*args, cwd=root)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tuneops: error:") and f": {key}: " in lines[0]
    assert not (root / "artifacts").exists() and not (root / ".tuneops").exists()


def test_late_stage_params_fail_before_the_first_stage():
    """An unknown ONNX variant (optimize) stops `run` and the first DVC stage (`model`) before any
    work, naming the params file, the key's line and the key; `--set` is named as the source."""
    from tuneops.preflight import key_line

    root = make_project("bad-variant")
    params = root / "params.yaml"
    params.write_text(params.read_text().replace("  extra_variants: []", "  extra_variants: [int3]"))
    line = key_line(params, "optimize.extra_variants")
    assert line and params.read_text().splitlines()[line - 1].lstrip().startswith("extra_variants:")
    for args, prefix in ((["run"], f"params.yaml:{line}: optimize.extra_variants: "),
                         (["model"], f"params.yaml:{line}: optimize.extra_variants: "),
                         (["--set", "optimize.extra_variants=[int3]", "train"], "--set optimize.extra_variants: ")):
        proc = _tuneops(*args, cwd=root)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and prefix in lines[0] and "unknown ONNX variant 'int3'" in lines[0], lines
    params.write_text(params.read_text().replace("extra_variants: [int3]", "extra_variants: [int4_rtn]")
                      .replace("    int4_rtn:", "    int4_rtx:"))
    proc = _tuneops("run", cwd=root)
    assert proc.returncode == 2 and "optimize.max_ppl_change_pct" in proc.stderr, proc.stderr
    assert not (root / "artifacts").exists() and not (root / "models").exists()


def test_help_lists_every_stage():
    from tuneops.stages import STAGE_NAMES

    proc = _tuneops("--help", cwd=REPO)
    assert proc.returncode == 0
    for name in STAGE_NAMES + ("run", "plan"):
        assert f"\n    {name} " in proc.stdout
