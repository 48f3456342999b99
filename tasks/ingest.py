"""Stage `ingest`: materialize the dataset that ``data.scenario`` selects, with a
fixed-seed train/eval split: a bundled scenario built offline from installed packages
(tuneops/data/scenarios.py), or ``user``: the DVC-tracked file that ``tuneops data add``
recorded in params (its md5 must still match)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneops.config import Config, ConfigError
from tuneops.data import scenarios
from tuneops.io import md5_file, write_json, write_jsonl, tmp_name


class IngestError(ConfigError):
    """The data that params point at is missing or changed (one ``tuneops: error:`` line)."""


def _write_lines(path: Path, lines: list[bytes]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with tmp.open("wb") as f:
        for line in lines:
            f.write(line + b"\n")
    os.replace(tmp, path)
    return len(lines)


def _checked(cfg: Config, rel: str, expected: str | None, path_key: str, md5_key: str) -> Path:
    """The user's file at ``rel``, which must still have the md5 params record."""
    src = (cfg.root / rel).resolve()
    if not src.is_file():
        raise IngestError(f"data.user.{path_key}: {src} not found (run `dvc pull` or `tuneops data add` again)")
    md5 = md5_file(src)
    if md5 != expected:
        raise IngestError(f"data.user.{md5_key}: {rel} has md5 {md5}, params record {expected}: the file "
                          f"changed since `tuneops data add`; run it again to validate and version the new data")
    return src


def _user(cfg: Config) -> dict[str, Any]:
    d, p = cfg.data, cfg.ingest
    src = _checked(cfg, d.user.path, d.user.md5, "path", "md5")
    md5 = d.user.md5
    extra: dict[str, Any] = {}
    if d.user.eval_path:     # a held-out file of its own: all of `path` trains
        eval_src = _checked(cfg, d.user.eval_path, d.user.eval_md5, "eval_path", "eval_md5")
        train, counts = scenarios.read_user_file(src)
        train = train[:p.max_conversations] if p.max_conversations else train
        eval_, eval_counts = scenarios.read_user_file(eval_src)
        extra = {"eval_source": d.user.eval_path, "eval_md5": d.user.eval_md5,
                 **{f"eval_{k}": v for k, v in eval_counts.items()}}
    else:
        train, eval_, counts = scenarios.split_user_file(src, p.eval_fraction, p.seed, p.max_conversations)
    return {"source": d.user.path, "license": "user data", "scenario": "user", "format": d.format, "md5": md5,
            **counts, **extra, "train_rows": _write_lines(cfg.path("train_data"), train),
            "eval_rows": _write_lines(cfg.path("eval_data"), eval_)}


def run(cfg: Config) -> dict[str, Any]:
    if cfg.data.scenario == "user":
        manifest = _user(cfg)
    else:
        train, eval_, manifest = scenarios.build(cfg.data.scenario, cfg.ingest)
        manifest.update(train_rows=write_jsonl(cfg.path("train_data"), train),
                        eval_rows=write_jsonl(cfg.path("eval_data"), eval_))
    write_json(cfg.path("ingest_manifest"), manifest)
    return {"train_data": str(cfg.path("train_data")), "eval_data": str(cfg.path("eval_data")), **manifest}
