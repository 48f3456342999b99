"""Graders: outputs scored declaratively, in OpenAI's grader JSON (issue 32), on the eval split.

``evaluate.graders`` in params.yaml is a list of grader objects as OpenAI's Evals / reinforcement
fine-tuning API writes them; ``TYPES`` is the one registry of grader types (a ``GraderType`` each:
its fields, how it checks them, how it scores one sample), read by the config check
(``tuneops.config``), evaluate (base and fine-tuned) and register's champion gate (champion and
candidate re-scored the same way):

``string_check``
    ``{"type": "string_check", "name": N, "input": "{{sample.output_text}}", "reference":
    "{{item.reference}}", "operation": "eq" | "ne" | "like" | "ilike"}``: 1 or 0 (``like``: the input
    contains the reference; ``ilike``: the same, ignoring case).
``text_similarity``
    ``{"type": "text_similarity", "name": N, "input": ..., "reference": ..., "evaluation_metric": M,
    "pass_threshold": 0.8}``: a score in [0, 1] (``METRICS``, pure Python, nothing to download):
    ``fuzzy_match`` (difflib's ratio), ``bleu`` (sentence BLEU-4, brevity penalty, sacrebleu's
    ``exp`` smoothing), ``gleu`` (Google-BLEU: min of n-gram precision and recall, n = 1..4),
    ``rouge_1`` .. ``rouge_5`` (n-gram F1) and ``rouge_l`` (LCS F1) over lower-cased alphanumeric
    words as ``rouge-score`` tokenizes. ``cosine`` (an embedding model) and ``meteor`` (WordNet
    synonyms and a stemmer) are not offered: the config check says so. ``pass_threshold`` (optional)
    adds the share of samples at or above it.
``tool_call`` (tuneops' own; OpenAI has no tool-call grader)
    ``{"type": "tool_call", "name": N, "match": "name" | "arguments" | "schema", "items": "tools" |
    "calls"}``: the calls the model made (``{{sample.output_tools}}``) against the reference turn's
    (``{{item.tool_calls}}``), as multisets of calls: ``name`` the same function names; ``arguments``
    the same names and arguments equal as JSON; ``schema`` the same names and each call's arguments
    valid against the declared function's ``parameters`` (``{{item.tools}}``). A reply whose call does
    not parse (bad JSON in the markers) fails; a reference without calls passes only a reply without
    calls. ``items``: the turns it grades, ``tools`` (default: every turn of a row that declares
    tools) or ``calls`` (only turns whose reference makes a call: tool-call accuracy proper).

Templates: ``{{sample.<field>}}`` (``output_text``: the reply's content, tool calls removed;
``output_json``: that content parsed as JSON, else null; ``output_tools``: the calls,
``[{"name", "arguments"}]``) and ``{{item.<field>[.<field>...]}}`` (the eval row's own fields and:
``reference``, the reference turn's content; ``tool_calls``, its calls; ``tools``, the declared
functions; ``messages``, the prompt). A template that is one placeholder is that value; otherwise each
placeholder is replaced by its text (JSON for what is not a string).

Items: every eval row (``evaluate.max_samples``) gives one item per assistant turn that calls a tool,
plus its last assistant turn (a plain chat row: one item, the turn evaluate's generations show); the
prompt is the conversation before the turn. Samples are greedy replies (``evaluate.max_new_tokens``)
decoded with the special tokens kept (``toolcalls.reply_text``: Llama's ``<|python_tag|>``, Mistral's
``[TOOL_CALLS]`` are special tokens) and split by the tokenizer's tool format into content and calls.
A grader's score is the mean over the items it applies to (``None`` when there are none).
"""
from __future__ import annotations

import difflib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

Item = dict[str, Any]
Sample = dict[str, Any]

PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")   # a metric name MLflow and the tags take as is


class GraderError(ValueError):
    """A grader declaration that is not valid (the message names the grader and its field)."""


# -- templates ------------------------------------------------------------------------------------------

