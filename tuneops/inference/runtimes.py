"""Running exported models with ONNX Runtime (CPU execution provider): the causal LM
with a KV cache (full-sequence scoring, prefill + incremental decoding, streamed greedy
or sampled generation) and the sequence classifier.

The causal-LM graph (``tasks/optimize.py``) takes ``input_ids``, ``attention_mask``
(past + new tokens), ``position_ids`` and ``past_key_values.{i}.key|value``
``[batch, kv_heads, past, head_dim]``; it returns ``logits`` and ``present.{i}.key|value``
(past + new). A fixed-shape graph (fpga/npu targets) has only ``input_ids`` and
``attention_mask`` of one static shape; ``OnnxCausalLM`` pads to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np


def session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxCausalLM:
    def __init__(self, path: Path, threads: int = 0):
        self.path = Path(path)
        self.session = session(self.path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.has_positions = "position_ids" in inputs
        shape = inputs["input_ids"].shape
        self.fixed_shape = tuple(shape) if all(isinstance(d, int) for d in shape) else None
        self.kv_shape: tuple[int, int] | None = None
        if self.past_names:
            s = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
            self.kv_shape = (int(s[1]), int(s[3]))
            self.kv_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32

    @property
    def has_cache(self) -> bool:
        return bool(self.past_names)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        heads, dim = self.kv_shape or (0, 0)
        return {n: np.zeros((batch, heads, 0, dim), self.kv_dtype) for n in self.past_names}

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray,
             cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: logits for ``input_ids`` given the cache, and the grown cache."""
        past = next(iter(cache.values())).shape[2] if cache else 0
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64), **cache}
        if self.has_positions:
            feeds["position_ids"] = np.broadcast_to(np.arange(past, past + input_ids.shape[1], dtype=np.int64),
                                                    input_ids.shape).copy()
        out = self.session.run(None, feeds)
        return out[0], dict(zip(self.past_names, out[1:]))

    def __call__(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        """Full-sequence logits (no past): the ``forward`` contract of ``tuneops.lm.perplexity``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if self.fixed_shape:
            return self._fixed(ids, mask)
        return self.step(ids, mask, self.empty_cache(ids.shape[0]))[0]

    def _fixed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        batch, seq = self.fixed_shape
        if ids.shape[1] > seq:
            raise ValueError(f"{ids.shape[1]} tokens exceed the fixed sequence length {seq} of {self.path}")
        rows = []
        for i in range(0, ids.shape[0], batch):
            chunk_ids, chunk_mask = np.zeros((batch, seq), np.int64), np.zeros((batch, seq), np.int64)
            n = min(batch, ids.shape[0] - i)
            chunk_ids[:n, :ids.shape[1]], chunk_mask[:n, :ids.shape[1]] = ids[i:i + n], mask[i:i + n]
            logits = self.session.run(["logits"], {"input_ids": chunk_ids, "attention_mask": chunk_mask})[0]
            rows.append(logits[:n, :ids.shape[1]])
        return np.concatenate(rows, 0)

    def stream(self, prompt_ids: list[int], max_new_tokens: int, stop: set[int] | None = None,
               sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[int]:
        """Yield new token ids one at a time: prefill once, then one token per call with the
        KV cache (or a full recompute for graphs without one)."""
        pick = sampler(sample, temperature, top_k, top_p, seed)
        stop = stop or set()
        ids = np.array([prompt_ids], dtype=np.int64)
        if not self.has_cache:
            tokens = list(prompt_ids)
            for _ in range(max_new_tokens):
                arr = np.array([tokens], dtype=np.int64)
                nxt = pick(self(arr, np.ones_like(arr))[0, -1])
                if nxt in stop:
                    return
                tokens.append(nxt)
                yield nxt
            return
        logits, cache = self.step(ids, np.ones_like(ids), self.empty_cache(1))
        length = ids.shape[1]
        for _ in range(max_new_tokens):
            nxt = pick(logits[0, -1])
            if nxt in stop:
                return
            yield nxt
            length += 1
            logits, cache = self.step(np.array([[nxt]], np.int64), np.ones((1, length), np.int64), cache)


def sampler(sample: bool, temperature: float, top_k: int, top_p: float,
            seed: int | None) -> Callable[[np.ndarray], int]:
    """Greedy (argmax) or temperature / top-k / top-p (nucleus) sampling over one logits row."""
    if not sample:
        return lambda row: int(np.argmax(row))
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


class OnnxClassifier:
    """``(input_ids, attention_mask) -> logits [batch, labels]`` with the label names."""

    def __init__(self, path: Path, labels: list[str] | None = None, threads: int = 0):
        self.session = session(Path(path), threads)
        self.labels = labels

    def __call__(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.session.run(["logits"], feeds)[0]

    def predict(self, input_ids: Any, attention_mask: Any) -> list[dict[str, Any]]:
        logits = self(input_ids, attention_mask)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = []
        for row in probs:
            k = int(row.argmax())
            out.append({"label": self.labels[k] if self.labels else str(k), "score": float(row[k]),
                        "scores": {(self.labels[i] if self.labels else str(i)): float(v) for i, v in enumerate(row)}})
        return out
