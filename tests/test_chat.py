"""Chat rendering/tokenization: the template users get equals what training sees, and
only assistant tokens (with weight != 0) carry loss."""
from __future__ import annotations

from tuneops.chat import IGNORE_INDEX, render, tokenize

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!", "weight": 0},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
]


def test_tokenizer_template_matches_training_rendering(tokenizer):
    text = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text == render(CONV)
    prompt = tokenizer.apply_chat_template(CONV[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == render(CONV[:4], add_generation_prompt=True)


def test_segment_tokenization_equals_whole_string_tokenization(tokenizer):
    enc = tokenize(CONV, tokenizer, 512)
    whole = tokenizer(render(CONV), add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == whole


def _labelled_text(conv, tokenizer) -> str:
    enc = tokenize(conv, tokenizer, 512)
    return tokenizer.decode([t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


def test_labels_only_on_weighted_assistant_tokens(tokenizer):
    assert _labelled_text(CONV, tokenizer) == "Four.<end_of_turn>\n"
    conv = [dict(m) for m in CONV]
    conv[2]["weight"] = 1
    assert _labelled_text(conv, tokenizer) == "Hello!<end_of_turn>\nFour.<end_of_turn>\n"


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    enc = tokenize(CONV, tokenizer, 10)
    assert len(enc["input_ids"]) == len(enc["labels"]) == len(enc["attention_mask"]) == 10
