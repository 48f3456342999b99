"""The engine: one implementation of "a model answers" shared by every entry point (``tuneops
generate``, ``tuneops serve``, the jobs API's model endpoints, the registered MLflow pyfunc).

``ChatEngine`` runs an ONNX Runtime causal LM (``OnnxCausalLM``, KV cache) through the one decode
loop (``tuneops.inference.decode``) with the model's own chat template (``tuneops.inference.chat.
prompt_ids``) and stop tokens (``inference.chat.stop_ids``: the template's end-of-turn marker, the
tokenizer's and generation_config's EOS); ``stop`` strings are honoured on the decoded text.
``Classifier`` runs a classification / NER version. ``tuneops.inference.resolve`` says which files
to load; ``tuneops.inference.scheduler`` which request is admitted when.

Continuous batching: every ``ChatEngine`` has a ``Batcher``, one thread that owns the model's
running batch (``tuneops.inference.decode.run`` over a ``Batch``). A request (``deltas``) joins it
at the next token boundary: its prompt is prefilled apart, ``max_batch_tokens`` prompt tokens per
boundary (a long prompt does not stall the rows decoding), then spliced into the batch; each row
has its own picker (sampling, grammar), stop ids, ``max_tokens`` and consumer; a finished,
cancelled (``cancel``) or abandoned (stop string, closed generator) request leaves the batch at the
next boundary. At most ``max_batch`` rows decode together; more wait in the batcher's queue (the
server's bounded queue, ``Scheduler``, is in front). An onnxruntime-genai builder graph (no
``position_ids``: positions from the mask's row sums, ``left_padding`` False) keeps its rows
right-padded, and each prompt is prefilled alone before it joins (its GroupQueryAttention takes
several rows only without a past: no chunk after the first, no prefix); a fixed-shape
graph (no KV cache) decodes one request at a time (``max_batch`` 1).

Only numpy, onnxruntime, tokenizers/transformers (no torch) are needed for chat: the MLflow
pyfunc imports this module in a fresh environment.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .decode import Batch, Prefill, Prefix, Row, run
from .sampling import MIN_TEMPERATURE, Picker, sampler
from .scheduler import Cancelled

log = logging.getLogger(__name__)

MAX_BATCH = 16             # defaults of a ChatEngine built outside a server (the pyfunc, `tuneops generate`);
MAX_BATCH_TOKENS = 256     # a server takes them from serve: (max_batch, max_batch_tokens, prefix_*)
PREFIX_CACHE = 8           # shared prompt prefixes whose KV cache a batcher keeps (0 = none)
PREFIX_MIN_TOKENS = 16     # the fewest tokens a shared prefix has to be worth keeping
PREFIX_WINDOW = 8          # recent prompts a new one is compared with to learn a prefix
IDLE_S = 5.0               # a batcher thread with nothing to do ends after this long (the next request starts one)


@dataclass
class Generation:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    logprobs: list[Any] | None = None     # with deltas(logprobs=N): a logprobs.TokenLogprob per token picked
                                          # (the reply's, then the stop token's when it ended on one)


class Request:
    """One sequence in a ``Batcher``: its ``Row`` and the tokens decoded for it (``tokens``)."""

    def __init__(self, row: Row, cancel: Any = None):
        self.row, self.cancel = row, cancel
        self.abandoned = False               # its consumer stopped reading (a stop string, a closed generator)
        self.items: "queue.SimpleQueue[tuple[str, Any]]" = queue.SimpleQueue()

    def gone(self) -> bool:
        return self.abandoned or (self.cancel is not None and self.cancel.is_set())

    def tokens(self) -> Iterator[int]:
        """The new tokens as they are decoded; the stop token ends it and is not yielded.
        ``Cancelled`` when ``cancel`` was set; the batch's error if its step failed."""
        try:
            while True:
                try:
                    kind, value = self.items.get(timeout=0.5)
                except queue.Empty:
                    if self.gone():
                        raise Cancelled("cancelled") from None
                    continue
                if kind == "token":
                    token, done = value
                    if not (done and token in self.row.stop):
                        yield token
                    if done:
                        return
                elif kind == "cancelled":
                    raise Cancelled("cancelled")
                else:
                    raise value
        finally:
            self.abandoned = True


