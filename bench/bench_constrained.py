"""Constrained (JSON-schema) decoding on CPU: llguidance vs xgrammar vs outlines-core, measured over
numpy logits with the bundled SmolLM2 tokenizer (vocabulary 49,152), for issue 32.

Runs standalone (nothing in tuneops imports it)::

    tuneops --set model.source=smollm2 model            # once: models/base (tokenizer + weights)
    python bench/bench_constrained.py                   # masks + validity over random logits
    python bench/bench_constrained.py --onnx scratch/onnx/int8/model.onnx   # + end-to-end decode tok/s

What it measures, per library:

* **adapter**: building the library's tokenizer view from the Hugging Face tokenizer (once per model);
* **compile**: JSON schema -> matcher, per schema (caches off; llguidance builds lazily, so its first
  mask is reported too);
* **mask**: per-token time to fill the next-token bitmask (median, p95), plus the numpy time to apply it
  to a logits row and to advance the matcher with the chosen token;
* **validity**: every request decodes greedy or sampled over *random* logits (a model that knows nothing
  about JSON), the output is checked with ``jsonschema``; "finished" means the matcher allowed EOS and
  EOS was picked; "truncated" means the token budget ran out first (plain random logits rarely close a
  string: ``--quote-bias`` raises the tokens holding a quote, which changes lengths, not validity);
* **tool-call grammar** (llguidance): each ``tuneops.inference.toolcalls`` format's whole call text (markers +
  ``call_schema`` JSON) as one grammar, decoded and read back with the format's ``parse``;
* **EOS**: which tokens a matcher allows once the JSON is complete, and whether it stops after EOS;
* **end to end** (``--onnx``): decode tok/s of an ONNX causal LM (``tuneops.inference.runtimes.OnnxCausalLM``) with
  no schema and with each library, the mask computed after the forward (sequential) or in a thread while
  ONNX Runtime runs the next forward (overlapped; both release the GIL).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

LIBS = ("llguidance", "xgrammar", "outlines-core")


# -- schema corpus ----------------------------------------------------------------------------------

WORDS = ["name", "city", "id", "count", "price", "tags", "kind", "unit", "date", "score", "note", "user",
         "items", "mode", "level", "email", "code", "flag", "owner", "zone", "size", "color", "title", "rank"]
PATTERNS = [r"^[A-Z]{3}-[0-9]{2,4}$", r"^\d{3}-\d{4}$", r"^[a-z]+(_[a-z]+)*$", r"^#[0-9a-f]{6}$",
            r"^v\d+\.\d+\.\d+$"]


def _leaf(rng: np.random.Generator) -> dict[str, Any]:
    k = rng.integers(0, 11)
    if k == 0:
        return {"type": "string"}
    if k == 1:
        return {"type": "string", "maxLength": int(rng.integers(1, 16))}
    if k == 2:
        return {"type": "string", "enum": [str(w) for w in rng.choice(WORDS, size=int(rng.integers(2, 5)), replace=False)]}
    if k == 3:
        return {"type": "string", "pattern": str(rng.choice(PATTERNS))}
    if k == 4:
        lo = int(rng.integers(-50, 50))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(1, 1000))}
    if k == 5:
        return {"type": "integer"}
    if k == 6:
        return {"type": "number"}
    if k == 7:
        return {"type": "boolean"}
    if k == 8:
        return {"type": "null"}
    if k == 9:
        return {"const": str(rng.choice(WORDS))}
    return {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 8}]}


def _node(rng: np.random.Generator, depth: int) -> dict[str, Any]:
    r = rng.random()
    if depth > 0 and r < 0.25:
        return _object(rng, depth - 1)
    if depth > 0 and r < 0.45:
        arr: dict[str, Any] = {"type": "array", "items": _node(rng, depth - 1)}
        if rng.random() < 0.7:
            arr["maxItems"] = int(rng.integers(1, 5))
        if rng.random() < 0.4:
            arr["minItems"] = 1
        return arr
    if depth > 0 and r < 0.52:
        return {"anyOf": [_node(rng, depth - 1), _node(rng, depth - 1)]}
    return _leaf(rng)


def _object(rng: np.random.Generator, depth: int) -> dict[str, Any]:
    keys = [str(k) for k in rng.choice(WORDS, size=int(rng.integers(1, 6)), replace=False)]
    props = {k: _node(rng, depth) for k in keys}
    obj: dict[str, Any] = {"type": "object", "properties": props,
                           "required": [k for k in keys if rng.random() < 0.7]}
    if rng.random() < 0.6:
        obj["additionalProperties"] = False
    return obj


def tool_schema(functions: list[dict[str, Any]], parallel: bool = False) -> dict[str, Any]:
    """A call to one of ``functions`` (OpenAI ``tools[].function``): anyOf over
    ``{"name": const, "arguments": parameters}``; an array of them for parallel calls."""
    call = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                       "required": ["name", "arguments"], "additionalProperties": False} for f in functions]}
    return {"type": "array", "items": call, "minItems": 1, "maxItems": 3} if parallel else call


FUNCTIONS = [
    {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}},
    {"name": "search_flights", "parameters": {"type": "object", "properties": {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$"}, "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9}, "nonstop": {"type": "boolean"}},
        "required": ["origin", "destination", "passengers"], "additionalProperties": False}},
    {"name": "add_todo", "parameters": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 30}, "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "labels": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
        "required": ["title"], "additionalProperties": False}},
    {"name": "no_args", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
]


def corpus(n: int, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """``n`` varied schemas: random nested objects (enums, patterns, bounds, anyOf, const, arrays,
    required subsets), hand-written ones, and tool calls (one / several functions, parallel)."""
    rng = np.random.default_rng(seed)
    fixed: list[tuple[str, dict[str, Any]]] = [
        ("tool:single", tool_schema(FUNCTIONS[:1])),
        ("tool:anyOf4", tool_schema(FUNCTIONS)),
        ("tool:parallel", tool_schema(FUNCTIONS[:3], parallel=True)),
        ("person", {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                     "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                                     "email": {"type": "string", "pattern": r"^[a-z]+@[a-z]+\.com$"}},
                    "required": ["name", "age"], "additionalProperties": False}),
        ("enum-root", {"enum": ["yes", "no", "maybe"]}),
        ("array-root", {"type": "array", "items": {"type": "integer"}, "maxItems": 4}),
        ("nested3", {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {
            "type": "object", "properties": {"c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
            "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]}),
        ("json_object", {"type": "object"}),
    ]
    out = list(fixed)
    while len(out) < n:
        out.append((f"random:{len(out)}", _object(rng, int(rng.integers(0, 3)))))
    return out[:n]


# -- library adapters -------------------------------------------------------------------------------

def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character that stands for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class Matcher:
    """One request's constraint: ``fill(bitmask)``, ``accept(token)``, ``done()`` (EOS allowed / stopped)."""

    def fill(self, bitmask: np.ndarray) -> None: ...
    def accept(self, token: int) -> bool: ...
    def finished(self) -> bool: ...


