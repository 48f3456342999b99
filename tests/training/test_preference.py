"""Preference tuning spike (issue 33): rows -> pairs with named problems, chat-layer features, the
explicit reference model, and TRL's DPO loss on the tiny random Gemma-3 (unit tier: no project,
no stages; the model is built in memory and the tokenizer comes from the shared cache)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tuneops.data.chatterbot import preference_pairs
from tuneops.training import preference as pref

LN2 = math.log(2)
REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".tuneops" / "pytest" / "state" / "cache"      # conftest's state dir: the tokenizer cache
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def tok():
    from tuneops.models import gemma_tokenizer

    t = gemma_tokenizer(CACHE)
    if t.pad_token_id is None:
        t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tok) -> Path:
    """The tiny random Gemma-3 of the test suite (params.yaml model.tiny), saved once."""
    from tuneops.config import load_config
    from tuneops.models import _tiny

    d = tmp_path_factory.mktemp("tiny")
    model, _ = _tiny(CACHE, load_config(REPO / "params.yaml").model.tiny)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def load(tiny_dir: Path):
    from tuneops.models import load_causal_lm

    return lambda: load_causal_lm(tiny_dir)


def lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM", **kw)


WORDS = ["cat", "dog", "sun", "tree", "moon", "fish", "bird", "rain"]


def toy_rows() -> list[dict]:
    """Separable: the chosen reply always agrees, the rejected one always refuses."""
    return [{"input": {"messages": [{"role": "user", "content": f"Do you like the {w}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"Yes, I like the {w}."}],
             "non_preferred_output": [{"role": "assistant", "content": f"No. Never the {w}!"}]} for w in WORDS]


def feats(tok) -> list[dict]:
    pairs, problems = pref.check(enumerate(toy_rows(), 1), "toy.jsonl", tok, 256)
    assert not problems and len(pairs) == len(WORDS)
    return pref.features(pairs, tok, 256)


def step0(models, tok, tmp_path, beta=0.1, **kw) -> dict:
    """The preference metrics before any step (the trainer's own DPO loss on the toy pairs)."""
    args = pref.dpo_config(tmp_path / "out", beta=beta, max_steps=1, per_device_train_batch_size=4,
                           per_device_eval_batch_size=8, learning_rate=1e-2, **kw)
    t = pref.trainer(models, feats(tok), tok, args)
    return pref.scores(t, feats(tok))


# -- rows ---------------------------------------------------------------------------------------------

def test_openai_and_trl_rows_become_the_same_pair():
    q, good, bad = "What is 2+2?", "4.", "5."
    rows = [
        {"input": {"messages": [{"role": "user", "content": q}]},
         "preferred_output": [{"role": "assistant", "content": good}],
         "non_preferred_output": [{"role": "assistant", "content": bad}]},
        {"prompt": q, "chosen": good, "rejected": bad},
        {"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": good}],
         "rejected": [{"role": "assistant", "content": bad}]},
        {"chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
         "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}]},
    ]
    pairs, problems = pref.check(enumerate(rows, 1), "p.jsonl")
    assert problems == []
    assert [p.source for p in pairs] == ["openai", "trl_text", "trl_messages", "trl_implicit"]
    for p in pairs:
        assert (p.prompt, p.chosen["content"], p.rejected["content"]) == ([{"role": "user", "content": q}], good, bad)
    assert pairs[0].to_openai() == rows[0]


def test_openai_row_keeps_tools():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    row = {"input": {"messages": [{"role": "user", "content": "add 2 and 2"}], "tools": tools},
           "preferred_output": [{"role": "assistant", "content": "4"}],
           "non_preferred_output": [{"role": "assistant", "content": "22"}]}
    pair, issues = pref.parse(row)
    assert issues == [] and pair.tools == tools