class Batcher:
    """Continuous batching over one runtime (see the module docstring): ``submit`` a sequence,
    read its ``Request.tokens``. The thread starts with the first request and ends after
    ``IDLE_S`` with nothing to do."""

    def __init__(self, runtime: Any, pad_id: int = 0, max_batch: int = MAX_BATCH,
                 max_batch_tokens: int = MAX_BATCH_TOKENS, idle_s: float = IDLE_S, prefix_cache: int = PREFIX_CACHE,
                 prefix_min_tokens: int = PREFIX_MIN_TOKENS, prefix_window: int = PREFIX_WINDOW):
        batches = runtime.has_cache and not getattr(runtime, "fixed_shape", None)
        self.runtime, self.pad_id = runtime, pad_id
        self.left = bool(getattr(runtime, "left_padding", True))   # False: rows join right-padded (decode.Batch)
        self.max_batch = max(1, int(max_batch)) if batches else 1
        self.max_batch_tokens = max(1, int(max_batch_tokens))
        self.idle_s = idle_s
        # prefix caching: an ONNX KV cache (arrays a prefill can start from), not a fixed-shape graph
        splices = batches and hasattr(runtime, "empty_cache") and isinstance(runtime.empty_cache(0), dict)
        self.prefix_cache = max(0, int(prefix_cache)) if splices else 0
        self.prefix_min_tokens = max(1, int(prefix_min_tokens))
        self._prefixes: "collections.OrderedDict[tuple[int, ...], Prefix]" = collections.OrderedDict()
        self._recent: "collections.deque[tuple[int, ...]]" = collections.deque(maxlen=max(1, int(prefix_window)))
        self.prefix_tokens = 0               # prompt tokens served from a prefix's cache (not computed again)
        self._cond = threading.Condition()
        self._pending: "collections.deque[Request]" = collections.deque()
        self._thread: threading.Thread | None = None
        self._job: Prefill | None = None
        self.rows = self.peak = 0            # rows in the running batch now / most rows decoded in one step

    def submit(self, prompt: list[int], limit: int, stop: Iterable[int], pick: Picker, cancel: Any = None) -> Request:
        req = Request(Row(prompt, limit, stop, pick), cancel)
        req.row.tag = req
        if req.row.done:                      # max_tokens 0: nothing to decode
            req.items.put(("token", (-1, True)))
            req.row.stop = frozenset({-1})
            return req
        with self._cond:
            self._pending.append(req)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="tuneops-batcher", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return req

    def state(self) -> dict[str, int]:
        with self._cond:
            return {"batch": self.rows, "pending": len(self._pending), "max_batch": self.max_batch,
                    "prefixes": len(self._prefixes), "prefix_tokens": self.prefix_tokens}

    def _match(self, prompt: list[int]) -> Prefix | None:
        """The prefix ``prompt`` starts from (under ``_cond``): the longest kept one it goes beyond, else
        a new one (computed when its prefill starts) when it shares at least ``prefix_min_tokens`` tokens
        with one of the last ``prefix_window`` prompts (a chat template's system prompt, the same tools declared: vLLM's automatic prefix
        caching, per prompt instead of per block); the least recently used beyond ``prefix_cache`` goes."""
        if not self.prefix_cache:
            return None
        key = tuple(prompt)
        best = max((p for k, p in self._prefixes.items() if len(k) < len(key) and key[:len(k)] == k),
                   key=lambda p: len(p.ids), default=None)
        if best is None:
            shared = max((_common(key, r) for r in self._recent), default=0)
            shared = min(shared, len(key) - 1)
            if shared >= self.prefix_min_tokens:
                best = self._prefixes[key[:shared]] = Prefix(key[:shared])
                while len(self._prefixes) > self.prefix_cache:
                    self._prefixes.popitem(last=False)
        if key not in self._recent:
            self._recent.append(key)
        if best is not None:
            self._prefixes.move_to_end(best.ids)
        return best

    def _serve(self) -> None:
        while True:
            batch, self._job = Batch(self.runtime, self.pad_id), None
            try:
                batch.isolate = True              # one request's failing picker fails that request only
                for rows in run(batch, self._boundary):
                    for r in rows:
                        r.tag.items.put(("token", (r.token, r.done)) if r.error is None else ("error", r.error))
                    self.rows = sum(not r.done for r in batch.rows)
                    self.peak = max(self.peak, len(rows))
                return                        # idle: ``_boundary`` has let the thread go
            except Exception as exc:  # noqa: BLE001 - every request in the batch gets the error, the batcher goes on
                log.exception("a batched decode step failed")
                lost = batch.rows + (self._job.rows if self._job is not None else [])
                for r in lost:
                    r.tag.items.put(("error", exc))
                self.rows, self._job = 0, None

    def _boundary(self, batch: Batch) -> None:
        """Drop the rows whose request is gone, then prefill waiting requests: ``max_batch_tokens``
        prompt tokens while rows are decoding, until one joins when none is."""
        self._drop_gone(batch, batch.rows)
        self.rows = sum(not r.done for r in batch.rows)
        budget = self.max_batch_tokens
        while budget > 0 or not batch.active:
            if self._job is None:
                taken = self._take(batch)
                if taken is None:
                    return
                rows, prefix = taken
                if prefix is not None:
                    try:
                        prefix.compute(self.runtime)
                    except Exception:  # noqa: BLE001 - the prompts are prefilled whole instead
                        log.exception("a prompt prefix's KV cache failed")
                        with self._cond:
                            self._prefixes.pop(prefix.ids, None)
                        prefix = None
                try:
                    self._job = batch.start(rows, prefix)
                except Exception as exc:  # noqa: BLE001 - these requests get the error, the batch goes on
                    log.exception("a prefill could not start")
                    for r in rows:
                        r.tag.items.put(("error", exc))
                    continue
                if prefix is not None:
                    self.prefix_tokens += len(prefix.ids) * len(rows)
            job = self._job
            before = job.at
            try:
                joined = batch.prefill(job, budget if batch.active else 0)
            except Exception as exc:  # noqa: BLE001 - the prompts' requests get the error, the batch goes on
                log.exception("a prefill failed")
                for r in job.rows:
                    r.tag.items.put(("error", exc))
                self._job = None
                continue
            if joined:
                self._job = None
                self._drop_gone(batch, job.rows)      # went away while their prompts were prefilled
            budget -= (job.at - before) * len(job.rows)
            self.rows = sum(not r.done for r in batch.rows)

    @staticmethod
    def _drop_gone(batch: Batch, rows: list[Row]) -> None:
        """Rows whose request was cancelled or abandoned leave ``batch``; their readers get ``Cancelled``."""
        gone = [r for r in rows if not r.done and r.tag.gone()]
        batch.drop(gone)
        for r in gone:
            r.tag.items.put(("cancelled", None))

    def _take(self, batch: Batch) -> tuple[list[Row], Prefix | None] | None:
        """The next requests to prefill together (as many as fit ``max_batch`` and, past the first,
        ``max_batch_tokens`` of prompt beyond their prefix), all from the same prefix (or none) as
        the first; None when there is nothing to prefill now (waiting for a request while the batch
        is empty, and letting the thread go after ``idle_s`` with none)."""
        with self._cond:
            while True:
                while self._pending and self._pending[0].gone():
                    self._pending.popleft().items.put(("cancelled", None))
                live = sum(not r.done for r in batch.rows)
                if self._pending and live < self.max_batch:
                    break
                if batch.active:
                    return None
                if not self._cond.wait(self.idle_s) and not self._pending:
                    self._thread = None
                    return None
            rows, tokens, prefix = [], 0, None
            while self._pending and live + len(rows) < self.max_batch:
                req = self._pending[0]
                if req.gone():
                    self._pending.popleft().items.put(("cancelled", None))
                    continue
                match = self._match(req.row.prompt)
                if rows and (match is not prefix or not self.left):   # right-padded rows: one prefill each
                    break
                rest = len(req.row.prompt) - (len(match.ids) if match is not None else 0)
                if rows and tokens + rest > self.max_batch_tokens:
                    break
                rows.append(self._pending.popleft().row)
                tokens, prefix = tokens + rest, match
            return (rows, prefix) if rows else None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")
