"""The data gate: record-level checks, then a Great Expectations suite over the
dataset's per-record features (row count, turn structure, token length vs
``max_seq_len`` with the model's own tokenizer, duplicates).

Failing rows are reported with their file and line; GX failures name the
expectation and, via the feature table, the offending lines.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import Problem, check_chat, parse_jsonl


@dataclass
class SplitResult:
    path: str
    rows: int
    records: list[dict[str, Any]]
    tokens: int = 0
    problems: list[Problem] = field(default_factory=list)
    expectations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def features(records: list[tuple[int, dict[str, Any]]], tokenizer: Any) -> "Any":
    """One row per record: the columns the GX suite checks."""
    import pandas as pd

    from ..chat import render, token_lengths

    convs = [r["messages"] for _, r in records]
    return pd.DataFrame({
        "line": [no for no, _ in records],
        "n_messages": [len(c) for c in convs],
        "n_assistant": [sum(m["role"] == "assistant" for m in c) for c in convs],
        "min_content_chars": [min(len(m["content"].strip()) for m in c) for c in convs],
        "token_len": token_lengths(convs, tokenizer),
        "text": [render(c, bos="") for c in convs],
    })


# Per-record feature columns: the field and rule a failing row is reported under.
ROW_RULES = {"token_len": ("messages", "max_seq_len"), "n_assistant": ("messages", "assistant_turn"),
             "min_content_chars": ("messages[].content", "non_empty")}


def chat_suite(max_seq_len: int, min_rows: int, max_duplicate_fraction: float) -> Any:
    import great_expectations as gx

    E = gx.expectations
    suite = gx.ExpectationSuite(name="chat")
    for exp in (
        E.ExpectTableRowCountToBeBetween(min_value=min_rows),
        E.ExpectColumnValuesToBeBetween(column="n_assistant", min_value=1),
        E.ExpectColumnValuesToBeBetween(column="min_content_chars", min_value=1),
        E.ExpectColumnValuesToBeBetween(column="token_len", min_value=2, max_value=max_seq_len),
        E.ExpectColumnProportionOfUniqueValuesToBeBetween(column="text", min_value=1.0 - max_duplicate_fraction),
    ):
        suite.add_expectation(exp)
    return suite


def run_suite(df: Any, build_suite: Any, name: str) -> Any:
    import great_expectations as gx

    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    # In memory, no temp Data Docs site in /tmp, no progress bars.
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    suite = context.suites.add(build_suite())
    batch_def = (context.data_sources.add_pandas(f"tuneops-{name}")
                 .add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all"))
    return batch_def.get_batch(batch_parameters={"dataframe": df}).validate(suite, result_format="COMPLETE")


def validate_split(path: Path, tokenizer: Any, max_seq_len: int, min_rows: int,
                   max_duplicate_fraction: float) -> SplitResult:
    p = str(path)
    if not Path(path).is_file():
        return SplitResult(p, 0, [], problems=[Problem(p, 0, "(file)", "exists", "file not found")])
    rows, problems = parse_jsonl(path)
    good: list[tuple[int, dict[str, Any]]] = []
    for no, obj in rows:
        errs = check_chat(p, no, obj)
        problems.extend(errs)
        if not errs:
            good.append((no, obj))
    if not rows and not problems:
        problems.append(Problem(p, 1, "(file)", "non_empty", "no records (file is empty or blank)"))
    result = SplitResult(p, len(rows), [obj for _, obj in good], problems=problems)
    if not good:
        return result
    df = features(good, tokenizer)
    result.tokens = int(df["token_len"].sum())
    gx_result = run_suite(df, lambda: chat_suite(max_seq_len, min_rows, max_duplicate_fraction), Path(path).stem)
    for r in gx_result.results:
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
        column = kwargs.get("column")
        entry = {"expectation": cfg.type, "kwargs": kwargs, "success": bool(r.success),
                 "observed": r.result.get("observed_value"), "unexpected_count": r.result.get("unexpected_count")}
        result.expectations.append(entry)
        if r.success:
            continue
        if column in ROW_RULES:
            field_name, rule = ROW_RULES[column]
            bad = df[~df[column].between(kwargs.get("min_value") or float("-inf"),
                                         kwargs.get("max_value") or float("inf"))]
            for _, row in bad.iterrows():
                detail = f"{column}={row[column]}, allowed {kwargs.get('min_value')}..{kwargs.get('max_value')}"
                if column == "token_len":
                    detail = f"{row[column]} tokens > max_seq_len {max_seq_len} (model tokenizer)"
                problems.append(Problem(p, int(row["line"]), field_name, rule, detail))
        else:
            problems.append(Problem(p, 0, column or "(dataset)", cfg.type,
                                    f"observed {entry['observed']!r}, expected {kwargs}"))
    problems.sort(key=lambda q: q.line)  # parse errors and GX row failures, in file order
    return result
