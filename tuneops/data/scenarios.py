"""Scenario datasets for the ``ingest`` stage: build (sources.py), clean, sample and
split with a fixed seed. ``data.scenario`` picks one; ``user`` splits a dataset added
with ``tuneops data add`` (a DVC-tracked JSONL file) line by line, as is.

Cleaning never drops silently: every record left out is counted in the manifest.
The ``chat`` scenario keeps its original cleaning (exact duplicates, max_chars) so its
files stay byte-identical; the others also drop records that fail their format's
record checks and near duplicates, so each bundled dataset passes its own suite.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import chatterbot, formats, sources

Records = list[dict[str, Any]]


USER = "user"      # a dataset added with `tuneops data add` (its format is data.format)


@dataclass(frozen=True)
class Scenario:
    name: str
    format: str | None                                         # None: user data, in data.format
    build: Callable[[Any], tuple[Records, dict[str, Any]]] | None   # (ingest params) -> records, info
    stratify: str | None = None                                # cap ingest.max_per_label records per value
    min_seq_len: int | None = None     # token budget its rows need: model.max_seq_len is raised to it when lower
                                       # (tuneops.config.load_config; never lowered)


def _chat(p: Any) -> tuple[Records, dict[str, Any]]:
    return chatterbot.conversations(p.language), {"source": "chatterbot-corpus 1.3.3", "license": "BSD-3-Clause",
                                                  "language": p.language}


REGISTRY: dict[str, Scenario] = {s.name: s for s in (
    Scenario("chat", "chat", _chat),
    Scenario("qa", "qa", lambda p: sources.chatterbot_qa(p.language)),
    Scenario("translation", "translation", lambda p: sources.django_translation(p.target_language)),
    Scenario("definitions", "qa", lambda p: sources.wordnet_definitions(), stratify="lexname"),
    Scenario("topics", "classification", lambda p: sources.wordnet_topics(), stratify="label"),
    Scenario("sentiment", "classification", lambda p: sources.vader_sentiment(), stratify="label"),
    Scenario("ner", "ner", lambda p: sources.wordnet_ner(), stratify="entity_type"),
    Scenario("domain", "text", lambda p: sources.django_docstrings()),
    Scenario("creative", "instruction", lambda p: sources.fortunes_creative()),
    # tool calling: define_word / translate / get_sentiment calls answered from WordNet, Django, VADER,
    # and small talk that calls nothing; 2 x ingest.max_per_label candidates per function, then at most
    # max_per_label each. Rows are 400-550 tokens with the three tools declared (SmolLM2: the prompt with the
    # declarations alone is ~395), so the scenario raises model.max_seq_len to 640
    Scenario("tools", "chat", lambda p: sources.tool_calls(p.seed, 2 * p.max_per_label, p.language),
             stratify="tool", min_seq_len=640),
    # preference pairs (DPO): chatterbot-corpus prompts, chosen = the corpus's reply, rejected = a reply the
    # corpus gives to a prompt of another category (chatterbot.preference_pairs: how, and why honest)
    Scenario("preference", "preference", lambda p: chatterbot.preference_pairs(p.language, p.seed)),
    Scenario(USER, None, None),         # split by ingest from data.user.path (read_user_file / split_user_file)
)}


def clean(rows: Records, fmt: str, max_chars: int) -> tuple[Records, dict[str, Any]]:
    """Drop records that fail the format's checks, are longer than ``max_chars``, or
    repeat an earlier record exactly or after normalisation; count each reason."""
    spec = formats.get(fmt)
    seen_exact: set[str] = set()
    seen_near: set[str] = set()
    kept: Records = []
    counts: dict[str, Any] = {"read": len(rows), "invalid": 0, "duplicates": 0, "near_duplicates": 0,
                              "too_long": 0}
    invalid_rules: Counter[str] = Counter()
    for r in rows:
        issues = formats.record_issues(fmt, r)
        if issues:
            counts["invalid"] += 1
            invalid_rules[issues[0][1]] += 1
            continue
        exact, near = spec.exact_key(r), spec.near_key(r)
        if exact in seen_exact:
            counts["duplicates"] += 1
        elif near in seen_near:
            counts["near_duplicates"] += 1
        elif spec.size(r) > max_chars:
            counts["too_long"] += 1
        else:
            seen_exact.add(exact)
            seen_near.add(near)
            kept.append(r)
    counts["kept"] = len(kept)
    if invalid_rules:
        counts["invalid_by_rule"] = dict(sorted(invalid_rules.items()))
    return kept, counts


def stratified(rows: Records, key: str, per_label: int, seed: int) -> tuple[Records, int]:
    """At most ``per_label`` records per value of ``key`` (fixed-seed choice, order kept)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    taken: Counter[Any] = Counter()
    keep = set()
    for i in order:
        label = rows[i].get(key)
        if taken[label] < per_label:
            taken[label] += 1
            keep.add(i)
    return [r for i, r in enumerate(rows) if i in keep], len(rows) - len(keep)


def build(scenario: str, p: Any) -> tuple[Records, Records, dict[str, Any]]:
    """(train, eval, manifest) for a bundled scenario."""
    sc = REGISTRY[scenario]
    rows, info = sc.build(p)
    if sc.name == "chat":
        kept, counts = chatterbot.clean(rows, p.max_chars)     # unchanged: byte-identical chat files
    else:
        kept, counts = clean(rows, sc.format, p.max_chars)
    if sc.stratify:
        kept, capped = stratified(kept, sc.stratify, p.max_per_label, p.seed)
        counts["over_max_per_label"] = capped
        counts["kept"] = len(kept)
    train, eval_ = chatterbot.split(kept, p.eval_fraction, p.seed, p.max_conversations)
    if p.max_conversations:
        counts["over_max_conversations"] = max(0, len(kept) - p.max_conversations)
    manifest = {**info, "scenario": sc.name, "format": sc.format, **counts}
    return train, eval_, manifest


def read_user_file(path: Path) -> tuple[list[bytes], dict[str, Any]]:
    """A user's JSONL file as its non-blank lines, unparsed (validate reports what is wrong)."""
    with path.open("rb") as f:
        lines = [ln.rstrip(b"\r\n") for ln in f]
    if lines and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]
    records = [ln for ln in lines if ln.strip()]
    return records, {"read": len(records), "blank_lines": len(lines) - len(records)}


def split_user_file(path: Path, eval_fraction: float, seed: int,
                    limit: int | None = None) -> tuple[list[bytes], list[bytes], dict[str, Any]]:
    """Split a user's JSONL file by line (fixed-seed shuffle)."""
    records, counts = read_user_file(path)
    train, eval_ = chatterbot.split(records, eval_fraction, seed, limit)
    return train, eval_, counts
