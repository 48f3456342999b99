"""Sequence packing: several short examples share one row, with attention kept inside each.

Rows carry ``position_ids`` that restart at 0 for every packed example and no
``attention_mask``; transformers (>= 4.53, ``masking_utils.find_packed_sequence_indices``)
turns restarting position ids into a block-diagonal causal mask for SDPA/eager attention
(flash-attention uses them as varlen boundaries), so no token attends across examples.
The first label of every example is ignored, so no loss crosses a boundary either.
(tests/training/test_training.py checks packed logits equal each example's own logits.)
"""
from __future__ import annotations

from typing import Any

from tuneops.inference.chat import IGNORE_INDEX


def pack(features: list[dict[str, list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """First-fit-decreasing bin packing of examples into rows of at most ``max_len`` tokens.
    Deterministic for a given input order; every example lands in exactly one row."""
    order = sorted(range(len(features)), key=lambda i: (-len(features[i]["input_ids"]), i))
    rows: list[dict[str, list[int]]] = []
    room: list[int] = []
    for i in order:
        f = features[i]
        n = len(f["input_ids"])
        if n > max_len:
            raise ValueError(f"packing: example {i} has {n} tokens > max_len {max_len}")
        for r, free in enumerate(room):
            if free >= n:
                break
        else:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            room.append(max_len)
            r = len(rows) - 1
        row = rows[r]
        row["input_ids"] += f["input_ids"]
        row["labels"] += [IGNORE_INDEX] + list(f["labels"][1:])
        row["position_ids"] += list(range(n))
        room[r] -= n
    return rows


class PackedCollator:
    """Pads packed rows to the batch's longest; the padding is one more 'example' (positions
    restart at 0) with ignored labels, so it attends to nothing real. Counts real tokens."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id
        self.tokens = 0

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids, labels, pos = [], [], []
        for f in features:
            n = len(f["input_ids"])
            self.tokens += n
            ids.append(f["input_ids"] + [self.pad] * (width - n))
            labels.append(f["labels"] + [IGNORE_INDEX] * (width - n))
            pos.append(f["position_ids"] + list(range(width - n)))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(pos)}


def padding_efficiency(features: list[dict[str, list[int]]], batch_size: int) -> float:
    """Real tokens / computed tokens when ``batch_size`` examples are padded to their longest."""
    real = computed = 0
    for i in range(0, len(features), batch_size):
        chunk = [len(f["input_ids"]) for f in features[i:i + batch_size]]
        real += sum(chunk)
        computed += max(chunk) * len(chunk)
    return real / max(computed, 1)
