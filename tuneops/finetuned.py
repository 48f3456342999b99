"""Loading the fine-tuned model the train stage produced (adapter or full model)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import read_json
from .models import load_causal_lm


def load(base_dir: Path, train_dir: Path, merge: bool = False) -> Any:
    """Base + adapter (optionally merged into plain weights), or the full fine-tuned model."""
    info = read_json(train_dir / "metrics.json")
    if info["artifact"] == "model":
        return load_causal_lm(train_dir / "model")
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_dir), str(train_dir / "adapter"))
    return model.merge_and_unload() if merge else model
