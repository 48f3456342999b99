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

Tool calling (OpenAI rows with ``tools``, assistant ``tool_calls``, ``tool`` results, or the legacy
``functions`` / ``function_call`` / ``function`` messages, which are read as their modern equivalents:
``openai_messages``) renders through ``tuneops.inference.toolcalls``: the model's own template with
``tools=...``, in the tool format recorded in the tokenizer (``tool_format``: the ``tool_format`` key of
``tokenizer_config.json``, which the model stage writes: ``ensure_tool_format``). A template without
tool syntax gets tuneops' default (Hermes-style ``<tool_call>`` blocks in the model's own turns,
``toolcalls.with_default_tools``) written into it, so training and serving use the same one. Labels of a
reply with tool calls cover exactly what the template writes for the reply (its content, the calls
with their markers) and its end-of-turn marker; tool declarations and tool results are prompt.
"""
from __future__ import annotations

import json
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


# -- tool calling ------------------------------------------------------------------------------------

TOOL_FORMAT_KEY = "tool_format"   # tokenizer_config.json: the toolcalls format the model writes calls in


def record_tools(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The functions a chat record may call, as OpenAI ``tools`` (legacy ``functions`` wrapped)."""
    tools = [t for t in record.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    tools += [{"type": "function", "function": f} for f in record.get("functions") or [] if isinstance(f, dict)]
    return tools or None


def uses_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("function_call") or m.get("role") in ("tool", "function")
                              for m in messages)


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The legacy function-calling messages as today's: an assistant ``function_call`` becomes one
    ``tool_calls`` entry (id ``call_<i>``), a ``function`` message the ``tool`` result of that call."""
    out: list[dict[str, Any]] = []
    last_id: str | None = None
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and m.get("function_call") and not m.get("tool_calls"):
            last_id = f"call_{i}"
            m = {k: v for k, v in m.items() if k != "function_call"}
            m["tool_calls"] = [{"id": last_id, "type": "function", "function": messages[i]["function_call"]}]
        elif m.get("role") == "function":
            m = {**{k: v for k, v in m.items() if k != "role"}, "role": "tool", "tool_call_id": last_id or "call"}
        out.append(m)
    return out


def ensure_tool_format(tokenizer: Any, family_format: str | None = None) -> tuple[Any, bool]:
    """The tokenizer's tool format, recorded on it (``init_kwargs[TOOL_FORMAT_KEY]``, saved into
    ``tokenizer_config.json``): the recorded one; else the family's (``Family.tool_format``) when the
    template carries it, else the one its template writes (``toolcalls.detect``); else tuneops' default,
    written into the template (``toolcalls.with_default_tools``). Returns (format, whether the default
    syntax was added)."""
    from . import toolcalls

    recorded = (getattr(tokenizer, "init_kwargs", None) or {}).get(TOOL_FORMAT_KEY)
    if recorded:
        return toolcalls.get(recorded), False
    fmt = None
    if family_format:
        candidate = toolcalls.get(family_format)
        fmt = candidate if toolcalls.supports(candidate, tokenizer) else None
    fmt = fmt or toolcalls.detect(tokenizer)
    added = fmt is None
    if added:
        tokenizer.chat_template = toolcalls.with_default_tools(tokenizer.chat_template)
        fmt = toolcalls.DEFAULT_SYNTAX
    tokenizer.init_kwargs[TOOL_FORMAT_KEY] = fmt.name
    return fmt, added


def tool_format(tokenizer: Any) -> Any:
    """The ``toolcalls.ToolFormat`` the tokenizer's model writes calls in (``ensure_tool_format``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template: prepare the model with `tuneops model` "
                              "(it writes the family default or ChatML into the tokenizer)")
    return ensure_tool_format(tokenizer)[0]


def _draw(fmt: Any, tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
          add_generation_prompt: bool) -> str:
    try:
        return fmt.render(tokenizer, messages, tools, add_generation_prompt=add_generation_prompt)
    except Exception as exc:           # jinja2 TemplateError, raise_exception() of the template, ToolCallError
        raise ChatFormatError(f"chat template: {exc}") from None


def render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
           tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as the model's chat template writes it (BOS included when the template has
    it), with ``tools`` and tool calls / results in the model's tool format."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError("the tokenizer has no chat template: prepare the model with `tuneops model` "
                              "(it writes the family default or ChatML into the tokenizer)")
    if uses_tools(messages, tools):
        return _draw(tool_format(tokenizer), tokenizer, openai_messages(messages), tools, add_generation_prompt)
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


