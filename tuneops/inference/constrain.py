"""Constrained decoding: the next token is picked among the tokens a grammar allows, so the reply is
valid by construction (OpenAI ``response_format`` ``json_object`` / ``json_schema``, and tool calls
forced by ``tool_choice``). The library is llguidance (chosen by measurement:
bench/results/constrained-cpu.md): a matcher built from the engine's tokenizer fills a bitmask of the
allowed next tokens; ``masked`` wraps the request's picker (greedy or sampled) so that it picks over the
logits row with every other token at -inf, and advances the matcher with the token it picked.

The end of the grammar is the end of the reply: the matcher's end-of-sequence tokens are the engine's
stop ids (the template's end-of-turn marker, the EOS tokens), so once the JSON is complete the only
allowed tokens are stop tokens and the one decode loop (``tuneops.inference.decode``) ends there.
JSON is compact (no free whitespace): a weak model cannot spend its token budget on spaces.

Compiled grammars are cached per tokenizer (``cache=N``: the ``N`` most recently used distinct schemas /
tool sets, ``serve.grammar_cache``): a schema seen before costs a copy of its ready matcher
(``LLMatcher.deep_copy``), not a compile (bench/results/structured-serve-cpu.md).
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from .sampling import Picker

_COMPACT = {"whitespace_flexible": False}
_TOKENIZERS: "weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], Any]]" = weakref.WeakKeyDictionary()
_GRAMMARS: "weakref.WeakKeyDictionary[Any, LRU]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot compile for this tokenizer."""


def ll_tokenizer(tokenizer: Any, stop: Iterable[int]) -> Any:
    """The llguidance tokenizer of an HF tokenizer, its EOS tokens ``stop`` (cached per tokenizer)."""
    import llguidance.hf

    eos = tuple(sorted(int(t) for t in stop))
    with _LOCK:            # one per tokenizer object (an unloaded engine's goes with it)
        cached = _TOKENIZERS.setdefault(tokenizer, {})
        lt = cached.get(eos)
        if lt is None:
            n_vocab = max(len(tokenizer), max(eos, default=0) + 1)
            lt = cached[eos] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=list(eos) or None)
        return lt


