"""The record formats: one small checker per format over shared helpers, and how each
format becomes a chat conversation (what training sees) and a duplicate key.

=================  ================================================================
format             one JSONL record
=================  ================================================================
chat               ``{"messages": [{"role": "system"|"user"|"assistant", "content": str,
                   "weight": 0|1 (assistant only, optional)}, ...]}`` (OpenAI/Azure
                   fine-tuning format, tool calling included: ``tools``, assistant
                   ``tool_calls``, ``tool`` results, legacy ``functions`` /
                   ``function_call``, ``parallel_tool_calls``, ``name``; see
                   ``tuneops/data/toolrows.py``; extra top-level keys allowed)
instruction        ``{"prompt": str, "completion": str}``
text               ``{"text": str}`` (domain adaptation)
classification     ``{"text": str, "label": str|int}``
ner                ``{"tokens": [str, ...], "tags": ["O"|"B-TYPE"|"I-TYPE", ...]}`` (BIO)
translation        ``{"source": str, "target": str, "source_lang": "en", "target_lang": "pl"}``
qa                 ``{"question": str, "answer": str, "context": str (optional),
                   "answer_start": int (optional: the answer is context[start:start+len])}``
preference         OpenAI DPO ``{"input": {"messages": [...], "tools": [...]}, "preferred_output":
                   [{assistant}], "non_preferred_output": [{assistant}]}``, or TRL's
                   ``{"prompt", "chosen", "rejected"}`` (text or messages; or implicit
                   prompt: ``chosen`` / ``rejected`` whole conversations); each side is
                   checked as a chat record (``preference_parts``)
=================  ================================================================

Extra keys are allowed in every format. CSV (a header row) and Parquet hold the flat
formats; Parquet also holds ``chat`` and ``ner`` (list columns).

A record problem is ``(field, rule, message)``; ``check_record`` adds path and line.
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

from . import toolrows
from .records import Problem

ROLES = toolrows.ROLES
Issue = tuple[str, str, str]
Messages = list[dict[str, Any]]

_TAG = re.compile(r"^(O|[BI]-[A-Za-z][A-Za-z0-9_.-]*)$")
_LANG = re.compile(r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")
_PLACEHOLDER = re.compile(r"%\([A-Za-z_][A-Za-z0-9_]*\)[-#0 +]*\d*(?:\.\d+)?[sdifrxXeEgGc]"
                          r"|%[-#0 +]*\d*(?:\.\d+)?[sdifrxXeEgGc]|\{[A-Za-z0-9_]*(?:![rsa])?(?::[^{}]*)?\}")
_PUNCT = re.compile(r"[\W_]+")


# -- shared helpers ----------------------------------------------------------------------

def _text(obj: dict[str, Any], key: str, out: list[Issue], required: bool = True,
          name: str | None = None) -> str | None:
    """A string field: required, a string, not empty or whitespace."""
    name = name or key
    if key not in obj or obj[key] is None:
        if required:
            out.append((name, "required", f"missing '{key}'"))
        return None
    value = obj[key]
    if not isinstance(value, str):
        out.append((name, "type", f"{key} must be a string (got {type(value).__name__})"))
        return None
    if not value.strip():
        out.append((name, "non_empty", f"{key} is empty or whitespace"))
        return None
    return value


def _list(obj: dict[str, Any], key: str, out: list[Issue]) -> list[Any] | None:
    value = obj.get(key)
    if value is None:
        out.append((key, "required", f"missing '{key}'"))
        return None
    if not isinstance(value, list) or not value:
        out.append((key, "type", f"'{key}' must be a non-empty list"))
        return None
    return value


_ASCII_PUNCT = bytes(c if chr(c).isalnum() else 32 for c in range(128)) + bytes(128)


def normalise(text: str) -> str:
    """For near-duplicate detection: Unicode NFKC, case-folded, punctuation and runs of
    whitespace collapsed to one space."""
    if text.isascii():        # fast path: one C-level byte translation
        return " ".join(text.lower().encode().translate(_ASCII_PUNCT).decode().split())
    text = unicodedata.normalize("NFKC", text)
    return " ".join(_PUNCT.sub(" ", text.casefold()).split())


def _near(text: str) -> str:
    return normalise(text) or text.strip()


def _plain(v: Any) -> str:
    """A key value as text: nested messages by their contents (not their keys), None as ''."""
    if v is None:
        return ""
    if isinstance(v, dict):
        return " ".join(_plain(x) for x in v.values())
    if isinstance(v, list):
        return " ".join(_plain(x) for x in v)
    return str(v)


# -- the checkers --------------------------------------------------------------------------

def _chat(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    """OpenAI's SFT row: messages (with tool calls and results) and the functions they may call
    (``toolrows``: one definition for the gate, ``tuneops data add``, ingest and the jobs API)."""
    msgs = obj.get("messages")
    if msgs is None:
        out.append(("messages", "required", "missing 'messages'"))
        return
    if not isinstance(msgs, list) or not msgs:
        out.append(("messages", "type", "'messages' must be a non-empty list"))
        return
    functions = toolrows.check_declarations(obj, out)
    calls = toolrows.CallTracker(functions, obj.get("parallel_tool_calls") is not False)
    assistant_ok = weighted = False
    prev: tuple[int, str] | None = None          # last user/assistant/tool turn, for turn order
    for i, m in enumerate(msgs):
        f = f"messages[{i}]"
        if not isinstance(m, dict):
            out.append((f, "type", "each message must be an object"))
            continue
        role = m.get("role")
        makes_calls = role == "assistant" and ("tool_calls" in m or "function_call" in m)
        if makes_calls and m.get("content") is None:
            content = None                       # a reply that is only tool calls: content null / absent
        elif makes_calls and isinstance(m.get("content"), str):
            content = m["content"]
        else:
            content = _text(m, "content", out, name=f"{f}.content")
        if "name" in m and (not isinstance(m["name"], str) or not m["name"].strip()):
            out.append((f"{f}.name", "type", "name must be a non-empty string"))
        if role not in ROLES:
            out.append((f"{f}.role", "enum", f"role must be one of {', '.join(ROLES)} (got {role!r})"))
        elif role == "system":
            if i != 0:
                out.append((f"{f}.role", "order", "a system message may only come first"))
        else:
            turn = "tool" if role in toolrows.RESULT_ROLES else role
            if prev is not None and prev[1] == turn and turn != "tool":
                out.append((f"{f}.role", "order", f"two {role} turns in a row (messages[{prev[0]}] and "
                                                  f"messages[{i}]): turns must alternate"))
            prev = (i, turn)
        if role != "assistant":
            for key in ("tool_calls", "function_call"):
                if key in m:
                    out.append((f"{f}.{key}", "role", f"{key} is allowed on assistant messages only"))
        calls.message(i, m, role, out)
        if "weight" in m:
            w = m["weight"]
            if role != "assistant" or isinstance(w, bool) or w not in (0, 1):
                out.append((f"{f}.weight", "enum", "weight is allowed on assistant turns only, as 0 or 1"))
        if role == "assistant" and (content is not None or calls.called(i)):
            assistant_ok = True
            weighted = weighted or m.get("weight", 1) != 0
    if not assistant_ok:
        out.append(("messages", "assistant_turn", "needs at least one assistant turn with non-empty content "
                                                  "or tool calls"))
    elif not weighted:
        out.append(("messages", "assistant_turn", "every assistant turn has weight 0: nothing to train on"))


def _instruction(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    _text(obj, "prompt", out)
    _text(obj, "completion", out)


def _plain_text(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    _text(obj, "text", out)


def _classification(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    _text(obj, "text", out)
    label = obj.get("label")
    if label is None:
        out.append(("label", "required", "missing 'label'"))
    elif isinstance(label, bool) or not isinstance(label, (str, int)):
        out.append(("label", "type", f"label must be a string or an integer (got {type(label).__name__})"))
    elif isinstance(label, str) and not label.strip():
        out.append(("label", "non_empty", "label is empty or whitespace"))


def bio_issues(tags: list[str], entity_types: list[str] | None = None) -> list[Issue]:
    """BIO consistency: each tag is O, B-TYPE or I-TYPE, and I-TYPE continues a TYPE entity."""
    out: list[Issue] = []
    prev = "O"
    for i, tag in enumerate(tags):
        f = f"tags[{i}]"
        if not isinstance(tag, str) or not _TAG.match(tag):
            out.append((f, "tag_format", f"tag must be O, B-TYPE or I-TYPE (got {tag!r})"))
            prev = "O"
            continue
        if tag != "O":
            kind = tag[2:]
            if entity_types is not None and kind not in entity_types:
                out.append((f, "entity_type", f"entity type {kind!r} is not in data.entity_types {entity_types}"))
            if tag.startswith("I-") and prev[2:] != kind:
                out.append((f, "bio", f"{tag} follows {prev} (an entity starts with B-{kind})"))
        prev = tag
    return out


def _ner(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    tokens, tags = _list(obj, "tokens", out), _list(obj, "tags", out)
    if tokens is not None:
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                out.append((f"tokens[{i}]", "type", f"token must be a string (got {type(t).__name__})"))
            elif not t.strip():
                out.append((f"tokens[{i}]", "non_empty", "token is empty or whitespace"))
    if tags is not None:
        if tokens is not None and len(tags) != len(tokens):
            out.append(("tags", "length", f"{len(tags)} tags for {len(tokens)} tokens"))
        out.extend(bio_issues(tags, opts.get("entity_types")))


def placeholders(text: str) -> list[str]:
    return sorted(_PLACEHOLDER.findall(text))


def _translation(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    source, target = _text(obj, "source", out), _text(obj, "target", out)
    langs = [_text(obj, k, out) for k in ("source_lang", "target_lang")]
    for key, lang in zip(("source_lang", "target_lang"), langs):
        if lang is not None and not _LANG.match(lang):
            out.append((key, "language", f"{key} must be a language code like 'en' or 'pt_BR' (got {lang!r})"))
    if all(langs) and langs[0].lower() == langs[1].lower():
        out.append(("target_lang", "language_pair", f"source and target language are both {langs[0]!r}"))
    if source is not None and target is not None and placeholders(source) != placeholders(target):
        out.append(("target", "placeholders", f"placeholders differ: source {placeholders(source)}, "
                                              f"target {placeholders(target)}"))


def _qa(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    _text(obj, "question", out)
    answer = _text(obj, "answer", out)
    context = obj.get("context")
    if context is not None and not isinstance(context, str):
        out.append(("context", "type", f"context must be a string (got {type(context).__name__})"))
        context = None
    if "answer_start" not in obj or obj["answer_start"] is None:
        return
    start = obj["answer_start"]
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        out.append(("answer_start", "type", f"answer_start must be an integer >= 0 (got {start!r})"))
    elif not context:
        out.append(("context", "required", "an answer span (answer_start) needs a non-empty context"))
    elif answer is not None and context[start:start + len(answer)] != answer:
        found = context[start:start + len(answer)]
        out.append(("answer_start", "answer_span",
                    f"context[{start}:{start + len(answer)}] is {found[:60]!r}, not the answer {answer[:60]!r}"))


# -- preference pairs (DPO): the chat checks on each side ------------------------------------

def _as_reply(value: Any, name: str, out: list[Issue]) -> dict[str, Any] | None:
    """Exactly one assistant message (a list of one, as OpenAI writes it, or the message alone);
    its content is checked with the conversation (``_chat``)."""
    if isinstance(value, dict):
        value = [value]
    if value is None:
        out.append((name, "required", f"missing '{name}'"))
        return None
    if not isinstance(value, list) or not value:
        out.append((name, "type", f"'{name}' must be a list with one assistant message"))
        return None
    roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in value]
    if len(value) != 1 or roles[0] != "assistant":
        out.append((name, "one_assistant", f"needs exactly one assistant message (got {len(value)} message(s), "
                                           f"roles {roles})"))
        return None
    return value[0]


def _as_messages(value: Any, name: str, out: list[Issue]) -> list[Any] | None:
    if value is None:
        out.append((name, "required", f"missing '{name}'"))
        return None
    if not isinstance(value, list) or not value:
        out.append((name, "type", f"'{name}' must be a non-empty list of messages"))
        return None
    return value


def _reply_text(value: Any, name: str, out: list[Issue]) -> dict[str, Any] | None:
    v = _text({name: value}, name, out)
    return None if v is None else {"role": "assistant", "content": v}


def preference_parts(obj: dict[str, Any], out: list[Issue]) -> dict[str, Any] | None:
    """A preference row's parts, whatever its form, or None (with the issues in ``out``):
    ``prompt`` (messages), ``chosen`` / ``rejected`` (one assistant message each), ``tools``, the
    row's ``source`` form and the ``names`` its fields have (for the problems). Forms: OpenAI DPO
    (``input.messages`` [+ ``input.tools``], ``preferred_output``, ``non_preferred_output``); TRL
    ``prompt`` / ``chosen`` / ``rejected`` as text (the prompt becomes one user turn) or as messages;
    TRL implicit prompt (``chosen`` / ``rejected`` whole conversations sharing every turn but the last)."""
    n0 = len(out)
    if "input" in obj or "preferred_output" in obj or "non_preferred_output" in obj:
        inp = obj.get("input")
        prompt = tools = None
        if not isinstance(inp, dict):
            out.append(("input", "required" if inp is None else "type", "'input' must be an object with 'messages'"))
        else:
            prompt, tools = _as_messages(inp.get("messages"), "input.messages", out), inp.get("tools")
        chosen = _as_reply(obj.get("preferred_output"), "preferred_output", out)
        rejected = _as_reply(obj.get("non_preferred_output"), "non_preferred_output", out)
        source, names = "openai", {"prompt": "input.messages", "chosen": "preferred_output",
                                   "rejected": "non_preferred_output", "tools": "input.tools"}
    elif "chosen" in obj or "rejected" in obj:
        c, r, p, tools = obj.get("chosen"), obj.get("rejected"), obj.get("prompt"), obj.get("tools")
        names = {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "tools": "tools"}
        if isinstance(p, str) or (p is None and isinstance(c, str)):
            source = "trl_text"
            q = _text(obj, "prompt", out)
            prompt = None if q is None else [{"role": "user", "content": q}]
            chosen, rejected = _reply_text(c, "chosen", out), _reply_text(r, "rejected", out)
        elif p is not None:
            source = "trl_messages"
            prompt = _as_messages(p, "prompt", out)
            chosen, rejected = _as_reply(c, "chosen", out), _as_reply(r, "rejected", out)
        else:                                   # implicit prompt: whole conversations
            source = "trl_implicit"
            cm, rm = _as_messages(c, "chosen", out), _as_messages(r, "rejected", out)
            prompt = chosen = rejected = None
            if cm is not None and rm is not None:
                for key, msgs in (("chosen", cm), ("rejected", rm)):
                    last = msgs[-1].get("role") if isinstance(msgs[-1], dict) else None
                    if last != "assistant":
                        out.append((f"{key}[{len(msgs) - 1}].role", "one_assistant",
                                    f"the last message of '{key}' must be the assistant reply"))
                if len(out) == n0:
                    if cm[:-1] != rm[:-1]:
                        i = next((i for i, (a, b) in enumerate(zip(cm[:-1], rm[:-1])) if a != b),
                                 min(len(cm), len(rm)) - 1)
                        out.append((f"rejected[{i}]", "prompt_prefix",
                                    "chosen and rejected must share every turn but the last (they differ here)"))
                    elif len(cm) < 2:
                        out.append(("chosen", "prompt_prefix", "no prompt: the conversations have only the "
                                                               "assistant reply"))
                    else:
                        prompt, chosen, rejected = cm[:-1], cm[-1], rm[-1]
                names = {**names, "chosen": "chosen", "rejected": "rejected"}
    else:
        out.append(("(record)", "format", "not a preference row: expected OpenAI's 'input' / 'preferred_output' / "
                                          "'non_preferred_output' or TRL's 'prompt' / 'chosen' / 'rejected'"))
        return None
    if prompt is None or chosen is None or rejected is None or len(out) > n0:
        return None
    implicit = source == "trl_implicit"
    last = prompt[-1].get("role") if isinstance(prompt[-1], dict) else None
    if last == "assistant":
        out.append((f"{names['chosen'] if implicit else names['prompt']}[{len(prompt) - 1}].role", "prompt_end",
                    "the prompt must end with a user (or tool) turn, not an assistant turn"))
        return None
    # each side is a chat conversation: the chat record's checks (roles, order, content, tool calls
    # and declarations), with the problems named by the row's own fields
    for side in ("chosen", "rejected"):
        conv = [*prompt, chosen if side == "chosen" else rejected]
        where = [f"{names[side] if implicit else names['prompt']}[{j}]" for j in range(len(prompt))]
        where.append(f"{names[side]}[{len(prompt)}]" if implicit else names[side] if source == "trl_text"
                     else f"{names[side]}[0]")
        if source == "trl_text":
            where[0] = "prompt"
        issues: list[Issue] = []
        _chat({"messages": conv, **({"tools": tools} if tools is not None else {})}, issues, {})
        for f, rule, msg in issues:
            m = re.match(r"messages\[(\d+)\]", f)
            if m:
                f = where[int(m.group(1))] + f[m.end():]
                if source == "trl_text":         # the text fields themselves
                    f = f.removesuffix(".content")
            elif f.startswith("tools"):
                f = names["tools"] + f[len("tools"):]
            elif f == "messages":
                f = names[side]
            if (f, rule, msg) not in out:
                out.append((f, rule, msg))
    if len(out) == n0 and _reply_key(chosen) == _reply_key(rejected):
        out.append((names["rejected"], "identical", f"the {names['rejected']} reply is the same as the "
                                                   f"{names['chosen']} one: no preference to learn"))
    if len(out) > n0:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools, "source": source,
            "names": names}


def _reply_key(m: dict[str, Any]) -> str:
    return json.dumps([(m.get("content") or "").strip(), m.get("tool_calls")], sort_keys=True, default=str)


def _preference(obj: dict[str, Any], out: list[Issue], opts: dict[str, Any]) -> None:
    preference_parts(obj, out)


def preference_openai(r: dict[str, Any]) -> dict[str, Any]:
    """A valid preference row in OpenAI's DPO form (what validate writes as the clean row's ``pair``)."""
    parts = preference_parts(r, [])
    assert parts is not None, "preference_openai takes a row that passed the checks"
    inp: dict[str, Any] = {"messages": parts["prompt"]}
    if parts["tools"]:
        inp["tools"] = parts["tools"]
    return {"input": inp, "preferred_output": [parts["chosen"]], "non_preferred_output": [parts["rejected"]]}


def _preference_chat(r: dict[str, Any], side: str = "chosen") -> Messages:
    o = preference_openai(r)
    return [*o["input"]["messages"], (o["preferred_output"] if side == "chosen" else o["non_preferred_output"])[0]]


# -- rendering as chat (what training sees) --------------------------------------------------

def _qa_chat(r: dict[str, Any]) -> Messages:
    ctx = r.get("context") or ""
    prompt = f"{ctx.strip()}\n\nQuestion: {r['question']}" if ctx.strip() else r["question"]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["answer"]}]


@dataclass(frozen=True)
class Format:
    name: str
    check: Callable[[dict[str, Any], list[Issue], dict[str, Any]], None]
    fields: tuple[str, ...]                  # content fields: the duplicate key, the CSV columns
    field: str                               # the field a whole-record rule names
    to_chat: Callable[[dict[str, Any]], Messages]
    csv: bool = True                         # flat: CSV-friendly
    # the functions a record's conversation may call, rendered with it (OpenAI ``tools``; legacy
    # ``functions`` as tools); None for formats without tool calling
    tools: Callable[[dict[str, Any]], list[dict[str, Any]] | None] = lambda r: None
    # every conversation a record trains on (preference: prompt + chosen and prompt + rejected; the
    # token length checked against model.max_seq_len is the longest); None: [to_chat(r)]
    conversations: Callable[[dict[str, Any]], list[Messages]] | None = None
    # the record in one canonical form for duplicate / leakage keys and the clean row (None: as it is)
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # rules that need the model's tokenizer and chat layer: "module:function" taking (record, tokenizer,
    # max_seq_len) -> issues, imported by the gate when it runs (ingest never needs the chat layer)
    token_issues: str | None = None

    def key_values(self, r: dict[str, Any]) -> list[Any]:
        if self.name == "chat":
            return [[m.get("role"), m.get("content"), m.get("weight", 1)] for m in r["messages"]]
        if self.canonical is not None:
            r = self.canonical(r)
        return [r.get(f) for f in self.fields]

    def sides(self, r: dict[str, Any]) -> list[Messages]:
        return self.conversations(r) if self.conversations is not None else [self.to_chat(r)]

    def exact_key(self, r: dict[str, Any]) -> str:
        if self.name == "chat":       # (tool calls, results and declarations: toolrows.key_text)
            return "\x1e".join(f"{m.get('role')}\x1f{m.get('weight', 1)}\x1f{m.get('content')}"
                               f"{toolrows.key_text(m)}" for m in r["messages"]) + toolrows.declared_text(r)
        return json.dumps(self.key_values(r), ensure_ascii=False, separators=(",", ":"), default=str)

    def near_key(self, r: dict[str, Any]) -> str:
        """Equal for records that differ only in case, punctuation and spacing (a field
        that is all punctuation, like an emoticon, is kept as it is)."""
        if self.name == "chat":
            return _near(" ".join(f"{m['role']} {m.get('content') or ''}{toolrows.key_text(m)}" for m in r["messages"])
                         + toolrows.declared_text(r))
        return "\x1f".join(_near(" ".join(map(_plain, v)) if isinstance(v, list) else _plain(v))
                           for v in self.key_values(r))

    def size(self, r: dict[str, Any]) -> int:
        """Characters of the (longest) conversation: content, tool calls and results (ingest.max_chars; the
        declared tools are not counted here, the token length in validate counts everything)."""
        return max(sum(len(m.get("content") or "") + len(toolrows.key_text(m)) for m in conv) for conv in self.sides(r))


FORMAT_SPECS: dict[str, Format] = {f.name: f for f in (
    Format("chat", _chat, ("messages",), "messages", lambda r: r["messages"], csv=False, tools=toolrows.record_tools),
    Format("instruction", _instruction, ("prompt", "completion"), "(record)",
           lambda r: [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]),
    # an empty user turn first: chat templates (Gemma, Mistral, ...) require a conversation to open with one
    Format("text", _plain_text, ("text",), "text",
           lambda r: [{"role": "user", "content": ""}, {"role": "assistant", "content": r["text"]}]),
    Format("classification", _classification, ("text", "label"), "text",
           lambda r: [{"role": "user", "content": f"Classify this text.\n\n{r['text']}"},
                      {"role": "assistant", "content": str(r["label"])}]),
    Format("ner", _ner, ("tokens", "tags"), "tokens",
           lambda r: [{"role": "user", "content": "Tag each token with its BIO entity tag.\n\n" + " ".join(r["tokens"])},
                      {"role": "assistant", "content": " ".join(r["tags"])}], csv=False),
    Format("translation", _translation, ("source", "target", "source_lang", "target_lang"), "(record)",
           lambda r: [{"role": "user", "content": f"Translate from {r['source_lang']} to {r['target_lang']}:"
                                                  f"\n\n{r['source']}"},
                      {"role": "assistant", "content": r["target"]}]),
    Format("qa", _qa, ("context", "question", "answer", "answer_start"), "(record)", _qa_chat),
    # DPO pairs (OpenAI's DPO rows, TRL's prompt/chosen/rejected); trains as prompt + chosen under SFT
    Format("preference", _preference, ("input", "preferred_output", "non_preferred_output"), "(record)",
           _preference_chat, csv=False, tools=lambda r: toolrows.record_tools(preference_openai(r)["input"]),
           conversations=lambda r: [_preference_chat(r, "chosen"), _preference_chat(r, "rejected")],
           canonical=preference_openai, token_issues="tuneops.training.preference:token_issues"),
)}


def get(name: str) -> Format:
    try:
        return FORMAT_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r} (one of {', '.join(FORMAT_SPECS)})") from None


def record_issues(fmt: str, obj: Any, opts: dict[str, Any] | None = None) -> list[Issue]:
    if not isinstance(obj, dict):
        return [("(record)", "type", f"expected a JSON object, got {type(obj).__name__}")]
    out: list[Issue] = []
    get(fmt).check(obj, out, opts or {})
    return out


def check_record(fmt: str, path: str, line: int, obj: Any, opts: dict[str, Any] | None = None) -> list[Problem]:
    return [Problem(path, line, f, rule, msg) for f, rule, msg in record_issues(fmt, obj, opts)]


def check_chat(path: str, line: int, obj: Any) -> list[Problem]:
    """Schema, roles and content of one chat record (OpenAI/Azure fine-tuning format)."""
    return check_record("chat", path, line, obj)