_tokenizers: "weakref.WeakValueDictionary[str, Any]" = weakref.WeakValueDictionary()
_tokenizers_lock = threading.Lock()


def shared_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, one object per content in the process (by the md5 of its files): the
    fine-tunes of one base served together (adapters over a shared base graph, a pool's versions) hold
    one tokenizer, not one each (~10 MB for a 49k-token vocabulary)."""
    import hashlib

    from transformers import AutoTokenizer

    h = hashlib.md5()
    for name in _TOKENIZER_FILES:
        f = Path(folder) / name
        if f.is_file():
            h.update(name.encode() + b"\0" + f.read_bytes())
    key = h.hexdigest()
    with _tokenizers_lock:
        tok = _tokenizers.get(key)
        if tok is None:
            tok = AutoTokenizer.from_pretrained(str(folder))
            _tokenizers[key] = tok
        return tok


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ChatEngine:
    """A causal LM ONNX graph + its tokenizer; ``deltas`` yields reply text as it is decoded."""

    kind = "chat"

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, generation_dirs: tuple[Any, ...] = (),
                 threads: int = 0, max_batch: int = MAX_BATCH, max_batch_tokens: int = MAX_BATCH_TOKENS,
                 lm: Any = None, prefix_cache: int = PREFIX_CACHE, prefix_min_tokens: int = PREFIX_MIN_TOKENS,
                 prefix_window: int = PREFIX_WINDOW):
        from .chat import load_generation_config, stop_ids
        from .runtimes import OnnxCausalLM

        self.onnx_path = Path(onnx_path)
        self.tokenizer = shared_tokenizer(Path(tokenizer_dir))
        self.lm = lm if lm is not None else OnnxCausalLM(self.onnx_path, threads)   # lm: e.g. an adapter over a shared base
        gen_cfg = load_generation_config(tokenizer_dir, self.onnx_path.parent, *generation_dirs)
        self.stop = set(stop_ids(self.tokenizer, gen_cfg))
        pad = self.tokenizer.pad_token_id
        self.batcher = Batcher(self.lm, pad if pad is not None else 0, max_batch, max_batch_tokens,
                               prefix_cache=prefix_cache, prefix_min_tokens=prefix_min_tokens,
                               prefix_window=prefix_window)

    def prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        from .chat import prompt_ids

        return prompt_ids(self.tokenizer, messages, tools=tools)

    def deltas(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
               result: Generation | None = None, cancel: Any = None, top_k: int = 0,
               constraint: Any = None, logprobs: int | None = None) -> Iterator[str]:
        """Reply text pieces; ``result`` receives the token counts and finish reason. ``logprobs``
        (``None`` = off, else how many alternatives per token) fills ``result.logprobs`` as the tokens
        are picked (``tuneops.inference.logprobs.recording`` wraps the picker). ``constraint``
        (``tuneops.inference.constrain.Constraint``) limits every token to what its grammar allows. Text that
        could be the start of a ``stop`` string is held back until it is known not to be.
        ``cancel`` (a ``threading.Event``) is looked at before every token: once set, generation
        stops there and ``Cancelled`` is raised."""
        result = result if result is not None else Generation()
        result.prompt_tokens = len(ids)
        stops = [s for s in stop if s]
        hold = max((len(s) for s in stops), default=1) - 1
        new: list[int] = []
        text, sent, finish = "", 0, None
        sample = temperature >= MIN_TEMPERATURE
        pick = sampler(sample, temperature if sample else 1.0, top_k, top_p, seed)
        if constraint is not None:
            from .constrain import masked

            pick = masked(pick, constraint, self.stop)
        if logprobs is not None:
            from .logprobs import recording

            result.logprobs = []
            pick = recording(pick, logprobs, result.logprobs)     # sees the model's row, before any mask
        tokens = self.batcher.submit(list(ids), max_tokens, self.stop, pick, cancel).tokens()
        for token in tokens:
            if cancel is not None and cancel.is_set():
                tokens.close()
                raise Cancelled("cancelled")
            new.append(token)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            hits = [i for i in (text.find(s, max(0, sent - len(s))) for s in stops) if i >= 0]
            if hits:
                text, finish = text[:min(hits)], "stop"
                break
            safe = len(text) - hold
            while safe > sent and text[safe - 1] == "\ufffd":   # an incomplete UTF-8 sequence so far
                safe -= 1
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        tokens.close()                       # a stop string ended it: its row leaves the batch now
        if finish is None:
            finish = "length" if len(new) >= max_tokens else "stop"
        if len(text) > sent:
            yield text[sent:]
        result.text, result.completion_tokens, result.finish_reason = text, len(new), finish

    def complete(self, messages: list[dict[str, Any]], max_tokens: int, **kw: Any) -> Generation:
        result = Generation()
        for _ in self.deltas(self.prompt(messages), max_tokens, result=result, **kw):
            pass
        return result


class Classifier:
    """A classification / NER version: a registered head pyfunc (PyTorch) or an exported ONNX
    sequence classifier folder (``model.onnx`` + ``labels.json``)."""

    kind = "classify"

    def __init__(self, pyfunc_dir: Path | None = None, onnx_path: Path | None = None, task_head: str = ""):
        self.task_head = task_head
        self.pyfunc = self.onnx = None
        if pyfunc_dir is not None:
            import mlflow.pyfunc

            self.pyfunc = mlflow.pyfunc.load_model(str(pyfunc_dir))
        else:
            import json

            from transformers import AutoTokenizer

            from .runtimes import OnnxClassifier

            labels_file = Path(onnx_path).parent / "labels.json"
            labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
            self.onnx = OnnxClassifier(Path(onnx_path), labels)
            self.tokenizer = AutoTokenizer.from_pretrained(str(Path(onnx_path).parent))

    def classify(self, texts: list[str]) -> list[dict[str, Any]]:
        if self.onnx is not None:
            enc = self.tokenizer(texts, padding=True, return_tensors="np")
            return [{"label": r["label"], "score": r["score"]}
                    for r in self.onnx.predict(enc["input_ids"], enc["attention_mask"])]
        preds = self.pyfunc.predict(list(texts))
        from ..training.heads import get as head

        if head(self.task_head).per_token:     # NER: one BIO tag per whitespace-separated word
            return [{"words": t.split(), "tags": list(p)} for t, p in zip(texts, preds)]
        return [{"label": str(p)} for p in preds]
