"""Log-probabilities of tokens: of the tokens a reply is decoded into (OpenAI ``logprobs`` /
``top_logprobs``) and of a prompt's own tokens (``/v1/completions`` with ``echo``).

A reply's are recorded by a picker wrapper (``recording``), as ``constrain.masked`` wraps the picker:
the picker sees each logits row of the one decode loop, so the wrapper takes the log-softmax of that
row, notes the chosen token's log-probability and the ``top`` likeliest tokens, and passes the row
on. The row it sees is the model's, before any grammar mask and at temperature 1 (what OpenAI and
vLLM report: the model's distribution, not the sampler's). A prompt's are a forward over the runtime
(``prompt_logprobs``, the same contract as ``tuneops.inference.scoring``): position ``i``'s logits
score token ``i + 1``; the first token has none.

Token text: each token's bytes come from llguidance's view of the tokenizer (byte-level BPE,
SentencePiece byte fallback and ``▁`` spaces alike); a token that is not valid UTF-8 on its own
(part of a character) is written ``bytes:\\xe2\\x80`` as OpenAI writes it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from .sampling import Picker

MAX_TOP = 20                 # top_logprobs (chat) and logprobs (completions) at most, as OpenAI
PROMPT_CHUNK = 256           # prompt tokens per forward when a prompt is scored with a KV cache


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)    # likeliest first


def entry(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under the logits ``row`` and the ``top`` likeliest tokens."""
    z = np.asarray(row, dtype=np.float64)
    peak = z.max()
    lse = peak + np.log(np.exp(z - peak).sum())
    best: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, len(z))
        idx = np.argpartition(-z, k - 1)[:k]
        idx = idx[np.lexsort((idx, -z[idx]))]         # likeliest first; a tie: the lower id first (argmax's)
        best = [(int(i), float(z[i] - lse)) for i in idx]
    return TokenLogprob(int(token), float(z[token] - lse), best)


def recording(pick: Picker, top: int, out: list[TokenLogprob]) -> Picker:
    """``pick``, noting each picked token's ``TokenLogprob`` (with ``top`` alternatives) in ``out``."""

    def recorded(row: np.ndarray) -> int:
        token = pick(row)
        out.append(entry(row, token, top))
        return token
    return recorded


def prompt_logprobs(runtime: Any, ids: Sequence[int], top: int = 0,
                    chunk: int = PROMPT_CHUNK) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (``None`` for the first), from
    forwards over the runtime: chunks of ``chunk`` tokens through the KV cache (the logits of one
    chunk at a time are in memory, not the whole prompt's), or one full forward for a graph
    without a cache."""
    ids = [int(t) for t in ids]
    out: list[TokenLogprob | None] = [None]
    if len(ids) < 2:
        return out[:len(ids)]

    def score(logits: np.ndarray, start: int) -> None:     # logits[j] scores ids[start + j + 1]
        for j in range(len(logits)):
            if start + j + 1 < len(ids):
                out.append(entry(logits[j], ids[start + j + 1], top))

    if not getattr(runtime, "has_cache", False):
        score(np.asarray(runtime(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64)))[0], 0)
        return out
    cache = runtime.empty_cache(1)
    for start in range(0, len(ids) - 1, chunk):
        piece = ids[start:start + chunk]
        mask = np.ones((1, start + len(piece)), np.int64)
        logits, cache = runtime.step(np.array([piece], np.int64), mask, cache)
        score(np.asarray(logits)[0], start)
    return out


# -- token text -----------------------------------------------------------------------------------------

def token_bytes(tokenizer: Any, stop: Iterable[int], token: int) -> bytes:
    """The bytes a token stands for (a special token: its text)."""
    from .constrain import ll_tokenizer

    special = _specials(tokenizer)
    if token in special:
        return special[token].encode()
    try:
        return bytes(ll_tokenizer(tokenizer, stop).decode_bytes([int(token)]))
    except Exception:  # noqa: BLE001 - an id past llguidance's vocabulary (padding rows of the LM head)
        return tokenizer.decode([int(token)]).encode()


def _specials(tokenizer: Any) -> dict[int, str]:
    cached = getattr(tokenizer, "_tuneops_specials", None)
    if cached is None:
        cached = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                  if getattr(t, "special", False)}
        for t, i in zip(getattr(tokenizer, "all_special_tokens", []) or [], getattr(tokenizer, "all_special_ids", []) or []):
            cached.setdefault(int(i), t)
        try:
            tokenizer._tuneops_specials = cached
        except Exception:  # noqa: BLE001 - a tokenizer that takes no attributes: no caching
            pass
    return cached


def token_text(raw: bytes) -> str:
    """A token's text as OpenAI writes it: UTF-8, else ``bytes:\\xNN...``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class Texts:
    """Token id -> (text, bytes) for one tokenizer, memoised."""

    def __init__(self, tokenizer: Any, stop: Iterable[int]):
        self.tokenizer, self.stop, self.memo = tokenizer, tuple(stop), {}

    def __call__(self, token: int) -> tuple[str, bytes]:
        got = self.memo.get(token)
        if got is None:
            raw = token_bytes(self.tokenizer, self.stop, token)
            got = self.memo[token] = (token_text(raw), raw)
        return got


def chat_content(entries: Sequence[TokenLogprob], texts: Texts) -> list[dict[str, Any]]:
    """``choices[].logprobs.content`` of a chat completion (OpenAI's shape)."""
    out = []
    for e in entries:
        text, raw = texts(e.token)
        tops = []
        for t, lp in e.top:
            tt, tb = texts(t)
            tops.append({"token": tt, "logprob": lp, "bytes": list(tb)})
        out.append({"token": text, "logprob": e.logprob, "bytes": list(raw), "top_logprobs": tops})
    return out


def legacy(entries: Sequence[TokenLogprob | None], tokens: Sequence[int], texts: Texts,
           start: int = 0) -> dict[str, list[Any]]:
    """``choices[].logprobs`` of a legacy completion: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (``{text: logprob}``; ``None`` where a token has no log-probability) and ``text_offset`` (where each
    token's text starts: ``start`` plus the lengths of the token texts before it)."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    at = start
    for token, e in zip(tokens, entries):
        text = texts(token)[0]
        out["tokens"].append(text)
        out["text_offset"].append(at)
        at += len(text)
        out["token_logprobs"].append(None if e is None else e.logprob)
        if e is None:
            out["top_logprobs"].append(None)
        else:
            top: dict[str, float] = {}
            for t, lp in e.top:
                top.setdefault(texts(t)[0], lp)
            out["top_logprobs"].append(top)
    return out
