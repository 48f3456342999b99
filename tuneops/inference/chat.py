"""Chat format: every model trains and generates with its own chat template.

Rendering is the tokenizer's ``apply_chat_template`` (the Jinja template that ships with the
model), so Gemma gets ``<start_of_turn>``, Llama 3 its role headers and ``<|eot_id|>``, Phi-3
``<|user|>`` ... ``<|end|>``, Qwen / SmolLM2 ChatML, Mistral ``[INST]``. The BOS token is whatever
the template writes (the rendered text is tokenized with ``add_special_tokens=False``, as
``apply_chat_template`` itself does).

Labels cover exactly each assistant reply plus its end-of-turn marker, for any template, with or
without ``{% generation %}`` markers: the whole conversation is rendered once, and each reply is
located in it after the prompt that precedes it (``messages[:i]`` rendered with the generation
prompt: the longest common prefix with the full text is where the reply may start); the reply text
(or, for templates that ``trim``, its stripped text) must be there, followed by the template's
end-of-turn marker, else a ``ChatFormatError`` names the turn. Character spans become token labels
through the fast tokenizer's offsets. Templates that inject a default system prompt (SmolLM2,
Qwen2), fold the system prompt into the first user turn (Gemma) or into the last user turn
(Mistral) are covered by this (tests/test_families.py renders each family's real template).
Assistant turns with ``weight: 0`` are rendered but carry no loss.

The end-of-turn marker is read off the template: the first token after a reply in a rendered
two-exchange probe, when it is a special (added) token (``<end_of_turn>``, ``<|eot_id|>``,
``<|end|>``, ``<|im_end|>``, ``</s>``). Stop tokens for generation are that marker plus the
tokenizer's and ``generation_config``'s EOS ids (``stop_ids``); no family name appears here.

A tokenizer without a chat template gets its family's default (``tuneops.families``: Gemma's own
template for Gemma) or ChatML (``CHATML``), written into the saved tokenizer by the model stage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InvalidInput

IGNORE_INDEX = -100

# The documented default for a tokenizer without a chat template (the model stage adds
# <|im_start|> / <|im_end|> as special tokens when the vocabulary lacks them).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


class ChatFormatError(InvalidInput):
    """A conversation the model's chat template cannot render, or renders without a reply verbatim."""


