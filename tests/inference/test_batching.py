"""Continuous batching (issue 34): requests that join a running batch at different times, with
prompts of different lengths (a long one prefilled in chunks while the others decode), get the
tokens each gets decoded alone: greedy and seeded sampling, on the tiny fp32 ONNX chat model
(``chat_model_dir``) and on its weight-only int8 variant (``MatMulNBits``, int8 activations per
row). A request whose consumer stops reading or is cancelled leaves the batch at once; graphs that
cannot decode mixed lengths in one batch decode one request at a time."""
from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from tests.conftest import wait_for

MESSAGES = ["Hello", "What is the capital of France, and why is it there?", "hi",
            "Tell me a long story about dragons and knights. " * 6, "x y z", "2+2?"]
LIMITS = [90, 60, 75, 50, 40, 30]


def _engine(folder, **kw):
    from tuneops.inference.engine import ChatEngine

    return ChatEngine(folder / "model.onnx", folder, **kw)


def _alone(engine, prompts, picks):
    from tuneops.inference.decode import generate_ids

    out = []
    for p, n, pick in zip(prompts, LIMITS, picks):
        ids = generate_ids(engine.lm, [p], n, engine.stop, pick() if pick else None)[0]
        out.append([t for t in ids if t not in engine.stop])
    return out


def _staggered(engine, prompts, picks):
    """Each request is submitted once the one before has its first tokens: they join a batch that
    is decoding, at different times."""
    out: list[list[int] | None] = [None] * len(prompts)
    began = [threading.Event() for _ in prompts]

    def go(i):
        tokens = []
        for t in engine.batcher.submit(prompts[i], LIMITS[i], engine.stop, picks[i]() if picks[i] else None).tokens():
            tokens.append(t)
            if len(tokens) == 3:
                began[i].set()
        began[i].set()
        out[i] = tokens

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for i, t in enumerate(threads):
        t.start()
        assert began[i].wait(60)
    for t in threads:
        t.join(60)
    return out


def _picks():
    from tuneops.inference.sampling import sampler

    # greedy rows and seeded sampled rows: each row keeps its own picker
    return [None, lambda: sampler(True, 0.9, 0, 0.95, 7), None, None, lambda: sampler(True, 1.3, 20, 1.0, 3), None]


def test_rows_joining_at_different_times_decode_as_they_would_alone(chat_model_dir):
    engine = _engine(chat_model_dir, max_batch=8, max_batch_tokens=16)   # the long prompt: 16 tokens a boundary
    prompts = [engine.prompt([{"role": "user", "content": m}]) for m in MESSAGES]
    assert max(map(len, prompts)) > 4 * 16 and len(set(map(len, prompts))) > 3
    picks = _picks()
    assert _staggered(engine, prompts, picks) == _alone(engine, prompts, picks)
    assert engine.batcher.peak >= 3                         # they did decode together
    wait_for(lambda: engine.batcher.state()["batch"] == 0, 5, "the batch to empty", interval=0.02)


def test_int8_rows_batched_decode_as_they_would_alone(chat_model_dir, tmp_path):
    """Weight-only int8 (the `make run` int8 variant's quantizer, int8 activations quantized per
    row block): batching changes no row's arithmetic, so greedy tokens are identical too."""
    from tuneops.export.quantizers import quantize_nbits

    folder = tmp_path / "int8"
    shutil.copytree(chat_model_dir, folder, ignore=shutil.ignore_patterns("model.onnx*"))
    quantize_nbits(chat_model_dir / "model.onnx", folder / "model.onnx", 8, 32, 4)
    engine = _engine(folder, max_batch=8, max_batch_tokens=32)
    prompts = [engine.prompt([{"role": "user", "content": m}]) for m in MESSAGES]
    picks = [None] * len(prompts)
    assert _staggered(engine, prompts, picks) == _alone(engine, prompts, picks)


def test_a_request_that_stops_reading_or_is_cancelled_leaves_the_batch_at_once(chat_model_dir):
    from tuneops.inference.scheduler import Cancelled

    engine = _engine(chat_model_dir, max_batch=4, threads=1)
    prompt = engine.prompt([{"role": "user", "content": "Hello"}])
    keep = engine.batcher.submit(prompt, 100000, engine.stop, None).tokens()
    next(keep)
    closed = engine.batcher.submit(prompt, 100000, engine.stop, None).tokens()
    next(closed)
    cancel = threading.Event()
    cancelled = engine.batcher.submit(prompt, 100000, engine.stop, None, cancel).tokens()
    next(cancelled)
    wait_for(lambda: engine.batcher.state()["batch"] == 3, 5, "three rows", interval=0.02)
    closed.close()
    cancel.set()
    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        for _ in cancelled:
            pass
    wait_for(lambda: engine.batcher.state()["batch"] == 1, 1, "the two rows to leave", interval=0.02)
    assert time.monotonic() - t0 < 1
    next(keep)                                              # the one left goes on
    keep.close()
    wait_for(lambda: {k: engine.batcher.state()[k] for k in ("batch", "pending", "max_batch")}
             == {"batch": 0, "pending": 0, "max_batch": 4}, 1, "an empty batch", interval=0.02)


