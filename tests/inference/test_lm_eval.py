"""lm-evaluation-harness against `tuneops serve` (issue 32), offline: a custom generation task
(``generate_until``) and a custom log-likelihood task (``multiple_choice``) through its
``local-completions`` backend (``/v1/completions``: token-id prompts, ``echo`` + ``logprobs`` for
log-likelihoods), and the generation task through ``local-chat-completions`` too. The tokenizer that
``local-completions`` needs comes from the served model's own folder (no hub).

What lm-eval reports is checked against the model itself: each choice's log-likelihood equals the
sum of the continuation tokens' log-probabilities computed here with a forward over the same ONNX
graph (``tuneops.inference.runtimes.OnnxCausalLM``), its accuracy the accuracy of those numbers, and
each generation equals the engine's greedy continuation of the same prompt up to the task's stop
string.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from .conftest import InProcess


pytestmark = pytest.mark.pipeline          # a server in a thread; lm-eval's two runs take a few seconds

QUESTIONS = [
    {"question": "What is two plus two?", "choices": ["Four.", "Five.", "The road."], "label": 0},
    {"question": "Why did the chicken cross the road?", "choices": ["To get to the other side.", "Four.",
                                                                    "I am fine."], "label": 0},
    {"question": "Hi there! Hello, how are you?", "choices": ["I am fine, thank you.", "The lazy dog.",
                                                               "Tell me a joke."], "label": 0},
    {"question": "Tell me a joke.", "choices": ["Why did the chicken cross the road?", "0123", "Be brief."],
     "label": 0},
    {"question": "The quick brown fox jumps over the", "choices": ["lazy dog.", "road.", "thank you."], "label": 0},
    {"question": "What is your answer?", "choices": ["Four.", "Hello.", "The fox."], "label": 2},
]
GEN_UNTIL = "o"            # a stop string the random model writes within a few tokens


def _tasks(folder, data) -> None:
    """Two custom tasks (lm-eval YAML) over a local JSON-lines file (the ``json`` dataset builder: offline)."""
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
              "doc_to_text": "{{question}}"}
    mc = {"task": "tuneops_mc", **common, "output_type": "multiple_choice", "doc_to_choice": "{{choices}}",
          "doc_to_target": "{{label}}", "metric_list": [{"metric": "acc"}]}
    gen = {"task": "tuneops_gen", **common, "output_type": "generate_until", "doc_to_target": "{{choices[label]}}",
           "generation_kwargs": {"until": [GEN_UNTIL], "max_gen_toks": 12, "do_sample": False, "temperature": 0},
           "metric_list": [{"metric": "exact_match"}, {"metric": "bleu"}]}
    import yaml

    for cfg in (mc, gen):
        (folder / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg))


@pytest.fixture(scope="module")
def served(chat_model_dir):
    srv = InProcess.serving("serve-lm-eval", chat_model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory):
    from lm_eval.tasks import TaskManager

    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    _tasks(folder, data)
    return TaskManager(include_path=str(folder), include_defaults=False)


def _evaluate(model: str, args: dict, tasks: list[str], manager, **kw) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager, log_samples=True,
                           bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                           fewshot_random_seed=0, **kw)


def _loglikelihood(lm, tokenizer, context: str, continuation: str) -> float:
    """Sum of the continuation tokens' log-probabilities after the context, one full forward (as lm-eval
    splits them: the context's tokens, then the continuation's)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = ctx + cont
    logits = np.asarray(lm(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64)))[0].astype(np.float64)
    logp = logits - (logits.max(-1, keepdims=True) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                                     keepdims=True)))
    return float(sum(logp[len(ctx) + j - 1, t] for j, t in enumerate(cont)))


def test_lm_eval_local_completions_runs_both_tasks(served, task_manager, chat_model_dir):
    from transformers import AutoTokenizer

    from tuneops.inference.runtimes import OnnxCausalLM

    args = {"model": "tiny-chat", "base_url": f"{served.base_url}/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(chat_model_dir), "num_concurrent": 1, "max_retries": 1, "batch_size": 2}
    out = _evaluate("local-completions", args, ["tuneops_mc", "tuneops_gen"], task_manager)
    tok = AutoTokenizer.from_pretrained(str(chat_model_dir))
    lm = OnnxCausalLM(chat_model_dir / "model.onnx")

    # log-likelihoods: lm-eval's numbers are the model's
    samples = out["samples"]["tuneops_mc"]
    assert len(samples) == len(QUESTIONS)
    right = 0
    for s in samples:
        doc = s["doc"]
        got = [float(r[0][0]) for r in s["resps"]]
        want = [_loglikelihood(lm, tok, doc["question"], " " + c) for c in doc["choices"]]   # target_delimiter " "
        assert got == pytest.approx(want, abs=1e-3), (doc, got, want)
        right += int(np.argmax(want) == doc["label"])
    acc = out["results"]["tuneops_mc"]["acc,none"]
    assert acc == pytest.approx(right / len(QUESTIONS))
    print(f"\nlm-eval local-completions, tuneops_mc: acc {acc:.3f} over {len(QUESTIONS)} questions "
          f"(log-likelihoods equal to a direct forward within 1e-3)")

    # generations: lm-eval's are the engine's greedy continuations, cut at the task's stop string
    from tuneops.inference.engine import ChatEngine

    engine = ChatEngine(chat_model_dir / "model.onnx", chat_model_dir)
    gen = out["samples"]["tuneops_gen"]
    assert len(gen) == len(QUESTIONS)
    for s in gen:
        ids = tok(s["doc"]["question"], add_special_tokens=False)["input_ids"]
        want = "".join(engine.deltas(ids, 12, stop=[GEN_UNTIL]))
        assert s["resps"][0][0] == want, s
    print(f"lm-eval local-completions, tuneops_gen: {out['results']['tuneops_gen']}")


def test_lm_eval_local_chat_completions_runs_the_generation_task(served, task_manager):
    args = {"model": "tiny-chat", "base_url": f"{served.base_url}/chat/completions", "num_concurrent": 1,
            "max_retries": 1}
    out = _evaluate("local-chat-completions", args, ["tuneops_gen"], task_manager, apply_chat_template=True)
    gen = out["samples"]["tuneops_gen"]
    assert len(gen) == len(QUESTIONS) and all(isinstance(s["resps"][0][0], str) for s in gen)
    assert "exact_match,none" in out["results"]["tuneops_gen"]
    print(f"\nlm-eval local-chat-completions, tuneops_gen: {out['results']['tuneops_gen']}")
