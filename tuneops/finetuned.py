"""Loading the fine-tuned model the train stage produced (adapter or full model)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .io import read_json
from .models import load_causal_lm


def dequantize_like_qlora(model: Any, quant_type: str = "nf4", blocksize: int = 64,
                          skip: tuple[str, ...] = ("lm_head",)) -> Any:
    """Replace every ``nn.Linear`` weight (but ``skip``) by ``dequantize_4bit(quantize_4bit(W))``:
    the base weights a QLoRA adapter was trained against (bitsandbytes 4-bit quantizes every
    Linear but the LM head). Merging the adapter into these, at the base precision, keeps the
    merged model equal to the trained one; merging into the original fp32 weights would not."""
    import torch
    import bitsandbytes.functional as F

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip):
                w = module.weight.data
                q, state = F.quantize_4bit(w.float().contiguous(), blocksize=blocksize, quant_type=quant_type)
                module.weight.data = F.dequantize_4bit(q, state).to(w.dtype).reshape(w.shape)
    return model


def load(base_dir: Path, train_dir: Path, merge: bool = False) -> Any:
    """Base + adapter (optionally merged into plain weights), or the full fine-tuned model.
    A QLoRA adapter (``method: qlora`` in the train metrics) is applied to the 4-bit
    round-tripped base (dequantized to fp32 first), so the merge matches training; the
    4-bit settings come from the metrics' ``quantization`` (default NF4, block 64)."""
    info = read_json(train_dir / "metrics.json")
    if info["artifact"] == "model":
        return load_causal_lm(train_dir / "model")
    from peft import PeftModel

    base = load_causal_lm(base_dir)
    if info.get("method") == "qlora":
        q = info.get("quantization") or {}
        base = dequantize_like_qlora(base, q.get("quant_type", "nf4"), int(q.get("blocksize", 64)))
    model = PeftModel.from_pretrained(base, str(train_dir / "adapter"))
    return model.merge_and_unload() if merge else model
