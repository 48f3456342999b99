"""Chat format: rendering conversations with the Gemma turn markers, and tokenizing
them with labels on assistant tokens only.

One rendering function (``segments``) feeds both the tokenizer's Jinja chat template
(shipped with the prepared model, for users) and training, and a test checks that
they agree. Assistant turns with ``weight: 0`` are rendered but carry no loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

START, END = "<start_of_turn>", "<end_of_turn>"
IGNORE_INDEX = -100

# Gemma has no system role: the system prompt is folded into the first user turn,
# as Google's own Gemma template does.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] ~ '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "<start_of_turn>{{ role }}\n{{ ns.system if role == 'user' else '' }}{{ message['content'] }}<end_of_turn>"
    "{{ '\n' }}"
    "{%- if role == 'user' -%}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<start_of_turn>model{{ '\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


def pieces(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[tuple[str, bool]]:
    """Split a conversation into ``(text, trainable)`` pieces; assistant replies (and their
    end marker) are trainable unless the turn has ``weight: 0``. Plain tuples: the data
    gate calls this for every record of large files."""
    out: list[tuple[str, bool]] = []
    system = ""
    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            system = content + "\n\n"
        elif role == "assistant":
            out += ((f"{START}model\n", False), (f"{content}{END}\n", m.get("weight", 1) != 0))
        else:
            out.append((f"{START}user\n{system}{content}{END}\n", False))
            system = ""
    if add_generation_prompt:
        out.append((f"{START}model\n", False))
    return out


def segments(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> list[Segment]:
    return [Segment(text, trainable) for text, trainable in pieces(messages, add_generation_prompt)]


def render(messages: list[dict[str, Any]], add_generation_prompt: bool = False, bos: str = "<bos>") -> str:
    return bos + "".join(s.text for s in segments(messages, add_generation_prompt))


def prompt_and_reference(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Conversation up to the last assistant turn, and that turn's content (for generations)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def tokenize(messages: list[dict[str, Any]], tokenizer: Any, max_len: int) -> dict[str, list[int]]:
    """Token ids and labels (IGNORE_INDEX outside trainable assistant tokens), truncated
    to ``max_len``. Segments are tokenized separately so label boundaries are exact;
    every segment starts or ends at a special token, so this equals tokenizing the whole
    rendered string (tested)."""
    ids: list[int] = [tokenizer.bos_token_id]
    labels: list[int] = [IGNORE_INDEX]
    for seg in segments(messages):
        piece = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if seg.trainable else [IGNORE_INDEX] * len(piece))
    ids, labels = ids[:max_len], labels[:max_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


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