def _check_template(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise GraderError(f"{where}: must be a string template such as '{{{{sample.output_text}}}}' (got {value!r})")
    for path in PLACEHOLDER.findall(value):
        parts = path.split(".")
        if parts[0] not in ("sample", "item") or len(parts) < 2 or not all(parts[1:]):
            raise GraderError(f"{where}: '{{{{{path}}}}}' must name sample.<field> or item.<field>")
        if parts[0] == "sample" and parts[1] not in SAMPLE_FIELDS:
            raise GraderError(f"{where}: sample.{parts[1]} is not a sample field (known: {', '.join(SAMPLE_FIELDS)})")
    return value


def _lookup(path: str, sample: Sample, item: Item) -> Any:
    parts = path.split(".")
    node: Any = sample if parts[0] == "sample" else item
    for k, part in enumerate(parts[1:], 1):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(".".join(parts[:k + 1]))
    return node


def render(template: str, sample: Sample, item: Item) -> Any:
    """The template's value: one placeholder alone is its value as is; otherwise text."""
    whole = PLACEHOLDER.fullmatch(template.strip())
    if whole:
        return _lookup(whole.group(1), sample, item)

    def text(m: re.Match[str]) -> str:
        value = _lookup(m.group(1), sample, item)
        return value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)

    return PLACEHOLDER.sub(text, template)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else json.dumps(value, ensure_ascii=False)


# -- text similarity metrics (pure Python) ---------------------------------------------------------------

def _words(text: str) -> list[str]:
    """BLEU / GLEU tokens: words and punctuation marks, case kept (close to sacrebleu's 13a)."""
    return re.findall(r"\w+|[^\w\s]", text)


def _rouge_words(text: str) -> list[str]:
    """ROUGE tokens as rouge-score's default tokenizer makes them: lower case, alphanumeric runs."""
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def fuzzy_match(hyp: str, ref: str) -> float:
    return difflib.SequenceMatcher(None, hyp, ref, autojunk=False).ratio() if (hyp or ref) else 1.0


def bleu(hyp: str, ref: str, max_n: int = 4) -> float:
    """Sentence BLEU-4 (uniform weights, brevity penalty, the orders the hypothesis has; the k-th order
    without matches gets 1 / (2^k * total): sacrebleu's ``exp`` smoothing)."""
    h, r = _words(hyp), _words(ref)
    if not h or not r:
        return 1.0 if h == r else 0.0
    logs, orders, smooth = 0.0, 0, 1.0
    for n in range(1, max_n + 1):
        hn, rn = _ngrams(h, n), _ngrams(r, n)
        total = sum(hn.values())
        if total == 0:                     # a hypothesis shorter than n: the orders it has (effective order)
            break
        orders += 1
        match = sum(min(c, rn[g]) for g, c in hn.items())
        if match == 0:
            smooth *= 2
            logs += math.log(1 / (smooth * total))
        else:
            logs += math.log(match / total)
    bp = 1.0 if len(h) > len(r) else math.exp(1 - len(r) / len(h))
    return bp * math.exp(logs / orders)


def gleu(hyp: str, ref: str, max_n: int = 4) -> float:
    """Google-BLEU (Wu et al. 2016): matching 1..4-grams over the larger of the two n-gram totals."""
    h, r = _words(hyp), _words(ref)
    hn = sum((_ngrams(h, n) for n in range(1, max_n + 1)), Counter())
    rn = sum((_ngrams(r, n) for n in range(1, max_n + 1)), Counter())
    if not hn and not rn:
        return 1.0
    match = sum((hn & rn).values())
    return match / max(sum(hn.values()), sum(rn.values()))


def _f1(match: int, hyp_total: int, ref_total: int) -> float:
    if hyp_total == 0 and ref_total == 0:
        return 1.0
    if match == 0:
        return 0.0
    p, r = match / hyp_total, match / ref_total
    return 2 * p * r / (p + r)


def rouge_n(hyp: str, ref: str, n: int) -> float:
    hn, rn = _ngrams(_rouge_words(hyp), n), _ngrams(_rouge_words(ref), n)
    return _f1(sum((hn & rn).values()), sum(hn.values()), sum(rn.values()))


