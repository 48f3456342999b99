"""The data commands behind ``tuneops validate DATA... --format F`` and
``tuneops data add PATH --format F`` (tuneops/cli.py parses the arguments).

``validate``: exit 0 when the data passes the gate under ``data.policy``; exit 1 with one
``PATH:LINE: FIELD: RULE: message`` line per problem on stdout; never a traceback (an
unexpected error is one ``tuneops: error:`` line, exit 2).

``data add``: validate, then copy the file to ``data/user/<name>.jsonl`` (CSV/Parquet
converted to JSONL; with ``--eval EVAL_PATH`` also ``<name>.eval.jsonl``), ``dvc add`` it and
point params.yaml at it (``data.scenario: user``, ``data.format``, ``data.user.path`` /
``md5`` and ``eval_path`` / ``eval_md5``; comments kept). On any failure nothing is changed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, load_config
from . import FORMATS

EXIT_OK, EXIT_INVALID_DATA, EXIT_ERROR = 0, 1, 2


_TOKENIZERS: dict[tuple[str, Any], Any] = {}


def resolve_tokenizer(cfg: Config) -> Any:
    """The model's own tokenizer: from the prepared base model, else (Gemma sources, which
    share one tokenizer) the cached Gemma tokenizer, converted once from the GGUF, or the
    cached SmolLM2 folder's.
    Loaded once per process and folder version."""
    from ..models import load_tokenizer, source

    base = cfg.path("base_model_dir")
    if (base / "tokenizer_config.json").is_file():
        key = (str(base), (base / "tokenizer_config.json").stat().st_mtime_ns)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = load_tokenizer(base)
        return _TOKENIZERS[key]
    src = source(cfg.model.source)
    if src.tokenizer is not None:      # from the cache: the Gemma tokenizer, or the converted SmolLM2 folder's (once)
        from ..env import state_paths

        cache = state_paths(cfg.state_dir)["cache"]
        key = (str(cache), src.name)
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = src.tokenizer(cache)
        return _TOKENIZERS[key]
    raise ConfigError(f"no tokenizer at {base}: run `tuneops model` first (model.source is {cfg.model.source!r})")


def _gate(cfg: Config, paths: dict[str, str], fmt: str | None) -> Any:
    from .gate import LazyTokenizer, Settings, validate_dataset

    return validate_dataset(paths, LazyTokenizer(lambda: resolve_tokenizer(cfg)), Settings.from_config(cfg, fmt=fmt))


def _print_problems(result: Any) -> None:
    for p in result.problems:
        print(p)


def validate_command(cfg: Config, data: list[str], fmt: str | None) -> int:
    """Validate one file (or TRAIN EVAL: also train/eval leakage)."""
    if len(data) > 2:
        print("tuneops: error: validate takes DATA or TRAIN EVAL", file=sys.stderr)
        return EXIT_ERROR
    fmt = fmt or cfg.data.resolved_format
    try:
        result = _gate(cfg, dict(zip(("train", "eval"), data)), fmt)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile file must never produce a traceback
        print(f"tuneops: error: validation stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    _print_problems(result)
    counts = result.counts()["total"]
    policy = result.settings.policy
    if result.success:
        extra = f", {counts['rejected']} would be rejected (policy quarantine)" if counts["rejected"] else ""
        print(f"tuneops: OK: {counts['read']} records, format {fmt}{extra}", file=sys.stderr)
        return EXIT_OK
    print(f"tuneops: {len(result.problems)} problems (format {fmt}, policy {policy}); "
          f"{counts['rejected']} of {counts['read']} records rejected", file=sys.stderr)
    return EXIT_INVALID_DATA


# -- data add ------------------------------------------------------------------------------------

def _dataset_name(path: Path, name: str | None) -> str:
    stem = name or path.name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "dataset"
    return stem


def _write_jsonl(result: Any, dest: Path, split_name: str = "train") -> tuple[int, int]:
    """Copy a JSONL file as is; convert CSV/Parquet records (unreadable rows are counted)."""
    split = result.splits[split_name]
    tmp = dest.with_name(dest.name + ".tmp")
    if split.kind == "jsonl":
        shutil.copyfile(split.path, tmp)
        os.replace(tmp, dest)
        return split.rows, 0
    from .records import read_records

    read = read_records(split.path, result.settings.max_record_bytes)
    n = skipped = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for row in read.rows:
            if row.obj is None:
                skipped += 1
                continue
            f.write(json.dumps(row.obj, ensure_ascii=False, default=str) + "\n")
            n += 1
    os.replace(tmp, dest)
    return n, skipped


def _update_params(params_file: Path, values: dict[str, Any]) -> None:
    """Set dotted keys in params.yaml, keeping its comments and layout (ruamel.yaml)."""
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = yaml.load(params_file.read_text(encoding="utf-8"))
    for key, value in values.items():
        node = doc
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    tmp = params_file.with_name(params_file.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        yaml.dump(doc, f)
    os.replace(tmp, params_file)


def add_command(cfg: Config, src: str, fmt: str, name: str | None = None, eval_src: str | None = None) -> int:
    """``data add PATH [--eval EVAL_PATH]``: with ``--eval`` the held-out file is validated with
    PATH (leakage included), added the same way and set as ``data.user.eval_path``; without it
    ``eval_fraction`` of PATH is held out."""
    if fmt not in FORMATS:
        print(f"tuneops: error: --format must be one of {', '.join(FORMATS)}", file=sys.stderr)
        return EXIT_ERROR
    src_path = Path(src)
    inputs = {"train": src, **({"eval": eval_src} if eval_src else {})}
    try:
        result = _gate(cfg, inputs, fmt)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        print(f"tuneops: error: validation stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if not result.success:
        _print_problems(result)
        print(f"tuneops: {' and '.join(inputs.values())} failed validation (format {fmt}, policy "
              f"{result.settings.policy}); nothing was added or changed", file=sys.stderr)
        return EXIT_INVALID_DATA
    root = cfg.root
    if not (root / ".dvc").is_dir():
        print(f"tuneops: error: {root} is not a DVC repository (run `dvc init`); nothing was changed", file=sys.stderr)
        return EXIT_ERROR
    stem = _dataset_name(src_path, name)
    dests = {"train": root / "data" / "user" / f"{stem}.jsonl"}
    if eval_src:
        dests["eval"] = root / "data" / "user" / f"{stem}.eval.jsonl"
    rels = {k: d.relative_to(root).as_posix() for k, d in dests.items()}
    params_file = Path(cfg.source).resolve()
    touched = [p for d in dests.values() for p in (d, d.with_name(d.name + ".dvc"))]
    backups = {p: p.read_bytes() for p in (*touched, params_file) if p.is_file()}
    created = [p for p in touched if not p.exists()]
    rows: dict[str, int] = {}
    skipped: dict[str, int] = {}
    md5s: dict[str, str] = {}
    try:
        for split, dest in dests.items():
            dest.parent.mkdir(parents=True, exist_ok=True)
            same = Path(inputs[split]).resolve() == dest.resolve()
            rows[split], skipped[split] = (result.splits[split].rows, 0) if same else _write_jsonl(result, dest, split)
        proc = subprocess.run([sys.executable, "-m", "dvc", "add", "-q", *rels.values()], cwd=root,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc add {' '.join(rels.values())} failed: "
                               f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        import yaml

        for split, dest in dests.items():
            md5s[split] = yaml.safe_load(dest.with_name(dest.name + ".dvc").read_text())["outs"][0]["md5"]
        values = {"data.scenario": "user", "data.format": fmt, "data.user.path": rels["train"],
                  "data.user.md5": md5s["train"], "data.user.eval_path": rels.get("eval"),
                  "data.user.eval_md5": md5s.get("eval")}
        _update_params(params_file, values)
        load_config(params_file)                      # the updated params must still validate
    except Exception as exc:  # noqa: BLE001 - undo, then one line
        for path, data in backups.items():
            path.write_bytes(data)
        for path in created:
            path.unlink(missing_ok=True)
        print(f"tuneops: error: data add: {exc}; nothing was changed", file=sys.stderr)
        return EXIT_ERROR
    summary = {"path": rels["train"], "md5": md5s["train"], "format": fmt, "records": rows["train"],
               "dvc_file": f"{rels['train']}.dvc", "params": values,
               "rows_to_be_rejected": result.counts()["total"]["rejected"]}
    if eval_src:
        summary["eval"] = {"path": rels["eval"], "md5": md5s["eval"], "records": rows["eval"],
                           "dvc_file": f"{rels['eval']}.dvc"}
    if any(skipped.values()):
        summary["unreadable_rows_not_converted"] = sum(skipped.values())
    print(json.dumps(summary, indent=2))
    files = " and ".join(f"{r}.dvc" for r in rels.values())
    print(f"tuneops: added {' + '.join(rels.values())} ({' + '.join(str(n) for n in rows.values())} records); "
          f"commit {files} and {params_file.name}, then `dvc repro`", file=sys.stderr)
    return EXIT_OK
