"""The ONNX gates: parity of the fp32 export with PyTorch (full sequence and KV-cache decoding),
perplexity + top-1 agreement of each quantized variant against the PyTorch model it came from,
and the registered default (never a rejected variant)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from tuneops.inference.runtimes import OnnxCausalLM


def max_logits_diff(reference: Any, candidate: Any, features: list[dict[str, list[int]]]) -> float:
    """Max abs logits difference over real tokens, one unpadded sequence at a time."""
    worst = 0.0
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        mask = torch.ones_like(ids)
        ref = np.asarray(reference(ids, mask), dtype=np.float32)
        worst = max(worst, float(np.abs(np.asarray(candidate(ids, mask)) - ref).max()))
    return worst


def incremental_diff(lm: OnnxCausalLM, features: list[dict[str, list[int]]], tokens: int) -> float:
    """Max abs difference between full-sequence logits and logits from a prefill followed
    by ``tokens`` one-token steps with the KV cache (both from ONNX Runtime)."""
    worst = 0.0
    for f in features:
        ids = np.array([f["input_ids"]], dtype=np.int64)
        n = ids.shape[1]
        split = max(1, n - tokens)
        full = lm(ids, np.ones_like(ids))
        logits, cache = lm.step(ids[:, :split], np.ones((1, split), np.int64), lm.empty_cache(1))
        parts = [logits]
        for t in range(split, n):
            logits, cache = lm.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), cache)
            parts.append(logits)
        worst = max(worst, float(np.abs(np.concatenate(parts, 1) - full).max()))
    return worst


def choose_default(variants: dict[str, dict[str, Any]], order: list[str]) -> str | None:
    """The first variant of ``order`` that was built and accepted; never a rejected one."""
    return next((n for n in order if n in variants and variants[n]["accepted"]), None)


def score(forward: Any, features: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> dict[str, Any]:
    """Perplexity over assistant tokens and the top-1 (argmax) prediction at each of them."""
    from tuneops.inference.chat import IGNORE_INDEX
    from tuneops.inference.scoring import batches, by_length, nll

    total, count, top1 = 0.0, 0, []
    for batch in batches(by_length(features), batch_size, pad_id):   # same order for every model scored
        logits = forward(batch["input_ids"], batch["attention_mask"])
        s, n = nll(logits, batch["labels"])
        total, count = total + s, count + n
        labels = np.asarray(batch["labels"])[:, 1:]
        top1.append(np.asarray(logits)[:, :-1].argmax(-1)[labels != IGNORE_INDEX])
    loss = total / max(count, 1)
    return {"perplexity": math.exp(min(loss, 50.0)), "top1": np.concatenate(top1) if top1 else np.zeros(0)}


def gate_quantized(name: str, candidate: dict[str, Any], reference: dict[str, Any], max_change: dict[str, float],
                   min_agreement: dict[str, float]) -> dict[str, Any]:
    """A quantized variant must match the PyTorch model: perplexity within +-max_change %
    (a large drop is a deviation too, not a gain) and the same top-1 next token at
    >= min_agreement of the scored positions."""
    change = 100.0 * (candidate["perplexity"] / reference["perplexity"] - 1.0)
    agreement = float((candidate["top1"] == reference["top1"]).mean()) if len(reference["top1"]) else 0.0
    limit, floor = max_change[name], min_agreement[name]
    ok = bool(np.isfinite(change) and abs(change) <= limit and agreement >= floor)
    return {"perplexity": candidate["perplexity"], "perplexity_change_pct": change, "top1_agreement": agreement,
            "accepted": ok, "gate": f"|perplexity change| <= {limit}% and top-1 agreement >= {floor} vs PyTorch"}