def rouge_l(hyp: str, ref: str) -> float:
    h, r = _rouge_words(hyp), _rouge_words(ref)
    prev = [0] * (len(r) + 1)
    for a in h:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    return _f1(prev[-1], len(h), len(r))


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match, "bleu": bleu, "gleu": gleu,
    **{f"rouge_{n}": (lambda h, r, n=n: rouge_n(h, r, n)) for n in range(1, 6)},
    "rouge_l": rouge_l,
}
NOT_OFFERED = {"cosine": "needs an embedding model", "meteor": "needs WordNet synonyms and a stemmer"}


# -- tool calls -----------------------------------------------------------------------------------------

def _call(value: Any) -> dict[str, Any] | None:
    """{"name", "arguments" (parsed)} of a call in our shape or OpenAI's ``tool_calls[]`` shape."""
    if not isinstance(value, dict):
        return None
    fn = value.get("function", value)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        return None
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"name": fn["name"], "arguments": args}


def _calls(value: Any) -> list[dict[str, Any]] | None:
    if value is None or value == "":
        return [] if value == "" else None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    items = value if isinstance(value, list) else [value]
    calls = [_call(v) for v in items]
    return None if any(c is None for c in calls) else calls   # type: ignore[return-value]


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _schema_ok(call: dict[str, Any], tools: Any) -> bool:
    from jsonschema import validators

    for t in tools or []:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name") == call["name"]:
            schema = fn.get("parameters") or {"type": "object"}
            try:
                cls = validators.validator_for(schema)
                return not any(True for _ in cls(schema).iter_errors(call["arguments"]))
            except Exception:  # noqa: BLE001 - a schema jsonschema cannot use: not valid against it
                return False
    return False


# -- the registry ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GraderType:
    """One grader type: ``fields`` (name -> (required, check)), ``defaults``, ``score`` (one sample
    against its item, in [0, 1]), ``applies`` (whether an item is graded at all), ``passed``."""
    name: str
    fields: dict[str, tuple[bool, Callable[[Any, str], Any]]]
    score: Callable[[dict[str, Any], Sample, Item], float]
    defaults: dict[str, Any] = field(default_factory=dict)
    applies: Callable[[dict[str, Any], Item], bool] = lambda g, item: True
    doc: str = ""


def _one_of(*names: str) -> Callable[[Any, str], Any]:
    def check(value: Any, where: str) -> Any:
        if value not in names:
            raise GraderError(f"{where}: must be one of {', '.join(names)} (got {value!r})")
        return value
    return check


def _metric(value: Any, where: str) -> Any:
    if value in NOT_OFFERED:
        raise GraderError(f"{where}: {value!r} {NOT_OFFERED[value]}, which tuneops does not ship; "
                          f"use one of {', '.join(METRICS)}")
    return _one_of(*METRICS)(value, where)