def test_only_graphs_without_a_cache_decode_one_request_at_a_time():
    from tuneops.inference.engine import Batcher

    class RightPadded:                  # an onnxruntime-genai builder graph: positions from the mask
        has_cache, left_padding, fixed_shape = True, False, None

    class FixedShape:                   # an accelerator graph: one static shape, no cache
        has_cache, left_padding, fixed_shape = False, True, (1, 64)

    class Positions:
        has_cache, left_padding, fixed_shape = True, True, None

    assert Batcher(RightPadded(), max_batch=8).max_batch == 8   # rows right-padded (tests/inference/test_adapter_pool.py)
    assert Batcher(FixedShape(), max_batch=8).max_batch == 1
    assert Batcher(Positions(), max_batch=8).max_batch == 8


def test_leaving_rows_trim_the_columns_every_row_masks(chat_model_dir):
    """The batch's mask and cache keep only the columns some row still attends to."""
    from tuneops.inference.decode import Batch, Row, run

    engine = _engine(chat_model_dir)
    short, long_ = [5, 6, 7], list(range(3, 40))
    batch = Batch(engine.lm)
    batch.prefill(batch.start([Row(long_, 2), Row(short, 6)]))
    widths = [batch.mask.shape[1] for _ in run(batch)]
    assert widths[:2] == [len(long_), len(long_) + 1]
    assert widths[2] == len(short) + 2                     # the long row left: its columns went with it
    assert np.all(batch.mask == 0) or batch.mask.shape[0] == 0


def test_a_failing_picker_fails_its_request_only(chat_model_dir):
    from tuneops.inference.sampling import greedy

    engine = _engine(chat_model_dir, max_batch=4, threads=1)
    prompt = engine.prompt([{"role": "user", "content": "Hello"}])
    calls = []

    def broken(row):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a grammar the picker could not follow")
        return greedy(row)

    good = engine.batcher.submit(prompt, 40, engine.stop, None).tokens()
    first = next(good)
    bad = engine.batcher.submit(prompt, 40, engine.stop, broken).tokens()
    with pytest.raises(RuntimeError, match="could not follow"):
        list(bad)
    assert [first, *good] == _alone(engine, [prompt], [None])[0][:40]


SYSTEM = "You are a careful assistant for a shipping company. Answer in one short sentence, politely."


@pytest.mark.parametrize("int8", [False, True])
def test_prompts_that_share_a_prefix_prefill_from_its_cache_and_decode_as_alone(chat_model_dir, tmp_path, int8):
    """Prefix caching: requests whose prompts share a system prompt (>= 16 tokens) start from its KV
    cache and compute only the rest, several in one prefill (left-padded after the prefix: the mask has
    a hole), and get the tokens each gets decoded alone from scratch; a burst and staggered arrivals."""
    folder = chat_model_dir
    if int8:
        from tuneops.export.quantizers import quantize_nbits

        folder = tmp_path / "int8"
        shutil.copytree(chat_model_dir, folder, ignore=shutil.ignore_patterns("model.onnx*"))
        quantize_nbits(chat_model_dir / "model.onnx", folder / "model.onnx", 8, 32, 4)
    engine = _engine(folder, max_batch=8, max_batch_tokens=64)
    prompts = [engine.prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": m}])
               for m in MESSAGES]
    assert min(len(p) for p in prompts) > 16
    picks = _picks() if not int8 else [None] * len(prompts)
    alone = _alone(engine, prompts, picks)
    assert _staggered(engine, prompts, picks) == alone
    state = engine.batcher.state()
    shared = state["prefix_tokens"]
    assert shared >= 16 * (len(prompts) - 1) and state["prefixes"] >= 1, state
    # a burst: every request at once, prefilled together from the prefix
    out: list[list[int] | None] = [None] * len(prompts)

    def go(i):
        pick = picks[i]() if picks[i] else None
        out[i] = list(engine.batcher.submit(prompts[i], LIMITS[i], engine.stop, pick).tokens())

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == alone
    assert engine.batcher.state()["prefix_tokens"] >= shared + 16 * len(prompts)


def test_prefix_caching_off_computes_every_prompt_whole(chat_model_dir):
    engine = _engine(chat_model_dir, max_batch=8, prefix_cache=0)
    prompts = [engine.prompt([{"role": "system", "content": SYSTEM}, {"role": "user", "content": m}])
               for m in MESSAGES[:3]]
    assert _staggered(engine, prompts, [None] * 3) == _alone(engine, prompts, [None] * 3)
    assert engine.batcher.state()["prefix_tokens"] == 0 and engine.batcher.state()["prefixes"] == 0


def test_a_prefix_is_learned_at_prefix_min_tokens_shared_within_prefix_window_prompts(chat_model_dir):
    """serve.prefix_min_tokens / serve.prefix_window: a prompt sharing fewer tokens than the minimum
    with every recent one learns nothing; one sharing enough with a prompt that has left the window
    of recent prompts learns nothing either; within it, the shared part becomes a prefix."""
    engine = _engine(chat_model_dir, max_batch=8, prefix_min_tokens=20, prefix_window=2)
    match = engine.batcher._match
    head = list(range(100, 120))                       # 20 tokens
    assert match(head + [1]) is None                   # the first prompt: nothing to compare with
    assert match([7] * 30) is None and match([8] * 30) is None   # the window (2) now holds only these
    assert match(head + [2]) is None                   # shares 20 with a prompt no longer in the window
    assert match(head[:19] + [3, 4]) is None           # shares 19 < 20 with the previous one
    got = match(head + [5, 6])                         # 20 with head + [2], two prompts back: learned
    assert got is not None and list(got.ids) == head
    assert match(head + [12]) is got                   # and used by the next one that starts with it
    assert engine.batcher.state()["prefixes"] == 1
