"""Stage `ingest`: materialize the bundled chat dataset with a fixed-seed train/eval split."""
from __future__ import annotations

from typing import Any

from tuneops.config import Config
from tuneops.data import chatterbot
from tuneops.io import write_json, write_jsonl


def run(cfg: Config) -> dict[str, Any]:
    p = cfg.ingest
    rows, counts = chatterbot.clean(chatterbot.conversations(p.language), p.max_chars)
    train, eval_ = chatterbot.split(rows, p.eval_fraction, p.seed, p.max_conversations)
    manifest = {
        "source": "chatterbot-corpus 1.3.3", "license": "BSD-3-Clause", "language": p.language,
        **counts, "train_rows": write_jsonl(cfg.path("train_data"), train),
        "eval_rows": write_jsonl(cfg.path("eval_data"), eval_),
    }
    write_json(cfg.path("ingest_manifest"), manifest)
    return {"train_data": str(cfg.path("train_data")), "eval_data": str(cfg.path("eval_data")), **manifest}