def assistant_spans(tokenizer: Any, messages: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss: each assistant reply
    with ``weight != 0`` (its content and tool calls as the template writes them) plus its
    end-of-turn marker."""
    if uses_tools(messages, tools):
        fmt = tool_format(tokenizer)
        msgs = fmt.normalise(openai_messages(messages), tools)    # what the template sees (idempotent)
        weights = [m.get("weight", 1) for m in msgs]             # (normalise keeps the keys; it may add a system turn)

        def draw(ms: list[dict[str, Any]], gen: bool = False) -> str:
            return _draw(fmt, tokenizer, ms, tools, gen)
    else:
        fmt, msgs = None, _plain(messages)
        weights = [m.get("weight", 1) for m in messages]

        def draw(ms: list[dict[str, Any]], gen: bool = False) -> str:
            return render(tokenizer, ms, add_generation_prompt=gen)
    text = draw(msgs)
    marker = end_marker(tokenizer)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] == "system":
            continue
        if m["role"] != "assistant":
            if m["role"] in ("user",):         # (tool results may be re-quoted by the template: not located)
                start, stop = _locate(text, m["content"], cursor)
                cursor = stop if start >= 0 else cursor
            continue
        prompt = draw(msgs[:i], True)
        lo = max(cursor, len(os.path.commonprefix([prompt, text])))
        if m.get("tool_calls"):                # the reply as the template writes it, less its end marker
            from .toolcalls import assistant_text

            try:
                reply = assistant_text(fmt, tokenizer, msgs[:i + 1], tools)
            except Exception as exc:  # noqa: BLE001 - a template error
                raise ChatFormatError(f"messages[{i}]: chat template: {exc}") from None
            if marker and marker in reply:
                reply = reply[:reply.index(marker)]
            start, stop = _locate(text, reply, lo)
        elif m["content"].strip():
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
        if weights[i] != 0:
            spans.append((start, stop))
    return text, spans


def tokenize(messages: list[dict[str, Any]], tokenizer: Any, max_len: int,
             tools: list[dict[str, Any]] | None = None) -> dict[str, list[int]]:
    """Token ids of the rendered conversation and labels (IGNORE_INDEX outside the assistant
    spans), truncated to ``max_len``. A token is labelled when it overlaps a span."""
    text, spans = assistant_spans(tokenizer, messages, tools)
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


def token_length(messages: list[dict[str, Any]], tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> int:
    return len(tokenizer(render(tokenizer, messages, tools=tools), add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """The conversation so far plus the template's generation prompt, as token ids."""
    return list(tokenizer(render(tokenizer, messages, add_generation_prompt=True, tools=tools),
                          add_special_tokens=False)["input_ids"])


def raw_ids(tokenizer: Any, text: str) -> list[int]:
    """Plain text (no chat format), with the special tokens the tokenizer itself adds (its BOS)."""
    return list(tokenizer(text)["input_ids"])


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def stop_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Token ids that end a reply: the template's end-of-turn marker (when it is one token), the other
    reply-ending tokens of the tool formats (``ToolFormat.end_tokens``: Llama 3.1's ``<|eom_id|>``) that
    the template itself writes and the vocabulary has as one special token, the tokenizer's EOS and
    ``generation_config.eos_token_id`` (an int or a list)."""
    from .toolcalls import FORMATS

    out: list[int] = []
    template = getattr(tokenizer, "chat_template", None)
    marker = end_marker(tokenizer) if template else ""
    ends = [marker] if marker else []
    if isinstance(template, str):
        specials = _special_tokens(tokenizer)
        ends += [t for f in FORMATS.values() for t in f.end_tokens if t in template and t in specials]
    for end in dict.fromkeys(ends):
        ids = tokenizer(end, add_special_tokens=False)["input_ids"]
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
    """Conversation up to the last assistant turn, and that turn's content (for generations; a
    reply with tool calls: its content, then the calls as JSON ``[{"name", "arguments"}]``)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    reply = openai_messages(messages)[last]
    ref = reply.get("content") or ""
    if reply.get("tool_calls"):
        calls = []
        for tc in reply["tool_calls"]:
            fn = tc.get("function", tc)
            args = fn.get("arguments")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except json.JSONDecodeError:
                pass
            calls.append({"name": fn.get("name"), "arguments": args})
        ref = (ref + "\n" if ref else "") + json.dumps(calls, ensure_ascii=False)
    return messages[:last], ref


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
