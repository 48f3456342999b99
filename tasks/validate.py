"""Stage `validate`: the data gate. Writes a report; raises ``DataValidationError``
(one ``PATH:LINE: FIELD: RULE: message`` line per problem) before any compute is spent."""
from __future__ import annotations

from typing import Any

from tuneops.config import Config
from tuneops.data.gate import validate_split
from tuneops.data.records import Problem
from tuneops.io import fresh_dir, write_json
from tuneops.models import load_tokenizer


class DataValidationError(Exception):
    def __init__(self, problems: list[Problem], report: str):
        self.problems = problems
        self.report = report
        shown = "\n".join(str(p) for p in problems[:50])
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"data validation failed ({len(problems)} problems; report: {report})\n{shown}{more}")


def _leakage(train: Any, eval_: Any) -> list[Problem]:
    seen = {repr(r["messages"]) for r in train.records}
    return [Problem(eval_.path, 0, "messages", "leakage", f"{n} eval conversations also occur in {train.path}")
            for n in [sum(repr(r["messages"]) in seen for r in eval_.records)] if n]


def run(cfg: Config) -> dict[str, Any]:
    v = cfg.validate
    tokenizer = load_tokenizer(cfg.path("base_model_dir"))
    splits = {name: validate_split(cfg.path(key), tokenizer, cfg.model.max_seq_len, v.min_rows,
                                   v.max_duplicate_fraction)
              for name, key in (("train", "train_data"), ("eval", "eval_data"))}
    problems = [p for s in splits.values() for p in s.problems] + _leakage(splits["train"], splits["eval"])
    out = fresh_dir(cfg.path("validation_dir"))
    report = {
        "success": not problems,
        "max_seq_len": cfg.model.max_seq_len,
        "train_tokens": splits["train"].tokens,
        "splits": {n: {"path": s.path, "rows": s.rows, "valid_rows": len(s.records), "tokens": s.tokens,
                       "expectations": s.expectations} for n, s in splits.items()},
        "problems": [str(p) for p in problems],
    }
    write_json(out / "report.json", report)
    (out / "report.txt").write_text("\n".join(report["problems"]) + "\n" if problems else "OK\n", encoding="utf-8")
    if problems:
        raise DataValidationError(problems, str(out / "report.txt"))
    return {"validation_dir": str(out), "train_rows": len(splits["train"].records),
            "eval_rows": len(splits["eval"].records)}
