"""Chat rendering/tokenization on the tiny model's real tokenizer (Gemma 3's, from the bundled
GGUF, with Gemma's own chat template written in by the model stage): training renders with
the tokenizer's template, and only assistant tokens (with weight != 0) plus the end-of-turn
marker carry loss. Other families: tests/test_families.py."""
from __future__ import annotations

from tuneops.inference.chat import IGNORE_INDEX, end_marker, prompt_ids, render, stop_ids, tokenize

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!", "weight": 0},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
]


def test_gemma_renders_its_own_turns_with_the_system_prompt_in_the_first_user_turn(tokenizer):
    assert render(tokenizer, CONV) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\nFour.<end_of_turn>\n")
    assert render(tokenizer, CONV[:4], add_generation_prompt=True).endswith("<start_of_turn>model\n")
    assert prompt_ids(tokenizer, CONV[:2])[0] == tokenizer.bos_token_id          # one BOS, from the template
    assert prompt_ids(tokenizer, CONV[:2]).count(tokenizer.bos_token_id) == 1


def test_tokenization_equals_the_templates_own_tokenization(tokenizer):
    enc = tokenize(CONV, tokenizer, 512)
    assert enc["input_ids"] == tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]


def _labelled_text(conv, tokenizer) -> str:
    enc = tokenize(conv, tokenizer, 512)
    return tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


def test_labels_only_on_weighted_assistant_tokens_and_their_end_marker(tokenizer):
    assert _labelled_text(CONV, tokenizer) == "Four.<end_of_turn>"
    conv = [dict(m) for m in CONV]
    conv[2]["weight"] = 1
    assert _labelled_text(conv, tokenizer) == "Hello!<end_of_turn>Four.<end_of_turn>"


def test_stop_ids_are_end_of_turn_and_eos(tokenizer):
    assert end_marker(tokenizer) == "<end_of_turn>"
    assert stop_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<end_of_turn>"), tokenizer.eos_token_id]


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    enc = tokenize(CONV, tokenizer, 10)
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"]) == 10
