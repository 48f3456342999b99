"""Scoring causal LMs, shared by train, evaluate, optimize and the registry's gate: encoding chat
rows, batching, assistant-token negative log-likelihood, perplexity for any forward function
(PyTorch or ONNX Runtime) and the distortion of a model against itself. Generation is
``tuneops.inference.decode``."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

from .chat import IGNORE_INDEX, Collator, record_tools, tokenize


def encode(rows: list[dict[str, Any]], tokenizer: Any, max_len: int) -> list[dict[str, list[int]]]:
    """Chat rows (with their ``tools`` / legacy ``functions``) as token ids and labels."""
    return [tokenize(r["messages"], tokenizer, max_len, tools=record_tools(r)) for r in rows]


def by_length(features: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """The features shortest first (stable): scoring batches of similar length pads less
    (on the chat eval rows, random batches of 4 are mostly padding); a summed loss does not
    depend on the order."""
    return sorted(features, key=lambda f: len(f["input_ids"]))


def batches(features: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> Iterator[dict[str, Any]]:
    collate = Collator(pad_id)
    for i in range(0, len(features), batch_size):
        yield collate(features[i:i + batch_size])


def _summed_cross_entropy(logits: Any, target: Any) -> tuple[float, int]:
    """Summed cross-entropy of ``logits [b, n, vocab]`` against the aligned ``target [b, n]``
    (``IGNORE_INDEX`` skipped), and the count of scored tokens."""
    import torch.nn.functional as F

    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((target != IGNORE_INDEX).sum())


def _loss_and_perplexity(total: float, count: int) -> dict[str, float]:
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def nll(logits: Any, labels: Any) -> tuple[float, int]:
    """Summed next-token cross-entropy over labelled (assistant) tokens, and their count."""
    import torch

    return _summed_cross_entropy(torch.as_tensor(logits, dtype=torch.float32)[:, :-1],
                                 torch.as_tensor(labels)[:, 1:])


def perplexity(forward: Callable[[Any, Any], Any], features: list[dict[str, list[int]]], batch_size: int,
               pad_id: int) -> dict[str, float]:
    """Token-weighted loss and perplexity; ``forward(input_ids, attention_mask) -> logits``."""
    total, count = 0.0, 0
    for batch in batches(by_length(features), batch_size, pad_id):
        s, n = nll(forward(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        total, count = total + s, count + n
    return _loss_and_perplexity(total, count)


def torch_perplexity(model: Any, features: list[dict[str, list[int]]], batch_size: int,
                     pad_id: int) -> dict[str, float]:
    """``perplexity`` of a PyTorch causal LM, computing the LM head only where it is scored.

    Batches are formed from length-sorted sequences (less padding), and the model is asked only
    for the logits at positions that predict an assistant token (``logits_to_keep``, the union over
    the batch): with a large vocabulary (262k tokens) the full ``[batch, seq, vocab]`` logits
    would be most of the compute and a GB of memory per batch. Same sum, same count as
    ``perplexity(torch_forward(model), ...)``."""
    import torch

    total, count = 0.0, 0
    for batch in batches(by_length(features), batch_size, pad_id):
        target = torch.as_tensor(batch["labels"])[:, 1:]
        keep = torch.nonzero((target != IGNORE_INDEX).any(0)).flatten()
        if not len(keep):
            continue
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                           logits_to_keep=keep).logits.float()
        s, n = _summed_cross_entropy(logits, target[:, keep])
        total, count = total + s, count + n
    return _loss_and_perplexity(total, count)


def torch_distortion(model: Any, features: list[dict[str, list[int]]], batch_size: int,
                     pad_id: int) -> Callable[[], dict[str, float]]:
    """A scorer of the model against itself as it is now: each call returns the perplexity on
    ``features`` (as ``torch_perplexity``) and ``kl``, the mean per scored token of
    ``KL(reference || now)`` over the next-token distributions, the reference being the model's
    when the scorer was made (its log-probabilities at the scored positions are kept, fp16).

    Why KL to rank quantization damage, not the perplexity change: a quantized layer moves each
    token's loss up or down, so on a few dozen rows the perplexity change of one layer is noise of
    either sign (on one bundled model one block measured +0.07% on one 32-row set and +1.7% on
    another); the divergence is never negative and averages the whole distribution at every
    position (the KLD that GGUF quantization tools report)."""
    import torch

    plan = []
    for batch in batches(by_length(features), batch_size, pad_id):
        target = torch.as_tensor(batch["labels"])[:, 1:]
        keep = torch.nonzero((target != IGNORE_INDEX).any(0)).flatten()
        if len(keep):
            plan.append((batch, keep, target[:, keep]))
    reference: list[Any] = []

    def run() -> dict[str, float]:
        total, count, kl = 0.0, 0, 0.0
        for i, (batch, keep, target) in enumerate(plan):
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False, logits_to_keep=keep).logits.float()
                s, n = _summed_cross_entropy(logits, target)
                total, count = total + s, count + n
                logq = torch.log_softmax(logits[target != IGNORE_INDEX], dim=-1)
                if len(reference) <= i:
                    reference.append(logq.to(torch.float16))
                else:
                    ref = reference[i].float()
                    kl += float((ref.exp() * (ref - logq)).sum())
        return {**_loss_and_perplexity(total, count), "kl": kl / max(count, 1)}

    run()
    return run


def torch_forward(model: Any) -> Callable[[Any, Any], Any]:
    import torch

    def forward(input_ids: Any, attention_mask: Any) -> Any:
        with torch.inference_mode():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return forward
