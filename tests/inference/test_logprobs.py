"""Log-probabilities (tuneops.inference.logprobs): the picker wrapper records the model's row, a prompt
scored in chunks through the KV cache gives what one full forward gives, and token texts are OpenAI's."""
from __future__ import annotations

import numpy as np
import pytest

from tuneops.inference import logprobs
from tuneops.inference.sampling import greedy, sampler


def _log_softmax(row):
    z = np.asarray(row, np.float64)
    return z - (z.max() + np.log(np.exp(z - z.max()).sum()))


def test_entry_is_the_log_softmax_and_the_top_tokens_likeliest_first():
    row = np.array([1.0, 3.0, 3.0, -2.0, 0.5], np.float32)
    e = logprobs.entry(row, 4, 3)
    lsm = _log_softmax(row)
    assert e.token == 4 and e.logprob == pytest.approx(lsm[4])
    assert [t for t, _ in e.top] == [1, 2, 0]                   # a tie: the lower id first, as argmax
    assert [lp for _, lp in e.top] == pytest.approx([lsm[1], lsm[2], lsm[0]])
    assert logprobs.entry(row, 1, 0).top == [] and len(logprobs.entry(row, 1, 50).top) == 5


def test_recording_sees_the_row_before_the_sampler_and_passes_the_pick_through():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(40).astype(np.float32) * 3 for _ in range(20)]
    out: list = []
    hot = logprobs.recording(sampler(True, 2.0, seed=3), 5, out)
    plain = sampler(True, 2.0, seed=3)
    for row in rows:
        assert hot(row) == plain(row)                           # the same tokens as the sampler alone
    for row, e in zip(rows, out):
        assert e.logprob == pytest.approx(_log_softmax(row)[e.token])      # temperature 1: the model's
    out.clear()
    g = logprobs.recording(greedy, 1, out)
    for row in rows:
        g(row)
    assert all(e.top[0] == (e.token, e.logprob) for e in out)


@pytest.fixture(scope="module")
def lm(chat_model_dir):
    from tuneops.inference.runtimes import OnnxCausalLM

    return OnnxCausalLM(chat_model_dir / "model.onnx")


class NoCache:
    """The runtime as a graph without a KV cache (one full forward)."""

    has_cache = False

    def __init__(self, lm):
        self.lm = lm

    def __call__(self, ids, mask):
        return self.lm(ids, mask)


def test_prompt_logprobs_in_chunks_equal_one_full_forward(lm):
    ids = [int(i) for i in np.random.default_rng(1).integers(5, 300, 37)]
    full = logprobs.prompt_logprobs(NoCache(lm), ids, 3)
    assert full[0] is None and len(full) == len(ids)
    logits = np.asarray(lm(np.array([ids]), np.ones((1, len(ids)), np.int64)))[0]
    for i in range(1, len(ids)):
        assert full[i].token == ids[i] and full[i].logprob == pytest.approx(_log_softmax(logits[i - 1])[ids[i]],
                                                                            abs=1e-6)
    for chunk in (1, 5, 36, 37, 1000):
        got = logprobs.prompt_logprobs(lm, ids, 3, chunk=chunk)
        assert [e.token for e in got[1:]] == ids[1:]
        assert [e.logprob for e in got[1:]] == pytest.approx([e.logprob for e in full[1:]], abs=1e-4)
        assert [[t for t, _ in e.top] for e in got[1:]] == [[t for t, _ in e.top] for e in full[1:]]
    assert logprobs.prompt_logprobs(lm, ids[:1]) == [None]


def test_token_texts_are_utf8_or_openais_bytes_notation(chat_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(chat_model_dir))
    texts = logprobs.Texts(tok, [tok.eos_token_id])
    assert logprobs.token_text("é".encode()[:1]) == "bytes:\\xc3"
    ids = tok("Hello there, how are you?", add_special_tokens=False)["input_ids"]
    assert "".join(texts(i)[0] for i in ids) == "Hello there, how are you?"
    assert b"".join(texts(i)[1] for i in ids) == b"Hello there, how are you?"
    assert texts(tok.eos_token_id)[0] == tok.eos_token                  # a special token: its own text