class Library:
    name: str

    def compile(self, schema: dict[str, Any]) -> Callable[[], Matcher]:
        """Compile ``schema``; returns a factory of fresh matchers (raises on an unsupported schema)."""
        raise NotImplementedError


class LLGuidance(Library):
    name = "llguidance"

    def __init__(self, tok: Any, vocab: int):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)

    def compile(self, schema: dict[str, Any]) -> Callable[[], Matcher]:
        ll = self.ll
        grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        err = ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if err:
            raise ValueError(err)
        tokenizer = self.tokenizer

        class M(Matcher):
            def __init__(self) -> None:
                self.m = ll.LLMatcher(tokenizer, grammar, log_level=0)

            def fill(self, bitmask: np.ndarray) -> None:
                self.m.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

            def accept(self, token: int) -> bool:
                return self.m.consume_token(token)

            def finished(self) -> bool:
                return self.m.is_stopped()

        first = M()
        if first.m.is_error():
            raise ValueError(first.m.get_error())
        return M


class XGrammar(Library):
    name = "xgrammar"

    def __init__(self, tok: Any, vocab: int):
        import torch
        import xgrammar as xgr

        self.xgr, self.torch = xgr, torch
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Callable[[], Matcher]:
        xgr, torch = self.xgr, self.torch
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

        class M(Matcher):
            def __init__(self) -> None:
                self.m = xgr.GrammarMatcher(compiled)

            def fill(self, bitmask: np.ndarray) -> None:
                self.m.fill_next_token_bitmask(torch.from_numpy(bitmask.reshape(1, -1)))

            def accept(self, token: int) -> bool:
                return self.m.accept_token(token)

            def finished(self) -> bool:
                return self.m.is_terminated()

        return M