def _plain(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as the model's chat template writes it (BOS included when the template has it)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template: prepare the model with `tuneops model` "
                              "(it writes the family default or ChatML into the tokenizer)")
    try:
        return tokenizer.apply_chat_template(_plain(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:           # jinja2 TemplateError, raise_exception() of the template
        raise ChatFormatError(f"chat template: {exc}") from None


_MARKERS: dict[tuple[int, str], str] = {}
_PROBE = [{"role": "user", "content": "tuneops probe question one"},
          {"role": "assistant", "content": "tuneops probe reply one"},
          {"role": "user", "content": "tuneops probe question two"},
          {"role": "assistant", "content": "tuneops probe reply two"}]


def _special_tokens(tokenizer: Any) -> set[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        specials |= {t for t, _ in tokenizer.get_added_vocab().items()}
    except Exception:                  # slow tokenizers without added vocab
        pass
    return specials


def end_marker(tokenizer: Any) -> str:
    """The template's end-of-turn marker (a special token right after a reply), or ``""``."""
    key = (id(tokenizer), tokenizer.chat_template or "")
    if key not in _MARKERS:
        text = render(tokenizer, _PROBE)
        after = text[text.index(_PROBE[1]["content"]) + len(_PROBE[1]["content"]):]
        marker = ""
        if after:
            ids = tokenizer(after, add_special_tokens=False)["input_ids"]
            first = tokenizer.convert_ids_to_tokens(ids[:1])[0] if ids else None
            if first in _special_tokens(tokenizer) and after.startswith(first):
                marker = first
        _MARKERS[key] = marker
    return _MARKERS[key]


def _locate(text: str, content: str, lo: int) -> tuple[int, int]:
    for c in dict.fromkeys((content, content.strip())):
        if c:
            i = text.find(c, lo)
            if i >= 0:
                return i, i + len(c)
    return -1, -1


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss: each assistant reply
    with ``weight != 0`` plus its end-of-turn marker."""
    msgs = _plain(messages)
    text = render(tokenizer, msgs)
    marker = end_marker(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] == "system":
            continue
        if m["role"] != "assistant":
            start, stop = _locate(text, m["content"], cursor)
            cursor = stop if start >= 0 else cursor
            continue
        prompt = render(tokenizer, msgs[:i], add_generation_prompt=True)
        lo = max(cursor, len(os.path.commonprefix([prompt, text])))
        if m["content"].strip():
            start, stop = _locate(text, m["content"], lo)
        else:                                  # an empty reply: only its end marker
            start = stop = text.find(marker, lo) if marker else lo
        if start < 0:
            raise ChatFormatError(f"messages[{i}]: the chat template does not render this assistant reply "
                                  f"verbatim after its prompt; cannot place its labels")
        if marker:
            if not text.startswith(marker, stop):
                raise ChatFormatError(f"messages[{i}]: the chat template does not end this assistant reply with "
                                      f"its end-of-turn marker {marker!r}")
            stop += len(marker)
        cursor = stop
        if m.get("weight", 1) != 0:
            spans.append((start, stop))
    return text, spans


def tokenize(messages: list[dict[str, Any]], tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """Token ids of the rendered conversation and labels (IGNORE_INDEX outside the assistant
    spans), truncated to ``max_len``. A token is labelled when it overlaps a span."""
    text, spans = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [tok if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
                  for tok, (a, b) in zip(ids, enc["offset_mapping"])]
    else:                                      # no offsets: tokenize the pieces between boundaries
        cuts = sorted({0, len(text), *[p for span in spans for p in span]})
        ids, labels = [], []
        for a, b in zip(cuts, cuts[1:]):
            piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            inside = any(a >= s and b <= e for s, e in spans)
            ids += piece
            labels += piece if inside else [IGNORE_INDEX] * len(piece)
    ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def token_length(messages: list[dict[str, Any]], tokenizer: Any) -> int:
    return len(tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """The conversation so far plus the template's generation prompt, as token ids."""
    return list(tokenizer(render(tokenizer, messages, add_generation_prompt=True),
                          add_special_tokens=False)["input_ids"])


def raw_ids(tokenizer: Any, text: str) -> list[int]:
    """Plain text (no chat format), with the special tokens the tokenizer itself adds (its BOS)."""
    return list(tokenizer(text)["input_ids"])


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn marker (when it is one token), the
    tokenizer's EOS and ``generation_config.eos_token_id`` (an int or a list)."""
    out: list[int] = []
    marker = end_marker(tokenizer) if getattr(tokenizer, "chat_template", None) else ""
    if marker:
        ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            out += ids
    out += _ids(getattr(generation_config, "eos_token_id", None))
    out += _ids(tokenizer.eos_token_id)
    return list(dict.fromkeys(out))


def load_generation_config(*folders: Path | str | None) -> Any:
    """The first ``generation_config.json`` found in ``folders`` (None when there is none)."""
    from transformers import GenerationConfig

    for folder in folders:
        if folder is not None and (Path(folder) / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(str(folder))
    return None


def prompt_and_reference(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Conversation up to the last assistant turn, and that turn's content (for generations)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def ensure_template(tokenizer: Any, default: str | None = None) -> bool:
    """Give a tokenizer without a chat template ``default`` (its family's) or ChatML; returns
    whether ChatML's tokens had to be added to the vocabulary (the caller resizes the embeddings)."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = default or CHATML
    if default:
        return False
    vocab = tokenizer.get_vocab()
    missing = [t for t in CHATML_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    return bool(missing)


class Collator:
    """Right-pads a batch; labels padded with IGNORE_INDEX."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> "torch.Tensor":
            return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

        return {"input_ids": pad("input_ids", self.pad), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", IGNORE_INDEX)}
