"""Loading the fine-tuned model the train stage produced (adapter or full model).

QLoRA adapters were trained against the NF4-quantized base, so they are applied to that base:
for evaluation the 4-bit base itself, and for merging (export) the base *dequantized from NF4*
to fp32, so the merged weights are exactly the ones training saw (merging into the original
fp32 weights would silently give a slightly different model). Prompt tuning has no weights to
merge: ``merge=True`` raises a clear error for it.

A quantization-aware adapter (``Method.base_quant``, e.g. ``qat_int4``) is applied to the base
quantized the way it was trained (``tuneops.export.basequant.fake_quantize``): evaluation and the
merged export see the weights the adapter saw.

Classification / NER heads (``task_head`` and ``labels`` in the train metrics) load with their
head's auto class; an adapter's saved head (peft ``modules_to_save``) replaces the fresh one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import read_json
from ..models import load_causal_lm


def dequantize_like_qlora(model: Any, quant_type: str = "nf4", blocksize: int = 64,
                          skip: tuple[str, ...] = ("lm_head",)) -> Any:
    """Replace every ``nn.Linear`` weight (but ``skip``) by ``dequantize_4bit(quantize_4bit(W))``:
    the base weights a QLoRA adapter was trained against (bitsandbytes 4-bit quantizes every
    Linear but the LM head). ``load`` uses the exact path instead (the 4-bit base loaded the way
    training loaded it, then ``dequantize_4bit``); this simulation serves tests and tools that
    start from plain fp32 weights. Merging the adapter into these, at the base precision, keeps the
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


def dequantize_4bit(model: Any) -> int:
    """Replace every bitsandbytes Linear4bit with an fp32 nn.Linear holding its dequantized
    weights; returns how many were replaced."""
    import bitsandbytes as bnb
    import torch

    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).to(torch.float32)
                lin = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                      device=w.device, dtype=torch.float32)
                lin.weight.data.copy_(w)
                if child.bias is not None:
                    lin.bias.data.copy_(child.bias.data.float())
                setattr(parent, name, lin)
                n += 1
    return n


def head_plan(info: dict[str, Any]) -> dict[str, Any]:
    """The head part of a plan (``task_head``, ``labels``) from the train metrics."""
    return {"task_head": info.get("task_head", "causal_lm"), "labels": info.get("labels")}


def load_base(base_dir: Path, info: dict[str, Any]) -> Any:
    """The base model for the trained head: the causal LM, or a fresh (untrained) classification
    head with the run's label maps on the base weights (evaluate's baseline)."""
    from ..training import heads

    plan = head_plan(info)
    return heads.load(base_dir, plan) if heads.is_head(plan) else load_causal_lm(base_dir)


def load(base_dir: Path, train_dir: Path, merge: bool = False) -> Any:
    """Base + adapter (optionally merged into plain weights), or the full fine-tuned model."""
    from ..training import heads

    info = read_json(train_dir / "metrics.json")
    plan = head_plan(info)
    if info["artifact"] == "model":
        if heads.is_head(plan):
            return heads.of(plan).auto().from_pretrained(str(train_dir / "model"))
        return load_causal_lm(train_dir / "model")
    from peft import PeftModel

    from ..training.methods import spec

    method = spec(info["method"])
    if merge and not method.mergeable:
        raise ValueError("prompt tuning learns virtual input tokens, not weights: there is nothing to merge "
                         "into the base for export; use a LoRA-family method or IA3 for ONNX deployment")
    if method.nf4_base:
        from ..training.methods import disable_cpu_bf16_repack

        base = method.load(base_dir, {"method": method.name, "precision": "nf4+fp32", **plan})
        disable_cpu_bf16_repack(base)
        if merge:
            dequantize_4bit(base)
            base.config.quantization_config = None
            if hasattr(base, "hf_quantizer"):
                base.hf_quantizer = None
            base.is_loaded_in_4bit = False
    elif method.base_quant:      # quantization-aware LoRA: the deployment base's weights it was trained on
        base = method.load(base_dir, {"method": method.name, "precision": "fp32", **plan})
    else:
        base = load_base(base_dir, info)
    model = PeftModel.from_pretrained(base, str(train_dir / "adapter"))
    return model.merge_and_unload() if merge else model