def _threshold(value: Any, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise GraderError(f"{where}: must be a number from 0 to 1 (got {value!r})")
    return value


def _string_check(g: dict[str, Any], sample: Sample, item: Item) -> float:
    a, b = _text(render(g["input"], sample, item)), _text(render(g["reference"], sample, item))
    op = g["operation"]
    ok = (a == b if op == "eq" else a != b if op == "ne" else b in a if op == "like" else b.lower() in a.lower())
    return 1.0 if ok else 0.0


def _text_similarity(g: dict[str, Any], sample: Sample, item: Item) -> float:
    a, b = _text(render(g["input"], sample, item)), _text(render(g["reference"], sample, item))
    return float(METRICS[g["evaluation_metric"]](a, b))


def _tool_call(g: dict[str, Any], sample: Sample, item: Item) -> float:
    got, want = _calls(render(g["input"], sample, item)), _calls(render(g["reference"], sample, item))
    if got is None or want is None:
        return 0.0
    if sorted(c["name"] for c in got) != sorted(c["name"] for c in want):
        return 0.0
    if g["match"] == "arguments":
        return float(sorted(map(_canon, got)) == sorted(map(_canon, want)))
    if g["match"] == "schema":
        tools = render(g["tools"], sample, item)
        return float(all(_schema_ok(c, tools) for c in got))
    return 1.0


def _tool_items(g: dict[str, Any], item: Item) -> bool:
    return bool(item.get("tool_calls")) if g["items"] == "calls" else bool(item.get("tools"))


_COMMON = {"type": (True, lambda v, w: v), "name": (True, lambda v, w: v),
           "input": (True, _check_template), "reference": (True, _check_template)}

TYPES: dict[str, GraderType] = {t.name: t for t in (
    GraderType("string_check", {**_COMMON, "operation": (True, _one_of("eq", "ne", "like", "ilike"))},
               _string_check, doc="1 when the input equals / differs from / contains the reference, else 0"),
    GraderType("text_similarity", {**_COMMON, "evaluation_metric": (True, _metric),
                                   "pass_threshold": (False, _threshold)},
               _text_similarity, doc="similarity of input and reference in [0, 1] (METRICS)"),
    GraderType("tool_call", {**_COMMON, "input": (False, _check_template), "reference": (False, _check_template),
                             "tools": (False, _check_template), "match": (True, _one_of("name", "arguments", "schema")),
                             "items": (False, _one_of("tools", "calls"))},
               _tool_call, defaults={"input": "{{sample.output_tools}}", "reference": "{{item.tool_calls}}",
                                     "tools": "{{item.tools}}", "items": "tools"},
               applies=_tool_items, doc="the model's tool calls against the reference turn's"),
)}


def check(graders: Any) -> list[dict[str, Any]]:
    """``evaluate.graders`` as given, each checked against its type (a ``GraderError`` names the
    grader and the field); returns them with their defaults filled in."""
    if not isinstance(graders, list):
        raise GraderError(f"must be a list of grader objects (got {graders!r})")
    out, names = [], set()
    for i, g in enumerate(graders):
        where = f"graders[{i}]"
        if not isinstance(g, dict):
            raise GraderError(f"{where}: must be a grader object with 'type' and 'name' (got {g!r})")
        kind = TYPES.get(g.get("type"))  # type: ignore[arg-type]
        if kind is None:
            raise GraderError(f"{where}.type: must be one of {', '.join(TYPES)} (got {g.get('type')!r})")
        name = g.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise GraderError(f"{where}.name: must be letters, digits, '_', '.', '-' (a metric name; got {name!r})")
        where = f"graders[{i}] ({name})"
        if name in names:
            raise GraderError(f"{where}.name: another grader has this name")
        names.add(name)
        unknown = sorted(set(g) - set(kind.fields))
        if unknown:
            raise GraderError(f"{where}.{unknown[0]}: unknown field for a {kind.name} grader "
                              f"(known: {', '.join(kind.fields)})")
        spec = {**kind.defaults, **g}
        for key, (required, check_field) in kind.fields.items():
            if key not in spec:
                if required:
                    raise GraderError(f"{where}.{key}: required field is missing")
                continue
            check_field(spec[key], f"{where}.{key}")
        out.append(spec)
    return out


def metric_name(grader: str) -> str:
    """The metric a grader's score is recorded as (``base_<it>``, ``finetuned_<it>``, MLflow ``eval_<it>``)."""
    return f"grader_{grader}"


# -- items and samples ----------------------------------------------------------------------------------

def items(rows: list[dict[str, Any]]) -> list[Item]:
    """The graded turns of chat rows (see the module doc)."""
    from .chat import openai_messages, record_tools

    out: list[Item] = []
    for index, row in enumerate(rows):
        messages = openai_messages(row["messages"])
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if not turns:
            continue
        graded = [i for i in turns if messages[i].get("tool_calls")]
        if turns[-1] not in graded:
            graded.append(turns[-1])
        tools = record_tools(row)
        extra = {k: v for k, v in row.items() if k not in ("messages", "tools", "functions")}
        for i in graded:
            reply = messages[i]
            out.append({**extra, "row": index, "turn": i, "messages": row["messages"][:i], "tools": tools,
                        "reference": reply.get("content") or "",
                        "tool_calls": [_call(tc) for tc in reply.get("tool_calls") or []]})
    return out


def sample_replies(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
                   tools: list[list[dict[str, Any]] | None], max_new_tokens: int,
                   batch_size: int) -> list[Sample]:
    """Greedy replies as samples: ``text`` (as the model wrote it: the markers of its calls kept for
    a conversation with tools, else special tokens removed), ``output_text``, ``output_json``,
    ``output_tools`` (``None`` when a call did not parse; ``tool_error`` says why)."""
    from . import decode, toolcalls
    from .chat import tool_format

    out: list[Sample | None] = [None] * len(conversations)
    order = sorted(range(len(conversations)), key=lambda i: len(json.dumps(conversations[i])))
    fmt = None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids = decode.reply_ids(model, tokenizer, [conversations[i] for i in chunk], max_new_tokens,
                               [tools[i] for i in chunk])
        for i, reply in zip(chunk, ids):
            if not tools[i]:
                text = tokenizer.decode(reply, skip_special_tokens=True).strip()
                out[i] = {"text": text, "output_text": text, "output_tools": []}
            else:
                fmt = fmt or tool_format(tokenizer)
                text = toolcalls.reply_text(tokenizer, reply)
                try:
                    content, calls = fmt.split(text)
                    out[i] = {"text": text, "output_text": content, "output_tools": calls}
                except toolcalls.ToolCallError as exc:
                    out[i] = {"text": text, "output_text": text, "output_tools": None, "tool_error": str(exc)}
    for s in out:
        assert s is not None
        try:
            s["output_json"] = json.loads(s["output_text"])
        except (json.JSONDecodeError, TypeError):
            s["output_json"] = None
    return out  # type: ignore[return-value]


def sample(model: Any, tokenizer: Any, graded: list[Item], max_new_tokens: int, batch_size: int) -> list[Sample]:
    """A greedy sample for each item."""
    return sample_replies(model, tokenizer, [it["messages"] for it in graded], [it["tools"] for it in graded],
                          max_new_tokens, batch_size)


def score(graders: list[dict[str, Any]], graded: list[Item], samples: list[Sample | None]) -> dict[str, Any]:
    """Per grader: ``score`` (mean over the items it applies to, ``None`` when none), ``n`` and, with a
    ``pass_threshold``, ``pass_rate``; and ``per_item``: each item's scores (``None``: not graded)."""
    results: dict[str, Any] = {}
    per_item: list[dict[str, float | None]] = [{} for _ in graded]
    for g in graders:
        kind = TYPES[g["type"]]
        values = []
        for k, (item, smp) in enumerate(zip(graded, samples)):
            if smp is None or not kind.applies(g, item):
                per_item[k][g["name"]] = None
                continue
            try:
                v = kind.score(g, smp, item)
            except KeyError as exc:
                raise GraderError(f"grader {g['name']}: the eval row {item.get('row')} has no {exc.args[0]} "
                                  f"(a field its templates name)") from None
            per_item[k][g["name"]] = v
            values.append(v)
        res: dict[str, Any] = {"type": g["type"], "n": len(values),
                               "score": sum(values) / len(values) if values else None}
        if "pass_threshold" in g:
            res["pass_rate"] = (sum(v >= g["pass_threshold"] for v in values) / len(values)) if values else None
        results[g["name"]] = res
    return {"graders": results, "per_item": per_item}


def grade(model: Any, tokenizer: Any, graders: list[dict[str, Any]], graded: list[Item], max_new_tokens: int,
          batch_size: int) -> tuple[dict[str, Any], list[Sample | None]]:
    """Sample with ``model`` the items some grader applies to, and score them: (``score``'s result,
    the samples, ``None`` for an item no grader applies to: not generated)."""
    needed = [k for k, it in enumerate(graded) if any(TYPES[g["type"]].applies(g, it) for g in graders)]
    drawn = sample(model, tokenizer, [graded[k] for k in needed], max_new_tokens, batch_size)
    samples: list[Sample | None] = [None] * len(graded)
    for k, smp in zip(needed, drawn):
        samples[k] = smp
    return score(graders, graded, samples), samples


def flat(prefix: str, result: dict[str, Any]) -> dict[str, float]:
    """A ``score`` result as metrics: ``<prefix>_grader_<name>`` (and ``..._pass_rate``), scored ones only."""
    out: dict[str, float] = {}
    for name, r in result["graders"].items():
        if r["score"] is not None:
            out[f"{prefix}_{metric_name(name)}"] = r["score"]
        if r.get("pass_rate") is not None:
            out[f"{prefix}_{metric_name(name)}_pass_rate"] = r["pass_rate"]
    return out


def declared(graders: Iterable[dict[str, Any]]) -> list[str]:
    return [g["name"] for g in graders]
