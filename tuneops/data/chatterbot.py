"""The bundled default dataset: chatterbot-corpus (BSD-3) conversations as chat JSONL."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def corpus_dir(language: str) -> Path:
    import chatterbot_corpus

    path = Path(chatterbot_corpus.__file__).parent / "data" / language
    if not path.is_dir():
        raise ConfigError(f"ingest.language: chatterbot-corpus has no language {language!r}")
    return path


def _text(x: Any) -> str:
    return x if isinstance(x, str) else "\n".join(str(i) for i in x) if isinstance(x, list) else str(x)


def conversations(language: str = "english") -> list[dict[str, Any]]:
    """Each corpus conversation as alternating user/assistant turns (a trailing
    unanswered user turn is dropped), tagged with its category file."""
    out = []
    for path in sorted(corpus_dir(language).glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            turns = [_text(t).strip() for t in conv if t is not None]
            if len(turns) % 2:
                turns = turns[:-1]
            if len(turns) < 2 or not all(turns):
                continue
            msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            out.append({"messages": msgs, "category": path.stem})
    return out


def clean(rows: list[dict[str, Any]], max_chars: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop exact duplicate conversations (tech_support repeats one 121 times) and ones
    longer than ``max_chars``; return the counts so nothing is dropped silently."""
    seen: set[str] = set()
    kept: list[dict[str, Any]] = []
    counts = {"read": len(rows), "duplicates": 0, "too_long": 0}
    for r in rows:
        key = repr(r["messages"])
        if key in seen:
            counts["duplicates"] += 1
        elif sum(len(m["content"]) for m in r["messages"]) > max_chars:
            counts["too_long"] += 1
        else:
            seen.add(key)
            kept.append(r)
    counts["kept"] = len(kept)
    return kept, counts


def eval_count(n: int, eval_fraction: float) -> int:
    """How many of ``n`` rows :func:`split` holds out for evaluation."""
    return max(1, round(n * eval_fraction))


def split(rows: list[dict[str, Any]], eval_fraction: float, seed: int,
          limit: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fixed-seed shuffle and split of (deduplicated) rows."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    if limit:
        rows = rows[:limit]
    n_eval = eval_count(len(rows), eval_fraction)
    return rows[n_eval:], rows[:n_eval]


def preference_pairs(language: str = "english", seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Preference rows (OpenAI DPO form) from chatterbot-corpus: for each user turn with a reply,
    chosen = the corpus's own reply, rejected = the reply the corpus gives to a user turn of a
    *different category* (a fluent, on-distribution answer to another question). Prompts that
    repeat (the corpus asks some questions in several files) keep their first reply; a rejected
    reply never equals any reply the corpus gives to the same prompt text, and is never a generic
    reply (one the corpus gives in two or more categories, which might fit this prompt too).

    Why these are honest preferences: the chosen reply is the one the corpus's authors wrote for
    that prompt; the rejected one is fluent, human-written and on-distribution (same corpus, same
    style and length range) but answers a question of another topic, so the only thing that
    separates the sides is whether the reply fits the prompt, not style or length. Replies that fit
    many prompts (given in several categories) are never used as rejected, and neither is any reply
    the corpus itself gives to the same prompt text. Shuffling is fixed-seed (``ingest.seed``)."""
    rng = random.Random(seed)
    turns: list[tuple[str, str, str]] = []          # (category, question, answer)
    answers_of: dict[str, set[str]] = {}
    for conv in conversations(language):
        msgs = conv["messages"]
        for q, a in zip(msgs[::2], msgs[1::2]):
            turns.append((conv["category"], q["content"], a["content"]))
            answers_of.setdefault(q["content"].strip().lower(), set()).add(a["content"].strip().lower())
    cats_of: dict[str, set[str]] = {}
    for cat, _, a in turns:
        cats_of.setdefault(a.strip().lower(), set()).add(cat)
    by_cat: dict[str, list[str]] = {}
    for cat, _, a in turns:
        if len(cats_of[a.strip().lower()]) == 1:            # generic replies are never the rejected side
            by_cat.setdefault(cat, []).append(a)
    cats = sorted(by_cat)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    skipped = {"repeated_prompt": 0, "no_distinct_reply": 0}
    for cat, q, a in turns:
        key = q.strip().lower()
        if key in seen:
            skipped["repeated_prompt"] += 1
            continue
        seen.add(key)
        others = [c for c in cats if c != cat and by_cat.get(c)]
        rejected = None
        for _ in range(20):
            cand = rng.choice(by_cat[rng.choice(others)])
            if cand.strip().lower() not in answers_of[key]:
                rejected = cand
                break
        if rejected is None:
            skipped["no_distinct_reply"] += 1
            continue
        out.append({"input": {"messages": [{"role": "user", "content": q}]},
                    "preferred_output": [{"role": "assistant", "content": a}],
                    "non_preferred_output": [{"role": "assistant", "content": rejected}],
                    "category": cat})
    return out, {"source": "chatterbot-corpus 1.3.3", "license": "BSD-3-Clause", "language": language,
                 "pairs": "chosen = the corpus reply; rejected = a reply from another category", "skipped": skipped}
