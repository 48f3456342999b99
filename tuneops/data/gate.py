"""The data gate: read (records.py), check each record (formats.py), then run the
format's Great Expectations suite (``suites/<format>.json``, versioned in the repo) over
a per-record feature table: row count, token length vs ``max_seq_len`` with the model's
own tokenizer, exact and near duplicates, train/eval leakage, label set and balance, ...

Problems are ``PATH:LINE: FIELD: RULE: message``. A problem on a line is a *row*
problem (in ``quarantine`` policy the row goes to the rejects file); a problem with the
file (unreadable, empty, a JSON array) or the dataset (too few rows, labels out of
balance, too many rows rejected) is *fatal* under either policy. Each suite
expectation's ``meta`` names the field, rule and message its failures are reported under.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from ..inference.chat import ChatFormatError
from . import formats, toolrows
from .records import MAX_LINE_BYTES, MAX_PROBLEMS, Problem, RecordReader, Row, cap_problems

SUITES_DIR = Path(__file__).parent / "suites"
POLICIES = ("fail", "quarantine")


@dataclass(frozen=True)
class Settings:
    """Everything the gate needs from params (``Settings.from_config``)."""
    format: str = "chat"
    max_seq_len: int = 256
    min_rows: int = 1
    max_duplicate_fraction: float = 0.0
    max_near_duplicate_fraction: float = 0.02
    max_label_imbalance: float = 50.0
    max_length_ratio: float = 4.0
    max_record_bytes: int = MAX_LINE_BYTES
    labels: tuple[str, ...] | None = None
    entity_types: tuple[str, ...] | None = None
    policy: str = "fail"
    max_rejected_fraction: float = 0.05
    max_problems: int = MAX_PROBLEMS

    @classmethod
    def from_config(cls, cfg: Any, fmt: str | None = None, policy: str | None = None) -> "Settings":
        v, d = cfg.validate, cfg.data
        return cls(
            format=fmt or d.resolved_format, max_seq_len=cfg.model.max_seq_len, min_rows=v.min_rows,
            max_duplicate_fraction=v.max_duplicate_fraction,
            max_near_duplicate_fraction=v.max_near_duplicate_fraction,
            max_label_imbalance=v.max_label_imbalance, max_length_ratio=v.max_length_ratio,
            max_record_bytes=v.max_record_bytes,
            labels=tuple(str(x) for x in d.labels) if d.labels else None,
            entity_types=tuple(d.entity_types) if d.entity_types else None,
            policy=policy or d.policy, max_rejected_fraction=d.max_rejected_fraction,
        )


@dataclass
class SplitResult:
    name: str
    path: str
    kind: str = "jsonl"
    rows: int = 0                                          # records read (non-blank lines)
    accepted: list[Row] = field(default_factory=list)      # rows that pass every check
    rejected: dict[int, list[Problem]] = field(default_factory=dict)   # line -> its problems
    rejected_rows: dict[int, Row] = field(default_factory=dict)        # line -> the row as read
    fatal: list[Problem] = field(default_factory=list)     # file- and dataset-level problems
    tokens: int = 0
    expectations: list[dict[str, Any]] = field(default_factory=list)
    token_lens: list[int] = field(default_factory=list)    # of the accepted rows
    max_problems: int = MAX_PROBLEMS

    @property
    def records(self) -> list[Any]:
        return [r.obj for r in self.accepted]

    @property
    def all_problems(self) -> list[Problem]:
        rows = [q for line in sorted(self.rejected) for q in self.rejected[line]]
        return sorted(self.fatal + rows, key=lambda q: q.line)

    @property
    def problems(self) -> list[Problem]:
        """Every problem in file order, at most ``max_problems`` and a summary line."""
        return cap_problems(self.all_problems, self.max_problems)

    @property
    def ok(self) -> bool:
        return not self.fatal and not self.rejected

    def counts(self) -> dict[str, Any]:
        by_rule: dict[str, int] = {}
        for probs in self.rejected.values():            # a row counts once, under its first rule
            by_rule[probs[0].rule] = by_rule.get(probs[0].rule, 0) + 1
        return {"read": self.rows, "accepted": len(self.accepted), "rejected": len(self.rejected),
                "rejected_by_rule": dict(sorted(by_rule.items()))}


@dataclass
class GateResult:
    settings: Settings
    splits: dict[str, SplitResult]
    suite: dict[str, Any]

    @property
    def fatal(self) -> list[Problem]:
        return [q for s in self.splits.values() for q in s.fatal]

    @property
    def success(self) -> bool:
        if self.settings.policy == "quarantine":
            return not self.fatal
        return all(s.ok for s in self.splits.values())

    @property
    def problems(self) -> list[Problem]:
        return [q for s in self.splits.values() for q in s.problems]

    def counts(self) -> dict[str, Any]:
        per = {n: s.counts() for n, s in self.splits.items()}
        total: dict[str, Any] = {"read": 0, "accepted": 0, "rejected": 0, "rejected_by_rule": {}}
        for c in per.values():
            for k in ("read", "accepted", "rejected"):
                total[k] += c[k]
            for rule, n in c["rejected_by_rule"].items():
                total["rejected_by_rule"][rule] = total["rejected_by_rule"].get(rule, 0) + n
        return {**per, "total": total}


# -- suites ------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _suite_text(name: str) -> str:
    return (SUITES_DIR / f"{name}.json").read_text(encoding="utf-8")


def load_suite(name: str) -> dict[str, Any]:
    """A suite as stored (GX 1.x ``ExpectationSuite`` JSON with ``$PARAMETER`` thresholds)."""
    return json.loads(_suite_text(name))


def suite_info(fmt: str) -> dict[str, Any]:
    out = {}
    for name in (fmt, "leakage"):
        meta = load_suite(name)["meta"]["tuneops"]
        out[name] = {"name": load_suite(name)["name"], "version": meta["version"],
                     "sha256": hashlib.sha256(_suite_text(name).encode()).hexdigest()[:16]}
    return out


def run_suite(df: Any, expectations: list[dict[str, Any]], name: str, parameters: dict[str, Any]) -> Any:
    """Validate ``df`` in an in-memory GX context (no Data Docs site in /tmp, no progress bars)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    batch_def = (context.data_sources.add_pandas(f"tuneops-{name}")
                 .add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all"))
    return batch_def.get_batch(batch_parameters={"dataframe": df}).validate(
        suite, result_format="COMPLETE", expectation_parameters=parameters)


# -- features ------------------------------------------------------------------------------

@contextmanager
def _tokenizer_threads() -> Iterator[None]:
    """Let the Rust tokenizer use every core for one batch (the env var stays set, so a
    later fork does not warn)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def segment_texts(messages: list[dict[str, Any]], tokenizer: Any,
                  tools: list[dict[str, Any]] | None = None) -> list[str]:
    """The text training tokenizes (the conversation in the model's chat template, with its tools
    and tool calls as the model's tool format writes them: ``tuneops.inference.chat.render``), for
    token counts; raises ``ChatFormatError`` when the template cannot render it."""
    from ..inference.chat import render

    if not getattr(tokenizer, "chat_template", None):   # an encoder (classification / NER heads): the text
        return ["\n".join(m.get("content") or "" for m in messages)]
    return [render(tokenizer, messages, tools=tools)]


def _encode_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    with _tokenizer_threads():
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [len(e.ids) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


class TokenCounter:
    """Token lengths of conversations as training tokenizes them (the conversation rendered
    by the model's chat template, as ``tuneops.inference.chat.tokenize`` does), computed in the
    background: chunks of distinct segment texts go to the (GIL-free, multi-threaded)
    Rust tokenizer while the caller goes on reading and checking records."""

    CHUNK = 8192

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self._index: dict[str, int] = {}
        self._pending: list[str] = []
        self._convs: list[list[int]] = []
        self._futures: list[Any] = []
        self._pool: Any = None

    def _tok(self) -> Any:
        if isinstance(self._tokenizer, LazyTokenizer):
            self._tokenizer = self._tokenizer.get()
        return self._tokenizer

    def _submit(self) -> None:
        if not self._pending:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneops-tokens")
        self._futures.append(self._pool.submit(_encode_lengths, self._tok(), self._pending))
        self._pending = []

    def add(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
        ids = []
        for text in segment_texts(conversation, self._tok(), tools):
            i = self._index.get(text)
            if i is None:
                i = self._index[text] = len(self._index)
                self._pending.append(text)
            ids.append(i)
        self._convs.append(ids)
        if len(self._pending) >= self.CHUNK:
            self._submit()
        return len(self._convs) - 1

    def lengths(self) -> list[int]:
        self._submit()
        lens: list[int] = []
        try:
            for fut in self._futures:
                lens.extend(fut.result())
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        return [sum(lens[i] for i in ids) for ids in self._convs]


class LazyTokenizer:
    """A tokenizer loaded on first use (a file that fails before any record is checked
    for length never pays for loading it)."""

    def __init__(self, factory: Any):
        self._factory, self._tok = factory, None

    def get(self) -> Any:
        if self._tok is None:
            self._tok = self._factory()
        return self._tok


def _token_rules(ref: str) -> Any:
    """A format's tokenizer rules (``Format.token_issues``, "module:function")."""
    import importlib

    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _base_features(rows: list[Row], spec: formats.Format, token_lens: list[int]) -> Any:
    """Per-record columns that do not depend on which other rows are in the set."""
    import pandas as pd

    objs = [r.obj for r in rows]
    df = pd.DataFrame({
        "line": [r.line for r in rows],
        "token_len": token_lens,
        "exact_key": [spec.exact_key(o) for o in objs],
        "near_key": [spec.near_key(o) for o in objs],
    })
    if spec.name == "chat":
        df["n_assistant"] = [toolrows.replies(o["messages"]) for o in objs]
    elif spec.name == "classification":
        df["label"] = [str(o["label"]) for o in objs]
    elif spec.name == "ner":
        df["n_entities"] = [sum(t.startswith("B-") for t in o["tags"]) for o in objs]
    elif spec.name == "translation":
        # Smoothed character ratio (+8 each side): short UI strings vary a lot in length.
        df["length_ratio"] = [(len(o["target"]) + 8) / (len(o["source"]) + 8) for o in objs]
    return df


def _derive(df: Any, train: Any | None) -> Any:
    """Columns that depend on the set: duplicates (the line of the first occurrence),
    label shares, and leakage against the train split's features."""
    df = df.copy()
    first = df.groupby("exact_key", sort=False)["line"].transform("first")
    df["dup_of"] = first.where(first != df["line"], 0).astype(int)
    first_near = df.groupby("near_key", sort=False)["line"].transform("first")
    df["near_dup_of"] = first_near.where((first_near != df["line"]) & (df["dup_of"] == 0), 0).astype(int)
    if "label" in df:
        counts = df["label"].map(df["label"].value_counts())
        df["label_share_of_max"] = counts / max(int(counts.max()) if len(counts) else 1, 1)
    if train is not None:
        exact = train.drop_duplicates("exact_key").set_index("exact_key")["line"]
        near = train.drop_duplicates("near_key").set_index("near_key")["line"]
        df["leak_of"] = df["exact_key"].map(exact).fillna(0).astype(int)
        near_leak = df["near_key"].map(near).fillna(0).astype(int)
        df["near_leak_of"] = near_leak.where(df["leak_of"] == 0, 0)
    return df


def _parameters(s: Settings, split: str, train_labels: list[str] | None, train_path: str) -> dict[str, Any]:
    labels = list(s.labels) if s.labels else (train_labels or [])
    return {
        "min_rows": s.min_rows, "max_seq_len": s.max_seq_len,
        "dup_mostly": 1.0 - s.max_duplicate_fraction, "near_dup_mostly": 1.0 - s.max_near_duplicate_fraction,
        "max_duplicate_fraction": s.max_duplicate_fraction,
        "max_near_duplicate_fraction": s.max_near_duplicate_fraction,
        "labels": labels, "labels_source": "data.labels" if s.labels else "the labels seen in train",
        "min_label_share": 1.0 / s.max_label_imbalance, "max_label_imbalance": s.max_label_imbalance,
        "min_length_ratio": 1.0 / s.max_length_ratio, "max_length_ratio": s.max_length_ratio,
        "train_path": train_path,
    }


def _expectations(spec: formats.Format, split: str, with_leakage: bool) -> list[dict[str, Any]]:
    """The suite's expectations for one split (``meta.splits`` limits a distribution
    check to the train split: a small eval split need not have every label)."""
    exps = load_suite(spec.name)["expectations"]
    if with_leakage:
        exps = exps + load_suite("leakage")["expectations"]
    out = []
    for e in exps:
        meta = dict(e.get("meta") or {})
        if split not in meta.get("splits", [split]):
            continue
        if meta.get("field") == "$field":
            meta["field"] = spec.field
        out.append({**e, "meta": meta})
    return out


def _message(template: str, **values: Any) -> str:
    try:
        return template.format(**values)
    except (KeyError, ValueError, IndexError):
        return f"{template} ({values.get('value', values.get('observed'))!r})"


def _exception_message(info: Any) -> str | None:
    """GX reports an evaluation error flat or per metric; the first message, if any."""
    if not isinstance(info, dict):
        return None
    infos = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    return next((i.get("exception_message") or "error" for i in infos if i.get("raised_exception")), None)


def _apply_suite(sr: SplitResult, df: Any, spec: formats.Format, s: Settings, params: dict[str, Any],
                 with_leakage: bool) -> tuple[dict[int, list[Problem]], list[Problem]]:
    """Run the suite; return (row problems by line, dataset problems) and record the
    expectation results on ``sr``."""
    exps = _expectations(spec, sr.name, with_leakage)
    result = run_suite(df, exps, f"{spec.name}-{sr.name}", params)
    rows: dict[int, list[Problem]] = {}
    dataset: list[Problem] = []
    sr.expectations = []
    for r in result.results:          # (GX does not keep the suite's order: each result carries its meta)
        cfg = r.expectation_config
        kwargs = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
        meta = dict(cfg.meta or {})
        idx = r.result.get("unexpected_index_list") or []
        entry = {"expectation": cfg.type, "kwargs": kwargs, "success": bool(r.success),
                 "observed": r.result.get("observed_value"), "unexpected_count": r.result.get("unexpected_count"),
                 "field": meta.get("field"), "rule": meta.get("rule")}
        if idx:
            entry["unexpected_lines"] = [int(df["line"].iat[i]) for i in idx[:20]]
        sr.expectations.append(entry)
        if r.success:
            continue
        column = kwargs.get("column")
        error = _exception_message(r.exception_info)
        if error or (cfg.type.startswith("expect_column_values_") and not idx):
            dataset.append(Problem(sr.path, 0, meta.get("field", "(dataset)"), meta.get("rule", cfg.type),
                                   f"expectation {cfg.type} could not be evaluated: {error or 'no failing rows named'}"))
        elif cfg.type.startswith("expect_column_values_"):           # row-level: one problem per row
            for i in idx:
                line = int(df["line"].iat[i])
                msg = _message(meta["message"], value=df[column].iat[i], **params)
                rows.setdefault(line, []).append(Problem(sr.path, line, meta["field"], meta["rule"], msg))
        else:
            extra: dict[str, Any] = {}
            if meta.get("rule") == "balance" and "label" in df:
                vc = df["label"].value_counts()
                extra = {"least_label": vc.index[-1], "least_count": int(vc.iloc[-1]),
                         "most_label": vc.index[0], "most_count": int(vc.iloc[0]),
                         "imbalance": vc.iloc[0] / max(vc.iloc[-1], 1)}
            msg = _message(meta["message"], observed=entry["observed"], **params, **extra)
            dataset.append(Problem(sr.path, 0, meta["field"], meta["rule"], msg))
    order = {e["meta"].get("rule"): i for i, e in enumerate(exps)}
    sr.expectations.sort(key=lambda e: order.get(e["rule"], len(order)))
    return rows, dataset


# -- the gate ------------------------------------------------------------------------------------

def validate_dataset(paths: dict[str, Path | str], tokenizer: Any, s: Settings) -> GateResult:
    """Validate one or more splits (``train`` first; an ``eval`` split is also checked
    for leakage against ``train``) under the settings' policy."""
    spec = formats.get(s.format)
    opts = {"entity_types": list(s.entity_types) if s.entity_types else None}
    splits: dict[str, SplitResult] = {}
    candidates: dict[str, list[Row]] = {}
    base: dict[str, Any] = {}
    for name, path in paths.items():
        reader = RecordReader(path, s.max_record_bytes)
        sr = SplitResult(name, str(path), reader.kind, max_problems=s.max_problems)
        good: list[Row] = []
        sides: list[list[int]] = []        # per good row: its conversations' indices in the counter
        counter = TokenCounter(tokenizer)
        if reader.kind == "csv" and not spec.csv:
            sr.fatal.append(Problem(sr.path, 0, "(file)", "format",
                                    f"CSV cannot hold format {spec.name!r} (nested lists): use JSONL or Parquet"))
        else:
            for row in reader:
                if not row.problems:
                    row.problems = formats.check_record(spec.name, sr.path, row.line, row.obj, opts)
                if row.problems:
                    sr.rejected[row.line] = row.problems
                    sr.rejected_rows[row.line] = row
                else:
                    try:
                        if spec.token_issues is not None:     # rules that need the model's tokenizer
                            tok = tokenizer.get() if isinstance(tokenizer, LazyTokenizer) else tokenizer
                            issues = _token_rules(spec.token_issues)(row.obj, tok, s.max_seq_len)
                            if issues:
                                sr.rejected[row.line] = [Problem(sr.path, row.line, *i) for i in issues]
                                sr.rejected_rows[row.line] = row
                                continue
                        # every conversation the record trains on; its length is the longest one's
                        sides.append([counter.add(c, spec.tools(row.obj)) for c in spec.sides(row.obj)])
                    except ChatFormatError as exc:     # the model's template cannot render the record
                        sr.rejected[row.line] = [Problem(sr.path, row.line, spec.field, "chat_template", str(exc))]
                        sr.rejected_rows[row.line] = row
                        continue
                    good.append(row)
            sr.rows = reader.count
            sr.fatal.extend(reader.problems)
        if sr.fatal:               # an unusable file: nothing of it is checked further
            good = []
        every = counter.lengths()
        lens = [max(every[i] for i in idx) for idx in sides]
        splits[name], candidates[name] = sr, good
        if good:
            base[name] = _base_features(good, spec, lens)

    train_df = _derive(base["train"], None) if "train" in base else None
    train_labels = sorted(train_df["label"].unique().tolist()) if train_df is not None and "label" in train_df else None
    train_path = splits["train"].path if "train" in splits else ""
    for name, sr in splits.items():
        if name not in base:
            continue
        leak_ref = train_df if name != "train" else None
        params = _parameters(s, name, train_labels, train_path)
        df = base[name]
        dataset_probs: list[Problem] = []
        for _ in range(3):     # quarantine: drop failing rows, re-check the rest (stable after one round)
            feat = _derive(df, leak_ref)
            row_probs, dataset_probs = _apply_suite(sr, feat, spec, s, params, leak_ref is not None)
            by_line = {r.line: r for r in candidates[name]} if row_probs else {}
            for line, probs in row_probs.items():
                sr.rejected.setdefault(line, []).extend(probs)
                sr.rejected_rows[line] = by_line[line]
            if s.policy != "quarantine" or not row_probs:
                break
            df = df[~df["line"].isin(list(row_probs))].reset_index(drop=True)
            if df.empty:
                feat = df
                dataset_probs = [Problem(sr.path, 0, "(dataset)", "min_rows", "no rows left after quarantine")]
                break
        sr.fatal.extend(dataset_probs)
        kept = set(feat["line"].tolist()) - set(sr.rejected)
        sr.accepted = [r for r in candidates[name] if r.line in kept]
        by_line = dict(zip(feat["line"].tolist(), feat["token_len"].tolist())) if len(feat) else {}
        sr.token_lens = [int(by_line[r.line]) for r in sr.accepted]
        sr.tokens = int(sum(sr.token_lens))
    if s.policy == "quarantine":
        for sr in splits.values():
            if sr.rows and len(sr.rejected) / sr.rows > s.max_rejected_fraction:
                sr.fatal.append(Problem(
                    sr.path, 0, "(dataset)", "max_rejected_fraction",
                    f"{len(sr.rejected)} of {sr.rows} rows rejected ({len(sr.rejected) / sr.rows:.1%}) > "
                    f"{s.max_rejected_fraction:.1%} (data.max_rejected_fraction)"))
    return GateResult(s, splits, suite_info(spec.name))


def validate_split(path: Path, tokenizer: Any, max_seq_len: int, min_rows: int,
                   max_duplicate_fraction: float, **settings: Any) -> SplitResult:
    """One file through the gate (no leakage check): the original chat-only entry point."""
    s = Settings(max_seq_len=max_seq_len, min_rows=min_rows, max_duplicate_fraction=max_duplicate_fraction,
                 **settings)
    return validate_dataset({"train": path}, tokenizer, s).splits["train"]