def test_tools_reach_the_template(tok):
    from tuneops.inference import chat

    tools = [{"type": "function", "function": {"name": "add", "description": "add numbers",
                                               "parameters": {"type": "object", "properties": {}}}}]
    row = {"input": {"messages": [{"role": "user", "content": "add 2 and 2"}], "tools": tools},
           "preferred_output": [{"role": "assistant", "content": "4"}],
           "non_preferred_output": [{"role": "assistant", "content": "22"}]}
    f = pref.encode(pref.parse(row)[0], tok)
    marker = tok(chat.end_marker(tok), add_special_tokens=False)["input_ids"]
    assert f["chosen_ids"][-len(marker):] == marker and tok.decode(f["chosen_ids"]).startswith("4")


@pytest.mark.parametrize("row, field, rule", [
    ({"input": {"messages": [{"role": "user", "content": "hi"}]},
      "preferred_output": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
      "non_preferred_output": [{"role": "assistant", "content": "c"}]}, "preferred_output", "one_assistant"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}]},
      "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "user", "content": "c"}]}, "non_preferred_output", "one_assistant"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}]},
      "preferred_output": [{"role": "assistant", "content": "same"}],
      "non_preferred_output": [{"role": "assistant", "content": " same "}]}, "non_preferred_output", "identical"),
    ({"prompt": "hi", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "b"}]},
     "rejected[0]", "prompt_prefix"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "(record)", "format"),
    ({"input": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
      "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "b"}]}, "input.messages[1].role", "prompt_end"),
    ({"input": {}, "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "b"}]}, "input.messages", "required"),
    ({"prompt": "hi", "chosen": "a", "rejected": 3}, "rejected", "type"),
])
def test_bad_rows_name_line_field_and_rule(row, field, rule):
    pairs, problems = pref.check([(7, {"prompt": "ok", "chosen": "a", "rejected": "b"}), (8, row)], "bad.jsonl")
    assert len(pairs) == 1 and pairs[0].line == 7
    assert [(p.path, p.line, p.field, p.rule) for p in problems][:1] == [("bad.jsonl", 8, field, rule)]
    assert str(problems[0]).startswith(f"bad.jsonl:8: {field}: {rule}: ")


def test_bad_json_line_is_a_problem(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n\n{oops\n")
    pairs, problems = pref.check(pref.read_jsonl(f), str(f))
    assert len(pairs) == 1 and [(p.line, p.rule) for p in problems] == [(3, "json")]


def test_max_tokens_with_the_models_tokenizer(tok):
    row = {"prompt": "hi", "chosen": "short", "rejected": "word " * 80}
    pairs, problems = pref.check([(1, row)], "long.jsonl", tok, max_len=40)
    assert pairs == [] and [(p.field, p.rule) for p in problems] == [("rejected", "max_tokens")]
    assert pref.check([(1, row)], "long.jsonl", tok, max_len=200)[1] == []


def test_beta_and_loss_type_are_checked(tmp_path):
    with pytest.raises(ValueError, match="train.beta"):
        pref.dpo_config(tmp_path, beta="auto-ish")
    with pytest.raises(ValueError, match="train.loss_type"):
        pref.dpo_config(tmp_path, loss_type="orpo")     # ORPO is trl.experimental's own trainer
    with pytest.raises(ValueError, match="train.reference"):
        pref.build_models(lambda: None, reference="sft")


# -- features -------------------------------------------------------------------------------------------

def test_features_are_the_chat_layers_labels(tok):
    from tuneops.inference import chat

    pair = pref.parse(toy_rows()[0])[0]
    f = pref.encode(pair, tok)
    enc = chat.tokenize(pair.conversation("chosen"), tok, 10**6)
    labelled = [i for i, lab in enumerate(enc["labels"]) if lab != chat.IGNORE_INDEX]
    # the prompt is every token before the reply; chosen_ids are exactly the labelled tokens
    assert f["prompt_ids"] == enc["input_ids"][:labelled[0]]
    assert f["chosen_ids"] == [enc["input_ids"][i] for i in labelled]
    assert labelled == list(range(labelled[0], labelled[-1] + 1))
    marker = tok(chat.end_marker(tok), add_special_tokens=False)["input_ids"]
    assert f["chosen_ids"][-len(marker):] == marker and f["rejected_ids"][-len(marker):] == marker
    assert f["prompt_ids"].count(tok.bos_token_id) == 1


# -- DPO on the tiny model -------------------------------------------------------------------------------

@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
def test_step0_loss_is_ln2_and_rewards_zero(tiny_dir, tok, tmp_path, peft):
    models = pref.build_models(load(tiny_dir), peft_config=lora() if peft else None)
    s = step0(models, tok, tmp_path)
    assert s["loss"] == pytest.approx(LN2, abs=1e-4)
    assert s["reward_chosen"] == pytest.approx(0, abs=1e-4) and s["reward_rejected"] == pytest.approx(0, abs=1e-4)
    assert s["margin"] == pytest.approx(0, abs=1e-4)


def test_precomputed_reference_step0_is_ln2(tiny_dir, tok, tmp_path):
    models = pref.build_models(load(tiny_dir), reference="precomputed")
    assert models.precompute and models.ref_model is None and "computed once" in models.record["reference_model"]
    args = pref.dpo_config(tmp_path / "out", max_steps=1, per_device_train_batch_size=8, learning_rate=1e-2)
    t = pref.trainer(models, feats(tok), tok, args)
    assert "ref_chosen_logps" in t.train_dataset.column_names
    t.train()
    first = t.state.log_history[0]
    assert first["loss"] == pytest.approx(LN2, abs=1e-4) and first["rewards/margins"] == pytest.approx(0, abs=1e-4)


def test_dpo_learns_a_separable_preference_and_lora_keeps_the_base(tiny_dir, tok, tmp_path):
    import torch

    models = pref.build_models(load(tiny_dir), peft_config=lora())
    base = {k: v.detach().clone() for k, v in models.policy.named_parameters()}
    args = pref.dpo_config(tmp_path / "out", beta=0.5, max_steps=12, per_device_train_batch_size=4,
                           per_device_eval_batch_size=8, learning_rate=2e-2, seed=0)
    t = pref.trainer(models, feats(tok), tok, args)
    assert list(t.model.peft_config) == ["default"]             # a fresh adapter: reference = adapter disabled
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    assert logs[0]["loss"] == pytest.approx(LN2, abs=1e-4)
    assert all(k in logs[0] for k in pref.PREFERENCE_METRICS)
    s = pref.scores(t, feats(tok))
    assert s["margin"] > 0 and s["accuracy"] > 0.5 and s["loss"] < LN2
    after = dict(t.model.get_base_model().named_parameters())
    frozen = {k: v for k, v in after.items() if "lora_" not in k}
    assert len(frozen) == len(base)
    assert all(torch.equal(base[k.replace(".base_layer", "")], v) for k, v in frozen.items())   # base untouched
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if "lora_B" in k)


@pytest.fixture(scope="module")
def sft_adapter(tiny_dir, tmp_path_factory) -> Path:
    """An 'SFT' LoRA adapter that moves the model away from the base (random, non-zero B)."""
    import torch
    from peft import get_peft_model

    torch.manual_seed(1)
    m = get_peft_model(load(tiny_dir)(), lora(init_lora_weights=False))
    with torch.no_grad():
        for k, v in m.named_parameters():
            if "lora_B" in k:
                v.normal_(0, 0.5)
    d = tmp_path_factory.mktemp("sft-adapter")
    m.save_pretrained(d)
    return d


@pytest.mark.parametrize("adapter", ["new", "continue"])
def test_sft_then_dpo_uses_the_sft_model_as_reference(tiny_dir, tok, tmp_path, sft_adapter, adapter):
    """Starting from an SFT adapter, the reference is the SFT model: step 0 is ln 2 with zero
    rewards. The same run with the base as reference (what 'adapter disabled' gives when the new
    adapter sits on an unmerged SFT adapter) is not at ln 2 and has non-zero rewards, so this test
    fails if the reference were the base."""
    kw = dict(peft_config=lora(), start_adapter=sft_adapter, adapter=adapter)
    right = pref.build_models(load(tiny_dir), reference="start", **kw)
    assert right.record["start"] == str(sft_adapter) and right.record["reference"] == "start"
    s = step0(right, tok, tmp_path / "start", beta=1.0)
    assert s["loss"] == pytest.approx(LN2, abs=1e-4)
    assert s["reward_chosen"] == pytest.approx(0, abs=1e-4) and s["reward_rejected"] == pytest.approx(0, abs=1e-4)

    wrong = pref.build_models(load(tiny_dir), reference="base", **kw)
    assert wrong.record["reference_model"] == "a separate frozen copy of the base model"
    w = step0(wrong, tok, tmp_path / "base", beta=1.0)
    assert abs(w["loss"] - LN2) > 1e-3
    assert abs(w["reward_chosen"]) > 1e-2 and abs(w["reward_rejected"]) > 1e-2


def test_sft_then_full_dpo_uses_the_merged_sft_model_as_reference(tiny_dir, tok, tmp_path, sft_adapter):
    """Full fine-tuning from an SFT adapter: TRL alone (ref_model=None) would reload the reference
    from ``config._name_or_path``, the base folder; build_models hands it a frozen copy of the
    merged SFT model instead."""
    from trl.trainer.utils import get_config_model_id

    models = pref.build_models(load(tiny_dir), start_adapter=sft_adapter)
    assert get_config_model_id(models.policy.config) == str(tiny_dir)     # where TRL alone would reload it from
    assert models.ref_model is not None and models.record["reference_model"] == "a frozen copy of the start model"
    s = step0(models, tok, tmp_path, beta=1.0)
    assert s["loss"] == pytest.approx(LN2, abs=1e-4) and s["reward_chosen"] == pytest.approx(0, abs=1e-4)


def test_policy_differs_from_base_after_merging_the_sft_adapter(tiny_dir, sft_adapter):
    """The merged start model really is the SFT model (not the base) before the new adapter."""
    import torch

    models = pref.build_models(load(tiny_dir), peft_config=lora(), start_adapter=sft_adapter)
    base = load(tiny_dir)()
    ids = torch.tensor([[2, 105, 2364, 107, 37889, 5866]])
    with torch.no_grad():
        merged = models.policy(input_ids=ids).logits
    assert not torch.allclose(merged, base(input_ids=ids).logits, atol=1e-3)
    assert "merged" in models.record["construction"] and "disabled" in models.record["reference_model"]


# -- bundled pairs -------------------------------------------------------------------------------------

def test_chatterbot_pairs_are_valid_and_honest(tok):
    rows, info = preference_pairs(seed=0)
    assert len(rows) > 300 and info["skipped"]["repeated_prompt"] > 0
    pairs, problems = pref.check(enumerate(rows, 1), "chatterbot-dpo", tok, 256)
    # the builder knows no tokenizer: the few pairs over model.max_seq_len are caught by the checks
    assert {p.rule for p in problems} <= {"max_tokens"} and len(problems) <= len(rows) // 100
    assert len(pairs) == len(rows) - len(problems)
    replies: dict[str, set[str]] = {}
    from tuneops.data import chatterbot

    cat_of_reply: dict[str, set[str]] = {}
    for conv in chatterbot.conversations("english"):
        m = conv["messages"]
        for q, a in zip(m[::2], m[1::2]):
            replies.setdefault(q["content"].strip().lower(), set()).add(a["content"].strip().lower())
            cat_of_reply.setdefault(a["content"], set()).add(conv["category"])
    for r in rows:
        q = r["input"]["messages"][0]["content"].strip().lower()
        chosen, rejected = r["preferred_output"][0]["content"], r["non_preferred_output"][0]["content"]
        assert chosen.strip().lower() in replies[q]             # chosen: the corpus's own reply
        assert rejected.strip().lower() not in replies[q]       # rejected: never a reply to this prompt
        assert cat_of_reply[rejected] - {r["category"]}         # ... taken from another category
        assert len(cat_of_reply[rejected]) == 1                 # ... and never a generic reply
    assert preference_pairs(seed=0)[0] == rows             # fixed seed: reproducible
