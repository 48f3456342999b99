"""THE decode loop: every generation in tuneops is ``decode`` over a runtime
(``tuneops.inference.runtimes``: ONNX Runtime or PyTorch).

- ``run``: THE loop, over a ``Batch`` (the running rows, their KV cache and attention mask):
  at each token boundary rows may join (their prompts prefilled apart, in chunks, then spliced in,
  left-padded to the common past length) or be dropped; every row picks its token with its own
  picker (greedy or seeded sampling, ``tuneops.inference.sampling``), stop ids and limit; finished
  rows leave at once. ``tuneops.inference.engine.Batcher`` runs it for the requests of a server
  (continuous batching).
- ``decode``: one batch of prompts of any lengths, left-padded, prefilled once (right-padded, one
  prefill per prompt length, for a graph that takes positions from the mask; a graph without a
  cache, the fixed-shape accelerator graphs, recomputes the whole sequences each step); it yields
  every row's new token at each step, so a streaming caller gets tokens as they come and a batch
  caller collects them.
- ``stream``: one sequence's tokens as they come.
- ``generate_ids``: every row's tokens at the end; ``reply_ids`` / ``replies``: greedy replies to chat
  conversations in the model's own format and stop tokens (evaluate's generations).

Greedy decoding of a PyTorch model here gives the tokens Hugging Face ``generate`` gives
(``do_sample=False``, the same stop ids and limit, left padding): the same calls in the same
order (``TorchCausalLM``), and a finished row is fed padding so the batch keeps its shape, as
``generate`` does (tests/inference/test_decode.py compares them token by token).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .sampling import Picker, greedy


def _per_row(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"decode: {len(value)} {what} for {n} prompts")
        return list(value)
    return [value] * n


def _stop_sets(stop: Iterable[int] | Sequence[Iterable[int]], n: int) -> list[frozenset[int]]:
    """One stop set for every row (ids), or one per row (a list of id collections)."""
    stop = list(stop)
    if stop and not isinstance(stop[0], (int, np.integer)):
        return [frozenset(int(t) for t in s) for s in _per_row(stop, n, "stop sets")]
    return [frozenset(int(t) for t in stop)] * n


class Row:
    """One sequence of a ``Batch``: its prompt, stop ids, token limit and picker (``pick(logits_row)
    -> token``), and what it has decoded. ``done``: it reached a stop token or its limit, or it
    was dropped (``Batch.drop``); ``tag``: the caller's (``decode``: the prompt's index)."""

    __slots__ = ("prompt", "limit", "stop", "pick", "count", "token", "done", "tag", "seq", "error")

    def __init__(self, prompt: Sequence[int], limit: int, stop: Iterable[int] = (), pick: Picker | None = None,
                 tag: Any = None):
        if len(prompt) == 0:
            raise ValueError("decode: a prompt has no tokens")
        self.prompt, self.limit, self.stop = list(prompt), int(limit), frozenset(int(t) for t in stop)
        self.pick, self.tag = pick or greedy, tag
        self.count, self.token, self.done = 0, -1, self.limit <= 0
        self.seq = list(self.prompt)          # the cacheless path recomputes the whole sequence
        self.error: Exception | None = None   # its picker failed (an isolating batch: ``Batch.isolate``)


class Prefix:
    """The KV cache of a prompt prefix several requests share (a chat template's system prompt, the
    tools declared), computed once (``compute``): a ``Prefill`` whose rows all start with ``ids``
    starts from it and computes only the rest of each prompt."""

    def __init__(self, ids: Sequence[int]):
        self.ids = tuple(int(t) for t in ids)
        self.cache: dict[str, np.ndarray] | None = None

    def compute(self, runtime: Any) -> None:
        if self.cache is None:
            ids = np.array([self.ids], np.int64)
            _, self.cache = runtime.step(ids, np.ones_like(ids), runtime.empty_cache(1), last=True)


class Prefill:
    """The prompts of rows joining a ``Batch`` together, left-padded to one width, computed
    ``chunk`` columns per call (``Batch.prefill``) so that a long prompt does not stall decoding.
    With a computed ``prefix`` (every row's prompt starts with it and is longer), the rows start
    from its cache and ``ids`` are the rest of each prompt, left-padded after the prefix (the mask
    has a hole there; positions come from the mask, so each row still decodes as it would alone)."""

    def __init__(self, runtime: Any, rows: list[Row], pad_id: int, prefix: Prefix | None = None):
        skip = len(prefix.ids) if prefix is not None else 0
        rests = [r.prompt[skip:] for r in rows]
        width = max(len(r) for r in rests)
        self.rows, self.offset = rows, skip
        self.ids = np.array([[pad_id] * (width - len(r)) + r for r in rests], np.int64)
        self.mask = np.array([[1] * skip + [0] * (width - len(r)) + [1] * len(r) for r in rests], np.int64)
        self.at, self.logits = 0, None
        if prefix is not None:
            self.cache = {k: np.repeat(v, len(rows), 0) for k, v in prefix.cache.items()}
        else:
            self.cache = runtime.empty_cache(len(rows)) if runtime.has_cache else None

    @property
    def finished(self) -> bool:
        return self.at >= self.ids.shape[1]


class Batch:
    """The running batch of the decode loop (``run``): rows of any prompt lengths, left-padded
    to one KV cache; a row's positions come from its own attention mask (``cumsum(mask) - 1``), so
    it decodes as it would alone. A graph that takes positions from the mask's row sums
    (onnxruntime-genai's builder graphs: GroupQueryAttention with per-row ``seqlens_k``, each row's
    new key and value written after its own past) keeps rows right-padded instead (``right``): each
    row's past is contiguous from column 0, the mask marks it, and a row's prompt is prefilled alone
    (or with rows of its length, in one call: GroupQueryAttention takes several rows with a past
    only one new token each) before it joins. Its decode steps write into one KV buffer (``shared``:
    the runtime's ``step_into`` binds each past and its present to the same array, as
    onnxruntime-genai does), so a step copies no past; the buffer keeps ``ROOM`` spare columns and
    grows by copying only when a row reaches its end, and a row that leaves gives its place to the
    last row (one row copied, not the batch).

    With an ONNX cache (a dict of arrays) rows join at token boundaries (``prefill``: their prompts
    computed apart, then spliced in, the shorter side left-padded to the common past length) and
    leave at once (``step`` slices the finished / dropped rows out and trims the left columns that
    every remaining row masks). Another cache (a PyTorch model's) keeps its shape as Hugging Face
    ``generate`` does: the rows are those of the first prefill, and a finished row is fed padding.
    A runtime without a cache recomputes every row's whole sequence each step."""

    def __init__(self, runtime: Any, pad_id: int = 0):
        self.runtime, self.pad_id = runtime, pad_id
        self.rows: list[Row] = []
        self.cached = bool(runtime.has_cache)
        empty = runtime.empty_cache(0) if self.cached else {}
        self.splices = not self.cached or isinstance(empty, dict)
        self.right = self.cached and self.splices and not getattr(runtime, "left_padding", True)
        # right-padded rows over a graph that writes its new keys / values into the past it is given
        # (``step_into``): the cache is a buffer ``ROOM`` columns wider than needed, grown now and then
        self.shared = self.right and bool(getattr(runtime, "shares_buffer", False))
        self.cache: Any = empty
        self.mask = np.zeros((0, 0), np.int64)
        self.last: np.ndarray | None = None           # each row's next-token logits
        self.joined = False                           # a static (non-splicing) batch takes one prefill
        self._incoming: list[tuple[np.ndarray, Any, Any]] = []   # spliced rows' arrays, not merged yet
        self.isolate = False    # True: a picker that fails finishes its row only (``Row.error``), not the loop

    @property
    def active(self) -> bool:
        return any(not r.done for r in self.rows)

    def start(self, rows: list[Row], prefix: Prefix | None = None) -> Prefill:
        """The prefill of rows that join together (``prefill`` computes it); ``prefix``: a computed
        ``Prefix`` every row's prompt starts with (and goes beyond)."""
        widths = {len(r.prompt) for r in rows}
        if self.right and len(widths) > 1:
            raise ValueError(f"decode: {getattr(self.runtime, 'path', 'this graph')} takes positions from its "
                             f"attention mask (right padding only): prefill prompts of different lengths apart")
        if self.right and len(rows) > 1 and prefix is not None:
            raise ValueError("decode: right-padded rows start from a prefix one at a time (GroupQueryAttention "
                             "takes several rows with a past only one new token each)")
        if prefix is not None and not (self.cached and self.splices and prefix.cache is not None and all(
                len(r.prompt) > len(prefix.ids) and tuple(r.prompt[:len(prefix.ids)]) == prefix.ids for r in rows)):
            raise ValueError("decode: a prefix the rows do not all start with (or not computed)")
        return Prefill(self.runtime, rows, self.pad_id, prefix)

    def prefill(self, job: Prefill, budget: int = 0) -> bool:
        """Compute at most ``budget`` more prompt tokens of ``job`` (all of them with 0, and one
        column at least); once its prompts are done, its rows join the batch. True when they have."""
        if not self.cached:
            logits = _last_logits(self.runtime, [r.seq for r in job.rows], list(range(len(job.rows))))
            self._splice(job.rows, np.stack([logits[k] for k in range(len(job.rows))]), None, None)
            job.at = job.ids.shape[1]
            return True
        width = job.ids.shape[1]
        cols = width - job.at if budget <= 0 or (self.right and len(job.rows) > 1) \
            else max(1, min(width - job.at, budget // len(job.rows)))      # several right-padded rows: no chunks
        end = job.at + cols
        logits, job.cache = self.runtime.step(job.ids[:, job.at:end], job.mask[:, :job.offset + end], job.cache,
                                              last=True)
        job.at, job.logits = end, logits[:, -1]
        if not job.finished:
            return False
        self._splice(job.rows, job.logits, job.cache, job.mask)
        return True

    def _splice(self, rows: list[Row], logits: np.ndarray, cache: Any, mask: np.ndarray | None) -> None:
        """``rows`` are in the batch from now on; their logits, cache and mask join its arrays at the
        next ``pick`` or ``step`` (``_merge``), all the rows that joined since in one copy."""
        self.joined = True
        if not self.rows or not self.splices:
            self.rows, self.last, self._incoming = list(rows), np.asarray(logits), []
            if self.cached:
                self.cache, self.mask = cache, mask
            return
        self.rows = self.rows + list(rows)
        self._incoming.append((np.asarray(logits), cache, mask))

    def _merge(self) -> None:
        """The arrays of the rows spliced in since the last step join the batch's, in one concatenation
        (a burst of rows joining one by one copies the batch's cache once, not once a row)."""
        if not self._incoming:
            return
        parts, self._incoming = self._incoming, []
        self.last = np.concatenate([self.last, *(p[0] for p in parts)], 0)
        if not self.cached:
            return

        def pad(a: np.ndarray, axis: int, width: int) -> np.ndarray:
            widths = [(0, 0)] * a.ndim
            widths[axis] = (0, width - a.shape[axis]) if self.right else (width - a.shape[axis], 0)
            return np.pad(a, widths) if sum(widths[axis]) else a

        width = max(self.mask.shape[1], *(p[2].shape[1] for p in parts))
        self.mask = np.concatenate([pad(self.mask, 1, width), *(pad(p[2], 1, width) for p in parts)], 0)
        room = max(_room(self.cache), *(_room(p[1]) for p in parts))     # the mask's width, or a shared buffer's
        self.cache = {k: np.concatenate([pad(v, 2, room), *(pad(p[1][k], 2, room) for p in parts)], 0)
                      for k, v in self.cache.items()}

    def drop(self, rows: Iterable[Row]) -> None:
        """Rows that leave before they finish (a cancelled request): out at the next ``step``."""
        for r in rows:
            r.done = True

    def pick(self) -> list[Row]:
        """Every unfinished row picks its next token (``Row.token``) from its logits; a stop token
        or the row's limit finishes it. The rows that picked one."""
        self._merge()
        picked = []
        for k, r in enumerate(self.rows):
            if r.done:
                continue
            try:
                r.token = int(r.pick(self.last[k]))
            except Exception as exc:
                if not self.isolate:
                    raise
                r.error, r.done = exc, True
                picked.append(r)
                continue
            r.count += 1
            r.done = r.token in r.stop or r.count >= r.limit
            picked.append(r)
        return picked

    def step(self) -> None:
        """Feed the picked tokens: rows that have finished leave (a static batch feeds them padding);
        nothing is computed when no row is left to read it."""
        self._merge()
        if self.splices and any(r.done for r in self.rows):
            keep = [k for k, r in enumerate(self.rows) if not r.done]
            if self.shared and keep:
                # the last rows move into the places of the rows that left (a shared buffer's
                # leading rows are one contiguous view): only the moved rows are copied
                holes = [k for k in range(len(keep)) if self.rows[k].done]
                moved = [k for k in keep if k >= len(keep)]
                for v in self.cache.values():
                    v[holes] = v[moved]
                keep = list(range(len(keep)))
                for h, m in zip(holes, moved):
                    keep[h] = m
            self.rows, self.last = [self.rows[k] for k in keep], self.last[keep]
            if self.cached:
                self.mask = self.mask[keep]
                if self.shared:
                    self.cache = {n: v[:len(keep)] for n, v in self.cache.items()}
                else:
                    self.cache = {n: v[keep] for n, v in self.cache.items()}
                used = self.mask.any(0)
                if self.right:              # the columns past every remaining row's end go
                    end = self.mask.shape[1] - int(np.argmax(used[::-1])) if used.any() else 0
                    if end < self.mask.shape[1]:
                        self.mask = self.mask[:, :end]
                        if not self.shared:         # a shared buffer keeps its room
                            self.cache = {n: v[:, :, :end] for n, v in self.cache.items()}
                else:                       # the columns before every remaining row's start go
                    first = int(np.argmax(used)) if used.any() else self.mask.shape[1]
                    if first:
                        self.mask = self.mask[:, first:]
                        self.cache = {n: v[:, :, first:] for n, v in self.cache.items()}
        if not self.active:
            if self.splices:
                self.rows, self.last, self.mask = [], None, np.zeros((0, 0), np.int64)
                self.cache = self.runtime.empty_cache(0) if self.cached else {}
            return
        if not self.cached:
            for r in self.rows:
                r.seq.append(r.token)
            live = [k for k, r in enumerate(self.rows) if not r.done]
            logits = _last_logits(self.runtime, [r.seq for r in self.rows], live)
            for k in live:
                self.last[k] = logits[k]
            return
        feed = np.array([[self.pad_id if r.done and not self.splices else r.token] for r in self.rows], np.int64)
        if self.right:      # each row's token goes right after its own past: one more column only for the longest
            lengths = self.mask.sum(1)
            width = int(lengths.max()) + 1
            self.mask = np.pad(self.mask, ((0, 0), (0, width - self.mask.shape[1])))
            self.mask[np.arange(len(self.rows)), lengths] = 1
            if self.shared:
                if _room(self.cache) < width:
                    self.cache = {n: np.pad(v, ((0, 0), (0, 0), (0, width + ROOM - v.shape[2]), (0, 0)))
                                  for n, v in self.cache.items()}
                self.last = self.runtime.step_into(feed, self.mask, self.cache)[:, -1]
                return
        else:
            self.mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], 1)
        logits, self.cache = self.runtime.step(feed, self.mask, self.cache, last=True)
        self.last = logits[:, -1]


ROOM = 32       # columns a shared KV buffer (``Batch.shared``) grows by beyond what the next step needs


def _room(cache: dict[str, np.ndarray]) -> int:
    """The columns of an ONNX cache (its arrays' third axis: the past, or a shared buffer's room)."""
    return next(iter(cache.values())).shape[2] if cache else 0


def run(batch: Batch, boundary: Callable[[Batch], None] | None = None) -> Iterator[list[Row]]:
    """THE decode loop. At every token boundary ``boundary(batch)`` may add rows (``Batch.prefill``)
    and drop some (``Batch.drop``); then every unfinished row picks its token, the rows that
    picked are yielded (each with its ``token``, ``done`` when it was its last), and the picked
    tokens are fed. It ends when no unfinished row is left after the boundary."""
    while True:
        if boundary is not None:
            boundary(batch)
        if not batch.active:
            return
        yield batch.pick()
        batch.step()


def decode(runtime: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
           stop: Iterable[int] | Sequence[Iterable[int]] = (), pick: Picker | Sequence[Picker] | None = None,
           pad_id: int = 0) -> Iterator[list[int | None]]:
    """Per step, the new token of each row (``None`` for a row that has finished). A row finishes
    with a stop token (yielded: the row's last token) or at its ``max_new_tokens``; the loop ends
    when every row has finished (no step is computed that nobody reads). ``stop``: token ids for
    every row, or one collection per row; ``pick``: a picker for every row or one per row (default
    greedy); ``max_new_tokens``: one limit or one per row. The prompts are one prefill (``run``
    over a ``Batch``)."""
    n = len(prompts)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("decode: a prompt has no tokens")
    limits = _per_row(max_new_tokens, n, "token limits")
    stops = _stop_sets(stop, n)
    picks = _per_row(pick or greedy, n, "pickers")
    rows = [Row(p, m, s, k, i) for i, (p, m, s, k) in enumerate(zip(prompts, limits, stops, picks))]
    if not any(not r.done for r in rows):
        return
    batch = Batch(runtime, pad_id)
    joining = rows if not batch.splices else [r for r in rows if not r.done]
    if batch.right:         # right-padded rows: the prompts of each length prefilled together, then spliced
        for width in sorted({len(r.prompt) for r in joining}):
            batch.prefill(batch.start([r for r in joining if len(r.prompt) == width]))
    else:
        batch.prefill(batch.start(joining))
    for picked in run(batch):
        tokens: list[int | None] = [None] * n
        for r in picked:
            tokens[r.tag] = r.token
        yield tokens


def _last_logits(runtime: Any, seqs: list[list[int]], rows: list[int]) -> dict[int, np.ndarray]:
    """Full-sequence logits at the last token of each of ``rows`` (right-padded, one call)."""
    width = max(len(seqs[i]) for i in rows)
    ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
    for k, i in enumerate(rows):
        ids[k, :len(seqs[i])], mask[k, :len(seqs[i])] = seqs[i], 1
    out = np.asarray(runtime(ids, mask))
    return {i: out[k, len(seqs[i]) - 1] for k, i in enumerate(rows)}


def stream(runtime: Any, prompt: Sequence[int], max_new_tokens: int, stop: Iterable[int] = (),
           pick: Picker | None = None) -> Iterator[int]:
    """One sequence's new tokens as they are decoded; the stop token ends it and is not yielded."""
    stop = frozenset(stop)
    for (token,) in decode(runtime, [prompt], max_new_tokens, [stop], pick):
        if token is None or token in stop:
            return
        yield token


def generate_ids(runtime: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                 stop: Iterable[int] | Sequence[Iterable[int]] = (), pick: Picker | Sequence[Picker] | None = None,
                 pad_id: int = 0) -> list[list[int]]:
    """Each row's new tokens, its stop token last when one was reached (no padding)."""
    rows: list[list[int]] = [[] for _ in prompts]
    for tokens in decode(runtime, prompts, max_new_tokens, stop, pick, pad_id):
        for row, token in zip(rows, tokens):
            if token is not None:
                row.append(token)
    return rows


def reply_ids(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]],
              max_new_tokens: int, tools: Sequence[list[dict[str, Any]] | None] | None = None) -> list[list[int]]:
    """Greedy replies to conversations in the model's chat format, as token ids, in one left-padded
    batch; a reply stops at the template's end-of-turn marker or an EOS of the tokenizer /
    ``generation_config`` (the stop token is its last id when it was reached). ``model``: a runtime,
    or a PyTorch causal LM (run as ``TorchCausalLM``). ``tools``: per conversation, the functions it
    may call (OpenAI ``tools``), declared in the prompt in the model's tool format."""
    from .chat import prompt_ids, stop_ids
    from .runtimes import as_runtime

    if not conversations:
        return []
    runtime = as_runtime(model)
    per_row = list(tools) if tools is not None else [None] * len(conversations)
    prompts = [prompt_ids(tokenizer, m, tools=t) for m, t in zip(conversations, per_row)]
    stop = stop_ids(tokenizer, getattr(model, "generation_config", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    return generate_ids(runtime, prompts, max_new_tokens, stop, pad_id=pad)


def replies(model: Any, tokenizer: Any, conversations: list[list[dict[str, Any]]], max_new_tokens: int,
            tools: Sequence[list[dict[str, Any]] | None] | None = None) -> list[str]:
    """Greedy reply texts (special tokens, the stop token among them, removed) of ``reply_ids``."""
    return [tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in reply_ids(model, tokenizer, conversations, max_new_tokens, tools)]