class OutlinesCore(Library):
    name = "outlines-core"

    def __init__(self, tok: Any, vocab: int):
        import outlines_core as oc

        self.oc = oc
        dec = _byte_decoder()
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        tokens: dict[bytes, list[int]] = {}
        for text, i in tok.get_vocab().items():
            if i in special or i >= vocab:
                continue
            tokens.setdefault(bytes(dec[c] for c in text), []).append(i)
        self.vocabulary = oc.Vocabulary(tok.eos_token_id, tokens)

    def compile(self, schema: dict[str, Any]) -> Callable[[], Matcher]:
        oc = self.oc
        regex = oc.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        index = oc.Index(regex, self.vocabulary)
        eos = self.vocabulary.get_eos_token_id()

        class M(Matcher):
            def __init__(self) -> None:
                self.g = oc.Guide(index)
                self.stopped = False

            def fill(self, bitmask: np.ndarray) -> None:
                self.g.write_mask_into(bitmask.ctypes.data, bitmask.size, 4)

            def accept(self, token: int) -> bool:
                if token == eos:
                    self.stopped = self.g.is_finished()
                    return self.stopped
                try:
                    self.g.advance(token, return_tokens=False)
                    return True
                except Exception:
                    return False

            def finished(self) -> bool:
                return self.stopped

        return M


def make_library(name: str, tok: Any, vocab: int) -> Library:
    return {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}[name](tok, vocab)


# -- decoding over numpy logits ---------------------------------------------------------------------

def allowed(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab].astype(bool)


def apply_mask(logits: np.ndarray, bitmask: np.ndarray) -> None:
    """Masked tokens to -inf, in place (numpy; the same for every library)."""
    logits[~allowed(bitmask, logits.shape[-1])] = -np.inf


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


_POOL: dict[int, np.ndarray] = {}


def random_rows(vocab: int, n: int = 64) -> np.ndarray:
    if vocab not in _POOL:
        _POOL[vocab] = np.random.default_rng(1234).standard_normal((n, vocab)).astype(np.float32) * 3.0
    return _POOL[vocab]


def quote_tokens(tok: Any) -> np.ndarray:
    """Ids of the tokens whose text holds a double quote (the tokens that can close a JSON string)."""
    return np.array([i for t, i in tok.get_vocab().items() if '"' in tok.convert_tokens_to_string([t])], np.int64)


