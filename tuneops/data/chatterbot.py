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
