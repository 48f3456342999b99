"""Tiny random models of each architecture family, built in the test (nothing downloaded), each
with a small byte-level BPE tokenizer trained here on a few sentences, its family's special
tokens, and its family's real chat template (tests/fixtures/chat_templates/, sources in README)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"

CORPUS = [
    "Hi there! Hello, how are you? I am fine, thank you. What is two plus two? Four.",
    "Be brief. You are a helpful assistant. Tell me a joke. Why did the chicken cross the road?",
    "The quick brown fox jumps over the lazy dog. 0123456789 !?.,;:'\"()[]{}<>/\\|-_=+*&^%$#@~`",
    "user assistant system model question answer reply conversation weight turn end start",
]


@dataclass(frozen=True)
class FamilyCase:
    name: str                      # the tuneops.families name
    template: str                  # fixture file stem
    specials: tuple[str, ...]      # special tokens, in id order (first ids of the vocabulary)
    bos: str | None
    eos: str
    pad: str | None
    stop: str                      # the token a reply ends with (the template's end-of-turn marker)
    gen_eos: tuple[str, ...]       # generation_config.eos_token_id
    system: bool = True            # the template takes a system message


CASES = {
    "llama3": FamilyCase("llama", "llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                             "<|end_header_id|>", "<|eot_id|>"),
                         "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>")),
    "qwen2": FamilyCase("qwen2", "qwen2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                        None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", ("<|im_end|>", "<|endoftext|>")),
    "phi3": FamilyCase("phi3", "phi3", ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>",
                                        "<|system|>", "<|user|>"),
                       "<s>", "<|endoftext|>", "<|endoftext|>", "<|end|>", ("<|endoftext|>", "<|assistant|>", "<|end|>")),
    "mistral": FamilyCase("mistral", "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
                          "<s>", "</s>", None, "</s>", ("</s>",)),
    "gemma3": FamilyCase("gemma3", "gemma3", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
                         "<bos>", "<eos>", "<pad>", "<end_of_turn>", ("<eos>", "<end_of_turn>")),
}


def template(case: FamilyCase) -> str:
    return (TEMPLATES / f"{case.template}.jinja").read_text(encoding="utf-8")


def build_tokenizer(case: FamilyCase, vocab_size: int = 384) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(case.specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=case.bos, eos_token=case.eos,
                                   pad_token=case.pad)
    fast.chat_template = template(case)
    return fast


def build_model(case_key: str, tokenizer: Any, seed: int = 0, head_dim: int = 8) -> Any:
    """A 2-layer random model of the family (GQA: 4 query heads, 2 KV heads of ``head_dim``;
    fused GroupQueryAttention needs a multiple of 16)."""
    import torch
    import transformers as tf

    case = CASES[case_key]
    ids = {k: tokenizer.convert_tokens_to_ids(v) if v else None
           for k, v in (("bos", case.bos), ("eos", case.eos), ("pad", case.pad or case.eos))}
    common = dict(vocab_size=len(tokenizer), hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                  initializer_range=0.2)   # logits of a usable scale: LoRA can fit a reply in a few steps
    torch.manual_seed(seed)
    if case_key == "llama3":
        cfg = tf.LlamaConfig(**common, head_dim=head_dim, tie_word_embeddings=True)
        model = tf.LlamaForCausalLM(cfg)
    elif case_key == "qwen2":
        cfg = tf.Qwen2Config(**common, tie_word_embeddings=True)
        model = tf.Qwen2ForCausalLM(cfg)
    elif case_key == "phi3":
        cfg = tf.Phi3Config(**common, tie_word_embeddings=False)
        model = tf.Phi3ForCausalLM(cfg)
    elif case_key == "mistral":
        cfg = tf.MistralConfig(**common, head_dim=head_dim, sliding_window=8, tie_word_embeddings=False)
        model = tf.MistralForCausalLM(cfg)
    else:
        cfg = tf.Gemma3TextConfig(**common, head_dim=head_dim, sliding_window=8, tie_word_embeddings=True)
        model = tf.Gemma3ForCausalLM(cfg)
    model = model.to(torch.float32)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in case.gen_eos]
    model.generation_config.pad_token_id = ids["pad"]
    return model
