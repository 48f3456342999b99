"""The one decode loop (``tuneops.inference.decode``): greedy decoding of a PyTorch model equals
Hugging Face ``generate`` token for token (a batch of prompts of different lengths, left-padded,
rows stopping at different steps), prompt tuning's virtual tokens are decoded like a full
recompute, the cacheless path equals the cached one, seeded sampling replays, and no other
decode loop exists in the source tree."""
from __future__ import annotations

import ast
import re

import numpy as np
import pytest

from ..conftest import REPO
from ..family_models import CASES, build_model, build_tokenizer

TEXTS = ["Hi there", "The quick brown fox jumps over the lazy dog. What is two plus two? Four.",
         "Tell me a joke"]
NEW = 12


def _hf_generate(model, prompts, pad, stop, new=NEW):
    """``model.generate`` greedy on the left-padded batch, each row cut after its first stop id."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             eos_token_id=list(stop) or [10 ** 6], pad_token_id=pad)    # 10**6: no stop id
    return [row[:next((i + 1 for i, t in enumerate(row) if t in stop), len(row))]
            for row in out[:, width:].tolist()]


@pytest.mark.parametrize("family", ["llama3", "qwen2", "phi3", "mistral", "gemma3"])
def test_greedy_batch_is_token_identical_to_hf_generate(family):
    """Prompts of 3 to 30 tokens (longer than the sliding window of Mistral and Gemma 3), a stop id
    that ends one row early while another runs to the limit."""
    from tuneops.inference.decode import generate_ids
    from tuneops.inference.runtimes import TorchCausalLM

    tok = build_tokenizer(CASES[family])
    model = build_model(family, tok).eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in prompts}) == 3 and max(map(len, prompts)) > 8
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    free = _hf_generate(model, prompts, pad, ())
    assert generate_ids(TorchCausalLM(model), prompts, NEW, pad_id=pad) == free
    # a stop id some row reaches early and some row never reaches
    stop = next({t} for t in free[1][1:] if any(t not in row for row in free))
    ref = _hf_generate(model, prompts, pad, stop)
    assert min(map(len, ref)) < NEW == max(map(len, ref))
    assert generate_ids(TorchCausalLM(model), prompts, NEW, stop, pad_id=pad) == ref


def test_tiny_model_replies_equal_hf_generate(stage, tiny_cfg, tokenizer):
    """The pipeline's tiny Gemma 3 (262k vocabulary, its real chat template and stop ids):
    evaluate's replies (``reply_ids``) == ``model.generate`` as evaluate called it before."""
    import torch

    from tuneops.inference.chat import prompt_ids, stop_ids
    from tuneops.inference.decode import reply_ids
    from tuneops.models import load_causal_lm

    model = load_causal_lm(tiny_cfg.path("base_model_dir")).eval()
    convs = [[{"role": "user", "content": t}] for t in TEXTS]
    prompts = [prompt_ids(tokenizer, c) for c in convs]
    stop = stop_ids(tokenizer, model.generation_config)
    pad = tokenizer.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             eos_token_id=stop, pad_token_id=pad)
    ref = [row[:next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in out[:, width:].tolist()]
    assert reply_ids(model, tokenizer, convs, NEW) == ref


def test_prompt_tuning_decodes_like_a_full_recompute():
    """A peft prompt-tuned model: the virtual tokens prefix every row at the prefill and stay in the
    cache; each greedy token equals the argmax of a full forward of the whole sequence so far."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from tuneops.inference.decode import generate_ids
    from tuneops.inference.runtimes import TorchCausalLM

    tok = build_tokenizer(CASES["llama3"])
    torch.manual_seed(1)
    model = get_peft_model(build_model("llama3", tok), PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4, prompt_tuning_init=PromptTuningInit.RANDOM)).eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:2]]
    expected = []
    for p in prompts:
        seq = list(p)
        for _ in range(8):
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                               use_cache=False).logits
            seq.append(int(logits[0, -1].argmax()))
        expected.append(seq[len(p):])
    assert [generate_ids(TorchCausalLM(model), [p], 8)[0] for p in prompts] == expected
    assert generate_ids(TorchCausalLM(model), prompts, 8, pad_id=tok.pad_token_id or 0) == expected


class FullRecompute:
    """A runtime without a cache (like a fixed-shape accelerator graph): full-sequence logits."""

    has_cache = False

    def __init__(self, model):
        from tuneops.inference.scoring import torch_forward

        self.forward = torch_forward(model)

    def __call__(self, input_ids, attention_mask):
        import torch

        return self.forward(torch.as_tensor(input_ids), torch.as_tensor(attention_mask)).float().numpy()


def test_the_cacheless_path_decodes_like_the_cache_and_stream_drops_the_stop_token():
    from tuneops.inference.decode import generate_ids, stream
    from tuneops.inference.runtimes import TorchCausalLM

    tok = build_tokenizer(CASES["qwen2"])
    model = build_model("qwen2", tok).eval()
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    cached = generate_ids(TorchCausalLM(model), prompts, 8, pad_id=tok.pad_token_id)
    assert generate_ids(FullRecompute(model), prompts, 8) == cached
    stop = {cached[0][3]}
    cut = cached[0][:cached[0].index(cached[0][3])]
    assert list(stream(TorchCausalLM(model), prompts[0], 8, stop)) == cut
    assert generate_ids(TorchCausalLM(model), prompts[:1], 8, stop)[0] == cut + [cached[0][3]]
    assert generate_ids(TorchCausalLM(model), prompts, [2, 0, 5], pad_id=tok.pad_token_id) == \
        [cached[0][:2], [], cached[2][:5]]


def test_seeded_sampling_replays_and_top_k_1_is_greedy():
    from tuneops.inference.decode import generate_ids
    from tuneops.inference.runtimes import TorchCausalLM
    from tuneops.inference.sampling import sampler

    tok = build_tokenizer(CASES["llama3"])
    lm = TorchCausalLM(build_model("llama3", tok).eval())
    prompt = [tok(TEXTS[0], add_special_tokens=False)["input_ids"]]

    def run(seed, **kw):
        return generate_ids(lm, prompt, 10, pick=sampler(True, seed=seed, **{"temperature": 1.5, **kw}))[0]
    assert run(3) == run(3)
    assert len({tuple(run(s)) for s in (3, 4, 5)}) > 1
    assert run(3, top_k=1) == run(4, top_p=1e-9) == generate_ids(lm, prompt, 10)[0]
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampler(True, temperature=0)


# -- one decode loop --------------------------------------------------------------------------------

SOURCES = ("tuneops", "tasks", "flows", "bench")
STEPS = re.compile(r"^step$")                      # a runtime's step(...)
MODEL_KWARGS = {"use_cache", "past_key_values", "cache"}   # a PyTorch model with a KV cache (not use_cache=False)
PICKS = re.compile(r"argmax|multinomial|pick|sampl")       # the next token chosen from the logits


def _name(func: ast.AST) -> str:
    while isinstance(func, ast.Subscript):
        func = func.value
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def decode_loops(source: str) -> list[int]:
    """Line numbers of the token-by-token loops in ``source``: a ``for`` / ``while`` whose body both
    steps a model (a ``step(...)`` call, or a call with ``use_cache`` / ``past_key_values`` /
    ``cache``) and chooses a token (a call to ``argmax``, ``multinomial``, a picker or sampler)."""
    found = []
    for loop in ast.walk(ast.parse(source)):
        if not isinstance(loop, (ast.For, ast.While)):
            continue
        calls = [n for stmt in loop.body for n in ast.walk(stmt) if isinstance(n, ast.Call)]
        steps = any(STEPS.match(_name(c.func)) or any(
            k.arg in MODEL_KWARGS and not (isinstance(k.value, ast.Constant) and k.value.value is False)
            for k in c.keywords) for c in calls)
        picks = any(PICKS.search(_name(c.func)) for c in calls)
        if steps and picks:
            found.append(loop.lineno)
    return found


def hf_generate_calls(source: str) -> list[int]:
    """Line numbers of ``<something>.generate(...)`` calls (Hugging Face's own decode loop)."""
    return [n.lineno for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "generate"]


def test_the_detector_finds_the_old_loops():
    """Both loops the codebase had before (``OnnxCausalLM.stream``, bench's engines) and HF generate."""
    old_stream = '''
def stream(self, prompt_ids, max_new_tokens, stop, pick):
    logits, cache = self.step(ids, np.ones_like(ids), self.empty_cache(1))
    for _ in range(max_new_tokens):
        nxt = pick(logits[0, -1])
        logits, cache = self.step(np.array([[nxt]], np.int64), np.ones((1, length), np.int64), cache)
'''
    bench = '''
for _ in range(n):
    out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
    token = int(out.logits[0, -1].argmax())
'''
    teacher_forced = '''
for t in range(split, n):
    logits, cache = lm.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), cache)
    parts.append(logits)
'''
    scoring = '''
for batch in batches:
    pred = model(input_ids=batch, use_cache=False).logits.argmax(-1)
'''
    assert decode_loops(old_stream) == [4] and decode_loops(bench) == [2]
    assert decode_loops(teacher_forced) == decode_loops(scoring) == []
    assert hf_generate_calls("out = model.generate(input_ids=ids, max_new_tokens=8)") == [1]


def test_exactly_one_decode_loop_in_the_source_tree():
    """Every generation (``tuneops generate``, serve, the jobs API, the pyfunc, evaluate, the
    benchmarks) goes through ``tuneops/inference/decode.py``: it holds the only token-by-token loop,
    and nothing outside the tests calls Hugging Face ``generate``."""
    loops, generate = {}, {}
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            source = path.read_text(encoding="utf-8")
            if lines := decode_loops(source):
                loops[rel] = lines
            if lines := hf_generate_calls(source):
                generate[rel] = lines
    assert list(loops) == ["tuneops/inference/decode.py"] and len(loops["tuneops/inference/decode.py"]) == 1, loops
    assert generate == {}, f"Hugging Face generate outside the decode loop: {generate}"


def test_a_graph_without_positions_prefills_prompts_of_one_length_together_and_decodes_them_right_padded():
    """The real graph's tokens: tests/inference/test_adapter_pool.py (builder graphs)."""
    from tuneops.inference.decode import Batch, Prefix, Row, decode

    class RightPaddedOnly:
        has_cache, left_padding, path = True, False, "model.onnx"

        def __init__(self):
            self.masks = []

        def empty_cache(self, batch):
            return {}

        def step(self, ids, mask, cache, last=False):
            self.masks.append(mask.tolist())
            return np.zeros((ids.shape[0], 1, 4), np.float32), cache

    with pytest.raises(ValueError, match="prefill prompts of different lengths apart"):
        Batch(RightPaddedOnly()).start([Row([1, 2], 2), Row([3], 2)])
    prefix = Prefix([1])
    prefix.cache = {}
    with pytest.raises(ValueError, match="from a prefix one at a time"):
        Batch(RightPaddedOnly()).start([Row([1, 2], 2), Row([1, 3], 2)], prefix)
    lm = RightPaddedOnly()
    assert list(decode(lm, [[1, 2], [3]], [2, 3])) == [[0, 0], [0, 0], [None, 0]]
    # one prefill per length, then each row's token after its own past: the mask's ones stay left
    assert lm.masks == [[[1]], [[1, 1]], [[1, 1, 0], [1, 1, 1]], [[1, 1, 1]]]   # [3] first (the shorter)