def decode_random(factory: Callable[[], Matcher], tok: Any, vocab: int, eos: int, rng: np.random.Generator,
                  sample: bool, max_tokens: int, timing: dict[str, list[float]],
                  quote_ids: np.ndarray | None = None, quote_bias: float = 0.0) -> tuple[str, str, list[int]]:
    """Constrained decoding over random logits; returns (status, text, tokens). ``quote_bias`` raises the
    logits of ``quote_ids``: a random model that closes its strings sooner (it changes lengths only; the
    mask alone decides validity)."""
    m = factory()
    bitmask = np.full((vocab + 31) // 32, -1, np.int32)
    out: list[int] = []
    pool = random_rows(vocab)
    for _ in range(max_tokens):
        # a random row of the pool, shifted by a random roll: a fresh random logits vector per step
        # without drawing 49,152 normals each time (the pool is reused across requests)
        logits = np.roll(pool[rng.integers(len(pool))], int(rng.integers(vocab)))
        if quote_ids is not None:
            logits[quote_ids] += quote_bias
        t0 = time.perf_counter()
        m.fill(bitmask)
        t1 = time.perf_counter()
        apply_mask(logits, bitmask)
        ta = time.perf_counter()
        nxt = int(np.argmax(logits))
        if not np.isfinite(logits[nxt]):
            return "empty-mask", tok.decode(out), out
        if sample:                                   # softmax sampling (temperature 1) over the allowed tokens
            c = np.cumsum(np.exp(logits - logits[nxt]))
            nxt = int(np.searchsorted(c, rng.random() * c[-1], side="right"))   # never a zero-probability id
        t2 = time.perf_counter()
        ok = m.accept(nxt)
        t3 = time.perf_counter()
        timing["fill"].append(t1 - t0)
        timing["apply"].append(ta - t1)
        timing["accept"].append(t3 - t2)
        if not ok:
            return "rejected", tok.decode(out), out
        if nxt == eos:
            return ("finished" if m.finished() else "eos-not-stopped"), tok.decode(out), out
        out.append(nxt)
    return "truncated", tok.decode(out), out


def run_validity(lib: Library, schemas: list[tuple[str, dict[str, Any]]], tok: Any, vocab: int,
                 max_tokens: int, seed: int, quote_bias: float = 0.0) -> dict[str, Any]:
    import jsonschema

    eos = tok.eos_token_id
    quote_ids = quote_tokens(tok) if quote_bias else None
    timing: dict[str, list[float]] = {"fill": [], "apply": [], "accept": []}
    compile_s: list[float] = []
    first_mask_s: list[float] = []
    counts: dict[str, int] = {}
    invalid: list[dict[str, Any]] = []
    unsupported: list[str] = []
    tokens_out: list[int] = []
    tool_ok = tool_n = 0
    for i, (label, schema) in enumerate(schemas):
        t0 = time.perf_counter()
        try:
            factory = lib.compile(schema)
        except Exception as exc:  # noqa: BLE001 - an unsupported schema is a result, not a crash
            unsupported.append(f"{label}: {str(exc)[:120]}")
            counts["unsupported"] = counts.get("unsupported", 0) + 1
            continue
        compile_s.append(time.perf_counter() - t0)
        probe = factory()
        bm = np.full((vocab + 31) // 32, -1, np.int32)
        t0 = time.perf_counter()
        probe.fill(bm)
        first_mask_s.append(time.perf_counter() - t0)
        rng = np.random.default_rng(seed + i)
        status, text, toks = decode_random(factory, tok, vocab, eos, rng, sample=bool(i % 2), max_tokens=max_tokens,
                                           timing=timing, quote_ids=quote_ids, quote_bias=quote_bias)
        counts[status] = counts.get(status, 0) + 1
        tokens_out.append(len(toks))
        if status == "finished":
            try:
                value = json.loads(text)
                jsonschema.validate(value, schema)
                ok = True
            except Exception as exc:  # noqa: BLE001
                ok = False
                invalid.append({"schema": label, "text": text[:200], "error": str(exc)[:200]})
            counts["valid"] = counts.get("valid", 0) + int(ok)
            if label.startswith("tool:") and ok:
                calls = value if isinstance(value, list) else [value]
                names = {f["name"] for f in FUNCTIONS}
                tool_ok += all(c["name"] in names for c in calls)
            tool_n += label.startswith("tool:")
    return {"compile_s": compile_s, "first_mask_s": first_mask_s, "timing": timing, "counts": counts,
            "invalid": invalid, "unsupported": unsupported, "tokens": tokens_out,
            "tool_calls_named_ok": f"{tool_ok}/{tool_n}"}


def eos_behaviour(lib: Library, tok: Any, vocab: int) -> dict[str, Any]:
    """Force the JSON text ``{"a": 1}`` token by token, then see what the matcher allows and whether
    it stops after EOS."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    factory = lib.compile(schema)
    m = factory()
    bm = np.full((vocab + 31) // 32, -1, np.int32)
    ids: list[int] = []
    for text in ('{"a":1}', '{"a": 1}'):
        m = factory()
        ids = tok.encode(text, add_special_tokens=False)
        if all(m.accept(t) for t in ids):
            break
    else:
        return {"accepts": False}
    m.fill(bm)
    allow = np.nonzero(allowed(bm, vocab))[0].tolist()
    stopped = m.accept(tok.eos_token_id) and m.finished()
    return {"text": tok.decode(ids), "allowed_after_json": [tok.convert_ids_to_tokens(int(i)) for i in allow][:8],
            "n_allowed": len(allow), "stops_after_eos": bool(stopped)}


def tool_grammar_check(tok: Any, vocab: int, n: int, seed: int) -> dict[str, Any]:
    """llguidance only: the whole tool-call text of each ``tuneops.inference.toolcalls`` format (markers + the call
    JSON of ``call_schema``) as one Lark grammar, decoded over random logits and read back with the
    format's ``parse``. The JSON must not allow free whitespace (``x-guidance``), or a random model
    fills the budget with it."""
    import llguidance
    import llguidance.hf

    from tuneops.inference import toolcalls

    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    names = {f["name"] for f in FUNCTIONS}
    out: dict[str, Any] = {}
    for fmt in (toolcalls.DEFAULT, toolcalls.HERMES, toolcalls.LLAMA3, toolcalls.MISTRAL, toolcalls.PHI4_MINI):
        schema = dict(fmt.call_schema(FUNCTIONS, parallel=fmt.parallel))
        schema["x-guidance"] = {"whitespace_flexible": False}
        pre = fmt.start + ("\n" if fmt.start and not fmt.many else "")
        post = ("\n" if fmt.end and not fmt.many else "") + fmt.end
        rule = " ".join(x for x in (json.dumps(pre) if pre else "", "call", json.dumps(post) if post else "") if x)
        grammar = llguidance.LLMatcher.grammar_from_lark(f"start: {rule}\ncall: %json {json.dumps(schema)}\n")
        rng = np.random.default_rng(seed)
        ok = 0
        fills: list[float] = []
        for _ in range(n):
            m = llguidance.LLMatcher(lt, grammar, log_level=0)
            bm = np.full((vocab + 31) // 32, -1, np.int32)
            ids: list[int] = []
            for _ in range(1024):
                t0 = time.perf_counter()
                m.unsafe_compute_mask_ptr(bm.ctypes.data, bm.nbytes)
                fills.append(time.perf_counter() - t0)
                logits = np.roll(random_rows(vocab)[rng.integers(64)], int(rng.integers(vocab)))
                apply_mask(logits, bm)
                t = int(np.argmax(logits))
                m.consume_token(t)
                if t == tok.eos_token_id:
                    break
                ids.append(t)
            try:
                calls = fmt.parse(tok.decode(ids))
                ok += bool(calls) and all(c["name"] in names for c in calls)
            except toolcalls.ToolCallError:
                pass
        out[fmt.name] = {"parsed": f"{ok}/{n}", "mask_ms_median": statistics.median(fills) * 1e3,
                         "mask_ms_p95": pct(fills, 95) * 1e3}
    return out


# -- end to end with an ONNX model ------------------------------------------------------------------

PROMPTS = [
    ("Give the weather request for Paris as JSON.", tool_schema(FUNCTIONS[:1])),
    ("Book a flight from JFK to LAX for 2 people. Reply with a tool call.", tool_schema(FUNCTIONS)),
    ("Describe a person named Ann, 31 years old, as JSON.", corpus(4)[3][1]),
    ("List three todo items as tool calls.", tool_schema(FUNCTIONS[:3], parallel=True)),
]


def e2e(onnx_path: Path, tok: Any, vocab: int, libs: dict[str, Library], n_prompts: int, max_new: int,
        rounds: int) -> dict[str, Any]:
    from tuneops.inference.runtimes import OnnxCausalLM

    lm = OnnxCausalLM(onnx_path)
    eos = tok.eos_token_id
    prompts = []
    for i in range(n_prompts):
        text, schema = PROMPTS[i % len(PROMPTS)]
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        prompts.append((list(ids), schema))

    def run(mode: str, lib: Library | None, ids: list[int], schema: dict[str, Any]
            ) -> tuple[int, float, str, str, float, float]:
        """(tokens, decode seconds, text, finish, forward s/token, host s/token between two forwards).
        Decoding is tuneops' own loop (``decode.stream``); the constraint runs in its picker, so the
        time outside the picker is the model's forward."""
        from tuneops.inference import decode

        m = lib.compile(schema)() if lib else None
        bitmask = np.full((vocab + 31) // 32, -1, np.int32)
        st: dict[str, Any] = {"finish": "length", "first": None, "over": 0.0, "picks": 0, "pending": None,
                              "last": None, "fwd": 0.0}

        def pick(row: np.ndarray) -> int:
            tc = time.perf_counter()
            if st["last"] is not None and st["picks"] > 1:
                st["fwd"] += tc - st["last"]          # since the previous pick returned: one forward
            row = row.astype(np.float32, copy=True)
            if m is not None:
                if mode == "overlap" and st["pending"] is not None:
                    st["pending"].join()
                else:
                    m.fill(bitmask)
                apply_mask(row, bitmask)
            nxt = int(np.argmax(row))
            if st["first"] is None:
                st["first"] = time.perf_counter()
            if m is not None and not m.accept(nxt):
                st["finish"] = "rejected"
                return eos
            if nxt == eos:
                st["finish"] = "stop"
            elif m is not None and mode == "overlap":
                th = threading.Thread(target=m.fill, args=(bitmask,))
                th.start()
                st["pending"] = th
            st["picks"] += 1
            if st["picks"] > 1:
                st["over"] += time.perf_counter() - tc   # host work between two forwards: mask, apply, pick, advance
            st["last"] = time.perf_counter()
            return nxt

        t0 = time.perf_counter()
        out = list(decode.stream(lm, ids, max_new, {eos}, pick))
        if st["pending"] is not None:
            st["pending"].join()
        dt = time.perf_counter() - (st["first"] or t0)
        n = max(len(out) - 1, 1)
        return len(out), dt, tok.decode(out), st["finish"], st["fwd"] / n, st["over"] / n

    variants: list[tuple[str, str, Library | None]] = [("no schema", "seq", None)]
    for name, lib in libs.items():
        variants += [(f"{name} (sequential)", "seq", lib), (f"{name} (overlapped)", "overlap", lib)]
    rates: dict[str, list[float]] = {v[0]: [] for v in variants}
    per_token: dict[str, dict[str, list[float]]] = {v[0]: {"forward": [], "constraint": []} for v in variants}
    finishes: dict[str, list[str]] = {v[0]: [] for v in variants}
    samples: dict[str, str] = {}
    valid: dict[str, list[bool]] = {v[0]: [] for v in variants}
    import jsonschema

    # interleaved: each prompt runs every variant in turn, so load changes hit all alike
    for _ in range(rounds):
        for ids, schema in prompts:
            for label, mode, lib in variants:
                n, dt, text, finish, fwd, over = run(mode, lib, ids, schema)
                if n > 1:
                    rates[label].append((n - 1) / dt)     # decode tokens after the first
                    per_token[label]["forward"].append(fwd)
                    per_token[label]["constraint"].append(over)
                finishes[label].append(finish)
                samples.setdefault(label, text[:160])
                if lib is not None and finish == "stop":
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        valid[label].append(True)
                    except Exception:  # noqa: BLE001
                        valid[label].append(False)
    return {"rates": rates, "samples": samples, "valid": valid, "finishes": finishes, "per_token": per_token,
            "model": str(onnx_path)}


# -- report -----------------------------------------------------------------------------------------

def machine_note() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{cpu}, {os.cpu_count()} cores, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for pkg in ("llguidance", "xgrammar", "outlines-core", "onnxruntime", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "-"
    return out


def ms(x: float) -> str:
    return f"{x * 1e3:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "models" / "base",
                    help="a Hugging Face folder with the tokenizer (tuneops --set model.source=smollm2 model)")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--requests", type=int, default=210, help="json_schema requests over random logits")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--cap", action="append", default=[], metavar="LIB=N",
                    help="run only the first N requests for LIB (e.g. outlines-core=40: its compile is slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quote-bias", type=float, default=4.0,
                    help="added to the random logits of tokens holding a double quote, so strings end "
                         "within the budget (0: plain random logits)")
    ap.add_argument("--onnx", type=Path, default=None, help="an ONNX causal LM with a KV cache, for end-to-end tok/s")
    ap.add_argument("--e2e-prompts", type=int, default=4)
    ap.add_argument("--e2e-rounds", type=int, default=2)
    ap.add_argument("--e2e-tokens", type=int, default=48)
    ap.add_argument("--tool-grammar", type=int, default=40,
                    help="requests per tuneops.inference.toolcalls format for the llguidance tool-call grammar check (0: skip)")
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    if not (args.model_dir / "tokenizer.json").is_file():
        print(f"{args.model_dir} has no tokenizer.json: run `tuneops --set model.source=smollm2 model` first",
              file=sys.stderr)
        return 2
    tok = AutoTokenizer.from_pretrained(str(args.model_dir))
    vocab = len(tok)
    print(f"machine: {machine_note()}")
    print(f"versions: {versions()}")
    print(f"tokenizer: {args.model_dir} vocab {vocab}, eos {tok.eos_token!r} ({tok.eos_token_id})")
    schemas = corpus(args.requests, args.seed)
    libs: dict[str, Library] = {}
    results: dict[str, Any] = {"machine": machine_note(), "versions": versions(), "vocab": vocab, "libs": {}}
    for name in args.libs.split(","):
        t0 = time.perf_counter()
        libs[name] = make_library(name, tok, vocab)
        adapter_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        caps = dict(c.split("=", 1) for c in args.cap)
        mine = schemas[:int(caps[name])] if name in caps else schemas
        r = run_validity(libs[name], mine, tok, vocab, args.max_tokens, args.seed, args.quote_bias)
        r["requests"] = len(mine)
        r["wall_s"] = time.perf_counter() - t0
        r["adapter_s"] = adapter_s
        r["eos"] = eos_behaviour(libs[name], tok, vocab)
        results["libs"][name] = r
        print(f"{name}: adapter {adapter_s:.2f} s, {len(mine)} requests in {r['wall_s']:.1f} s, {r['counts']}",
              flush=True)

    print("\n| library | adapter s | compile ms median / p95 / max | first mask ms median | mask ms median / p95 "
          "| apply ms median | advance ms median | requests | finished | valid of finished | truncated | unsupported |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results["libs"].items():
        t, c = r["timing"], r["counts"]
        fin = c.get("finished", 0)
        print(f"| {name} | {r['adapter_s']:.2f} | {ms(statistics.median(r['compile_s']))} / {ms(pct(r['compile_s'], 95))} / "
              f"{ms(max(r['compile_s']))} | {ms(statistics.median(r['first_mask_s']))} | "
              f"{ms(statistics.median(t['fill']))} / {ms(pct(t['fill'], 95))} | {ms(statistics.median(t['apply']))} | "
              f"{ms(statistics.median(t['accept']))} | {r['requests']} | {fin} | {c.get('valid', 0)}/{fin} | "
              f"{c.get('truncated', 0)} | {c.get('unsupported', 0)} |")
    for name, r in results["libs"].items():
        other = {k: v for k, v in r["counts"].items() if k not in ("finished", "valid", "truncated", "unsupported")}
        print(f"\n{name}: tokens per request median {statistics.median(r['tokens']) if r['tokens'] else 0}, "
              f"tool calls named right {r['tool_calls_named_ok']}, other outcomes {other}, EOS {r['eos']}")
        for u in r["unsupported"][:5]:
            print(f"  unsupported: {u}")
        for bad in r["invalid"][:5]:
            print(f"  INVALID: {bad}")

    if args.tool_grammar and "llguidance" in libs:
        results["tool_grammar"] = tg = tool_grammar_check(tok, vocab, args.tool_grammar, args.seed)
        print("\nllguidance, whole tool-call text per tuneops.inference.toolcalls format (markers + call_schema JSON), "
              f"{args.tool_grammar} random-logits requests each, parsed back with the format's parse:")
        for name, r in tg.items():
            print(f"  {name}: parsed {r['parsed']}, mask ms median {r['mask_ms_median']:.3f} / p95 {r['mask_ms_p95']:.3f}")

    if args.onnx:
        t0 = time.perf_counter()
        e = e2e(args.onnx, tok, vocab, libs, args.e2e_prompts, args.e2e_tokens, args.e2e_rounds)
        e["wall_s"] = time.perf_counter() - t0
        results["e2e"] = e
        base = statistics.median(e["rates"]["no schema"]) if e["rates"]["no schema"] else float("nan")
        print(f"\nend to end: {args.onnx}, greedy, {args.e2e_prompts} prompts x {args.e2e_rounds} rounds, "
              f"<= {args.e2e_tokens} new tokens, interleaved")
        # the forward's time is the same work in every variant: pool it, so the estimate is not load noise
        fwd_all = statistics.median([x for p in e["per_token"].values() for x in p["forward"]])
        host0 = statistics.median(e["per_token"]["no schema"]["constraint"])
        print(f"forward (ONNX step) ms/token, median over all variants: {fwd_all * 1e3:.2f}")
        print("| decoding | decode tok/s median (measured) | x no schema (measured) | host ms/token between forwards "
              "(mask, apply, pick, advance) | x no schema (forward + host) | stopped on EOS | schema-valid of stopped |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label, rs in e["rates"].items():
            med = statistics.median(rs) if rs else float("nan")
            v = e["valid"][label]
            h = statistics.median(e["per_token"][label]["constraint"])
            stops = sum(x == "stop" for x in e["finishes"][label])
            print(f"| {label} | {med:.1f} | {med / base:.2f} | {h * 1e3:.3f} | {(fwd_all + host0) / (fwd_all + h):.3f} | "
                  f"{stops}/{len(e['finishes'][label])} | {f'{sum(v)}/{len(v)}' if v else '-'} |")
        e["forward_ms"] = fwd_all * 1e3
        for label, s in e["samples"].items():
            print(f"  sample [{label}]: {s!r}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
