"""Stage `validate`: the data gate, before any compute is spent.

Reads the train/eval splits in ``data.format``, runs the record checks and the format's
Great Expectations suite (tuneops/data/gate.py), and writes to ``paths.validation_dir``:
``report.json`` (with the row ``counts``), ``report.txt``, ``rejects.jsonl`` (every
rejected row with its reasons) and ``data_docs/index.html`` (offline Data Docs).

Policy ``data.policy``: ``fail`` raises ``DataValidationError`` (one
``PATH:LINE: FIELD: RULE: message`` line per problem) on any problem; ``quarantine``
rejects bad rows and goes on with the rest, failing only on file/dataset problems or
when a split rejects more than ``data.max_rejected_fraction`` of its rows.

On success the accepted rows go to ``paths.clean_train_data`` / ``clean_eval_data`` as
chat records, which is what train, evaluate and optimize read (for the chat format with
nothing rejected: a byte-identical copy of the input). Classification and NER lines also
carry the native ``record`` (``{text, label}`` / ``{tokens, tags}``) for the task heads, and
the report lists the head's ``labels`` (``data.labels`` / BIO tags of ``data.entity_types``,
else the ones seen in train).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from tuneops import log
from tuneops.config import Config
from tuneops.data import formats
from tuneops.data.docs import render
from tuneops.data.gate import GateResult, Settings, SplitResult, validate_dataset
from tuneops.data.records import Problem
from tuneops.errors import DataValidationError  # noqa: F401  (raised here; re-exported for callers)
from tuneops.io import fresh_dir, md5_file, write_json, tmp_name
from tuneops.models import load_tokenizer
from tuneops.training import heads

def head_labels(fmt: str, train: SplitResult, labels: list[Any] | None,
                entity_types: list[str] | None) -> list[str] | None:
    """The label names the format's task head predicts, in a fixed order (``Head.label_names``:
    classification ``data.labels``, else the sorted labels seen in train; NER ``O`` then
    ``B-``/``I-`` of each entity type). None for formats that train the causal LM."""
    head = heads.for_format(fmt)
    return None if head.generative else head.label_names([r.obj for r in train.accepted], labels, entity_types)


def write_clean(split: SplitResult, fmt: str, dest: Path) -> Path:
    """The accepted rows as chat JSONL (the chat format: the accepted lines verbatim)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest)
    if fmt == "chat" and split.kind == "jsonl" and not split.rejected and len(split.accepted) == split.rows:
        shutil.copyfile(split.path, tmp)
    else:
        spec, head = formats.get(fmt), heads.for_format(fmt)
        with tmp.open("wb") as f:
            for row in split.accepted:
                if fmt == "chat" and split.kind == "jsonl":
                    f.write(row.raw + b"\n")
                else:
                    line: dict[str, Any] = {"messages": spec.to_chat(row.obj)}
                    if spec.tools(row.obj):             # tool rows (chat from Parquet): the functions they call
                        line["tools"] = spec.tools(row.obj)
                    if head.record_fields:      # the task heads train on the record itself
                        line["record"] = {k: row.obj[k] for k in head.record_fields}
                    if spec.canonical is not None:      # preference: the pair (OpenAI DPO form) the pair objectives read
                        line["pair"] = spec.canonical(row.obj)
                    f.write(json.dumps(line, ensure_ascii=False).encode() + b"\n")
    os.replace(tmp, dest)
    return dest


def write_rejects(result: GateResult, dest: Path) -> int:
    """Every rejected row, with its reasons and the record (or the raw line when unreadable)."""
    n = 0
    with dest.open("w", encoding="utf-8", newline="\n") as f:
        for name, split in result.splits.items():
            for line in sorted(split.rejected):
                row = split.rejected_rows.get(line)
                entry: dict[str, Any] = {
                    "split": name, "path": split.path, "line": line,
                    "reasons": [{"field": q.field, "rule": q.rule, "message": q.message} for q in split.rejected[line]],
                    "record": row.obj if row is not None else None,
                }
                if entry["record"] is None:
                    entry["raw"] = row.raw.decode("utf-8", "replace") if row is not None else None
                f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
                n += 1
    return n


def build_report(result: GateResult, cfg: Config | None = None) -> dict[str, Any]:
    s = result.settings
    problems = result.problems
    total = sum(len(sp.all_problems) for sp in result.splits.values())
    return {
        "success": result.success,
        "format": s.format,
        "scenario": cfg.data.scenario if cfg is not None else None,
        "policy": s.policy,
        "max_seq_len": s.max_seq_len,
        "train_tokens": result.splits["train"].tokens if "train" in result.splits else 0,
        "counts": result.counts(),
        "suites": result.suite,
        "splits": {n: {"path": sp.path, "md5": md5_file(Path(sp.path)) if Path(sp.path).is_file() else None,
                       "rows": sp.rows, "valid_rows": len(sp.accepted), "rejected_rows": len(sp.rejected),
                       "tokens": sp.tokens, "expectations": sp.expectations}
                   for n, sp in result.splits.items()},
        "problems": [str(p) for p in problems],
        "problem_count": total,
    }


def run(cfg: Config) -> dict[str, Any]:
    settings = Settings.from_config(cfg)
    tokenizer = load_tokenizer(cfg.path("base_model_dir"))
    with log.step("validate: record checks + Great Expectations suite"):
        result = validate_dataset({"train": cfg.path("train_data"), "eval": cfg.path("eval_data")}, tokenizer,
                                  settings)
    out = fresh_dir(cfg.path("validation_dir"))
    report = build_report(result, cfg)
    rejected = sum(len(sp.rejected) for sp in result.splits.values())
    report["rejects"] = "rejects.jsonl" if rejected else None
    if rejected:
        write_rejects(result, out / "rejects.jsonl")
    clean = {"train": cfg.path("clean_train_data"), "eval": cfg.path("clean_eval_data")}
    for name, dest in clean.items():
        dest.unlink(missing_ok=True)          # never leave a stale clean split behind a failed gate
        if result.success:
            write_clean(result.splits[name], settings.format, dest)
            report["splits"][name].update(clean_path=str(dest), clean_md5=md5_file(dest))
    if result.success and not heads.for_format(settings.format).generative:
        report["labels"] = head_labels(settings.format, result.splits["train"], cfg.data.labels,
                                       cfg.data.entity_types)
    report["data_docs"] = "data_docs/index.html"
    write_json(out / "report.json", report)
    (out / "data_docs").mkdir()
    (out / "data_docs" / "index.html").write_text(render(report), encoding="utf-8")
    (out / "report.txt").write_text("\n".join(report["problems"]) + "\n" if report["problems"] else "OK\n",
                                    encoding="utf-8")
    if not result.success:
        shown = result.problems
        if settings.policy == "quarantine":          # the reasons the run stops first, then the rejected rows
            shown = result.fatal + [q for q in shown if q not in result.fatal]
        raise DataValidationError(shown, str(out / "report.txt"))
    return {"validation_dir": str(out), "train_rows": len(result.splits["train"].accepted),
            "eval_rows": len(result.splits["eval"].accepted), "rejected_rows": rejected,
            "clean_train_data": str(clean["train"]), "clean_eval_data": str(clean["eval"])}
