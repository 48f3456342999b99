"""THE decode loop: every generation in tuneops is ``decode`` over a runtime
(``tuneops.inference.runtimes``: ONNX Runtime or PyTorch).

- ``decode``: prefill once, then one token per step with the KV cache (a graph without one, the
  fixed-shape accelerator graphs, recomputes the whole sequences each step); a batch of prompts of
  any lengths, left-padded; per-row stop tokens, token limits and pickers (greedy or seeded
  sampling, ``tuneops.inference.sampling``); it yields every row's new token at each step, so a
  streaming caller gets tokens as they come and a batch caller collects them.
- ``stream``: one sequence's tokens as they come (``ChatEngine.deltas``: ``tuneops serve``, the jobs
  API, the registered pyfunc, ``tuneops generate``).
- ``generate_ids``: every row's tokens at the end; ``reply_ids`` / ``replies``: greedy replies to chat
  conversations in the model's own format and stop tokens (evaluate's generations).

Greedy decoding of a PyTorch model here gives the tokens Hugging Face ``generate`` gives
(``do_sample=False``, the same stop ids and limit, left padding): the same calls in the same
order (``TorchCausalLM``), and a finished row is fed padding so the batch keeps its shape, as
``generate`` does (tests/inference/test_decode.py compares them token by token).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .sampling import Picker, greedy


def _per_row(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"decode: {len(value)} {what} for {n} prompts")
        return list(value)
    return [value] * n


def _stop_sets(stop: Iterable[int] | Sequence[Iterable[int]], n: int) -> list[frozenset[int]]:
    """One stop set for every row (ids), or one per row (a list of id collections)."""
    stop = list(stop)
    if stop and not isinstance(stop[0], (int, np.integer)):
        return [frozenset(int(t) for t in s) for s in _per_row(stop, n, "stop sets")]
    return [frozenset(int(t) for t in stop)] * n


def decode(runtime: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
           stop: Iterable[int] | Sequence[Iterable[int]] = (), pick: Picker | Sequence[Picker] | None = None,
           pad_id: int = 0) -> Iterator[list[int | None]]:
    """Per step, the new token of each row (``None`` for a row that has finished). A row finishes
    with a stop token (yielded: the row's last token) or at its ``max_new_tokens``; the loop ends
    when every row has finished (no step is computed that nobody reads). ``stop``: token ids for
    every row, or one collection per row; ``pick``: a picker for every row or one per row (default
    greedy); ``max_new_tokens``: one limit or one per row."""
    n = len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("decode: a prompt has no tokens")
    limits = _per_row(max_new_tokens, n, "token limits")
    stops = _stop_sets(stop, n)
    picks = _per_row(pick or greedy, n, "pickers")
    active = [m > 0 for m in limits]
    counts = [0] * n
    if not any(active):
        return
    if runtime.has_cache:
        width = max(len(p) for p in prompts)
        if not getattr(runtime, "left_padding", True) and any(len(p) != width for p in prompts):
            raise ValueError(f"decode: {getattr(runtime, 'path', 'this graph')} takes positions from its attention "
                             f"mask (right padding only): decode prompts of different lengths one at a time")
        ids = np.array([[pad_id] * (width - len(p)) + list(p) for p in prompts], np.int64)
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int64)
        logits, cache = runtime.step(ids, mask, runtime.empty_cache(n), last=True)
        last = {i: logits[i, -1] for i in range(n)}
    else:
        seqs = [list(p) for p in prompts]
        last = _last_logits(runtime, seqs, [i for i in range(n) if active[i]])
    while True:
        tokens: list[int | None] = []
        for i in range(n):
            if not active[i]:
                tokens.append(None)
                continue
            token = picks[i](last[i])
            counts[i] += 1
            active[i] = token not in stops[i] and counts[i] < limits[i]
            tokens.append(token)
        yield tokens
        if not any(active):
            return
        if runtime.has_cache:        # a row that has finished is fed padding: the batch keeps its shape
            feed = np.array([[pad_id if t is None else t] for t in tokens], np.int64)
            mask = np.concatenate([mask, np.ones((n, 1), np.int64)], 1)
            logits, cache = runtime.step(feed, mask, cache, last=True)
            last = {i: logits[i, -1] for i in range(n)}
        else:
            for i, t in enumerate(tokens):
                if t is not None:
                    seqs[i].append(t)
            last = _last_logits(runtime, seqs, [i for i in range(n) if active[i]])


def _last_logits(runtime: Any, seqs: list[list[int]], rows: list[int]) -> dict[int, np.ndarray]:
    """Full-sequence logits at the last token of each of ``rows`` (right-padded, one call)."""
    width = max(len(seqs[i]) for i in rows)
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for k, i in enumerate(rows):
        ids[k, :len(seqs[i])], mask[k, :len(seqs[i])] = seqs[i], 1
    out = np.asarray(runtime(ids, mask))
    return {i: out[k, len(seqs[i]) - 1] for k, i in enumerate(rows)}


def stream(runtime: Any, prompt: Sequence[int], max_new_tokens: int, stop: Iterable[int] = (),
           pick: Picker | None = None) -> Iterator[int]:
    """One sequence's new tokens as they are decoded; the stop token ends it and is not yielded."""
    stop = frozenset(stop)
    for (token,) in decode(runtime, [prompt], max_new_tokens, [stop], pick):
        if token is None or token in stop:
            return
        yield token


def generate_ids(runtime: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 stop: Iterable[int] | Sequence[Iterable[int]] = (), pick: Picker | Sequence[Picker] | None = None,
                 pad_id: int = 0) -> list[list[int]]:
    """Each row's new tokens, its stop token last when one was reached (no padding)."""
    rows: list[list[int]] = [[] for _ in prompts]
    for tokens in decode(runtime, prompts, max_new_tokens, stop, pick, pad_id):
        for row, token in zip(rows, tokens):
            if token is not None:
                row.append(token)
    return rows


def reply_ids(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
              max_new_tokens: int, tools: Sequence[list[dict[str, Any]] | None] | None = None) -> list[list[int]]:
    """Greedy replies to conversations in the model's chat format, as token ids, in one left-padded
    batch; a reply stops at the template's end-of-turn marker or an EOS of the tokenizer /
    ``generation_config`` (the stop token is its last id when it was reached). ``model``: a runtime,
    or a PyTorch causal LM (run as ``TorchCausalLM``). ``tools``: per conversation, the functions it
    may call (OpenAI ``tools``), declared in the prompt in the model's tool format."""
    from .chat import prompt_ids, stop_ids
    from .runtimes import as_runtime

    if not conversations:
        return []
    runtime = as_runtime(model)
    per_row = list(tools) if tools is not None else [None] * len(conversations)
    prompts = [prompt_ids(tokenizer, m, tools=t) for m, t in zip(conversations, per_row)]
    stop = stop_ids(tokenizer, getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    return generate_ids(runtime, prompts, max_new_tokens, stop, pad_id=pad)


def replies(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]], max_new_tokens: int,
            tools: Sequence[list[dict[str, Any]] | None] | None = None) -> list[str]:
    """Greedy reply texts (special tokens, the stop token among them, removed) of ``reply_ids``."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in reply_ids(model, tokenizer, conversations, max_new_tokens, tools)]
