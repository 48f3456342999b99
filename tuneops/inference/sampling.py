"""Choosing the next token from one row of logits: greedy (argmax) or sampled (temperature,
top-k, top-p / nucleus), with a seeded generator per sequence so a seed replays its reply."""
from __future__ import annotations

from typing import Callable

import numpy as np

Picker = Callable[[np.ndarray], int]

MIN_TEMPERATURE = 1e-5    # a lower temperature decodes greedily (logits / a subnormal number are inf: NaN odds)


def greedy(row: np.ndarray) -> int:
    """The likeliest token (the first one on a tie, as ``torch.argmax``)."""
    return int(np.argmax(row))


def sampler(sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            seed: int | None = None) -> Picker:
    """Greedy (argmax) or temperature / top-k / top-p (nucleus) sampling over one logits row."""
    if not sample:
        return greedy
    if temperature <= 0:
        raise ValueError("temperature must be > 0 when sampling")
    rng = np.random.default_rng(seed)

    def pick(row: np.ndarray) -> int:
        z = row.astype(np.float64) / temperature
        order = np.argsort(-z)
        if top_k > 0:
            order = order[:top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(rng.choice(order, p=p))
    return pick