class LRU:
    """A bounded least-recently-used map (thread-safe); ``get(key, build)`` builds a missing value
    (outside the lock: two threads may build the same one, the first one stored is kept)."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = max(0, int(size)), OrderedDict(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: Any, build: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                self.hits += 1
                return self.items[key]
            self.misses += 1
        value = build()
        if self.size:
            with self.lock:
                value = self.items.setdefault(key, value)
                self.items.move_to_end(key)
                while len(self.items) > self.size:
                    self.items.popitem(last=False)
        return value


def _cached(tokenizer: Any, size: int, key: Any, build: Callable[[], "Constraint"]) -> "Constraint":
    if size <= 0:
        return build()
    with _LOCK:
        cache = _GRAMMARS.get(tokenizer)
        if cache is None or cache.size != size:
            cache = _GRAMMARS[tokenizer] = LRU(size)
    return cache.get(key, build)


def cache_of(tokenizer: Any) -> LRU | None:
    """The grammar cache of a tokenizer (None before its first cached grammar)."""
    return _GRAMMARS.get(tokenizer)


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Constraint:
    """A compiled grammar (llguidance's JSON grammar text) for one tokenizer; ``matcher()`` a fresh
    matcher: a copy of the ready one made at compile time (its lexer and parser tables built once)."""

    grammar: str
    tokenizer: Any             # llguidance LLTokenizer
    ready: Any = field(default=None, compare=False, repr=False)
    lock: Any = field(default_factory=threading.Lock, compare=False, repr=False)

    def matcher(self) -> Any:
        import llguidance

        if self.ready is not None:
            with self.lock:
                return self.ready.deep_copy()
        m = llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m


def _check(grammar: str, lt: Any) -> Constraint:
    import llguidance

    err = llguidance.LLMatcher.validate_grammar(grammar, lt)
    if err:
        raise GrammarError(str(err)[:500])
    return Constraint(grammar, lt, Constraint(grammar, lt).matcher())


def compact(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**_COMPACT, **(schema.get("x-guidance") or {})}}


def json_schema(schema: dict[str, Any], tokenizer: Any, stop: Iterable[int], cache: int = 0) -> Constraint:
    """A constraint to JSON valid against ``schema``; ``GrammarError`` when llguidance cannot compile it.
    ``cache``: keep the last ``cache`` distinct compiled grammars of this tokenizer (0 = compile every time)."""
    import llguidance

    lt = ll_tokenizer(tokenizer, stop)

    def build() -> Constraint:
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPACT)
        except Exception as exc:  # noqa: BLE001 - llguidance raises ValueError / its own errors on bad schemas
            raise GrammarError(str(exc)[:500]) from None
        return _check(grammar, lt)
    return _cached(tokenizer, cache, ("json", _key(schema), id(lt)), build)


def json_object(tokenizer: Any, stop: Iterable[int], cache: int = 0) -> Constraint:
    """Any JSON object (``response_format: {"type": "json_object"}``)."""
    return json_schema({"type": "object"}, tokenizer, stop, cache)


def tool_calls(fmt: Any, functions: list[dict[str, Any]], parallel: bool, tokenizer: Any,
               stop: Iterable[int], cache: int = 0) -> Constraint:
    """The whole tool-call text of ``fmt`` (a ``toolcalls.ToolFormat``): its markers around the JSON of
    ``fmt.call_schema(functions)``; ``parallel`` allows several calls where the format can write them."""
    lt = ll_tokenizer(tokenizer, stop)
    key = ("tools", fmt.name, _key(functions), bool(parallel), id(lt))
    return _cached(tokenizer, cache, key, lambda: _tool_grammar(fmt, functions, parallel, lt))


def _tool_grammar(fmt: Any, functions: list[dict[str, Any]], parallel: bool, lt: Any) -> Constraint:
    import llguidance

    parallel = parallel and fmt.parallel
    schema = compact(fmt.call_schema(functions, parallel=parallel))
    pre = fmt.start + ("\n" if fmt.start and not fmt.many else "")
    post = ("\n" if fmt.end and not fmt.many else "") + fmt.end
    block = " ".join(json.dumps(x) if x != "call" else x for x in (pre, "call", post) if x)
    many = parallel and fmt.start and not fmt.many       # several blocks, one call each
    start = f"start: block (\"\\n\" block)*\nblock: {block}" if many else f"start: {block}"
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(f"{start}\ncall: %json {json.dumps(schema)}\n")
    except Exception as exc:  # noqa: BLE001
        raise GrammarError(str(exc)[:500]) from None
    return _check(grammar, lt)


def masked(pick: Picker, constraint: Constraint, stop: Iterable[int]) -> Picker:
    """``pick`` over the tokens the constraint allows; each picked token advances its matcher. Once
    the grammar is complete the allowed tokens are ``stop`` ids, which end the decode loop."""
    m = constraint.matcher()
    stop_ids = sorted(int(t) for t in stop)
    n = constraint.tokenizer.vocab_size
    bitmask = np.zeros((n + 31) // 32, np.int32)

    def constrained(row: np.ndarray) -> int:
        if m.is_stopped():
            return stop_ids[0]
        m.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n].astype(bool)
        if len(row) > n:
            allowed = np.concatenate([allowed, np.zeros(len(row) - n, bool)])
        allowed = allowed[:len(row)]
        if not allowed.any():                 # nothing allowed (a grammar error): end the reply
            return stop_ids[0]
        token = pick(np.where(allowed, row, -np.inf).astype(row.dtype, copy=False))
        if not allowed[token]:                # a sampler that ignored the mask (cannot happen with finite logits)
            token = int(np.argmax(np.where(allowed, row, -np.inf)))
        if token not in stop_ids and not m.consume_token(token):
            return stop_ids[0]
        return token
    return constrained
