"""The serving engine: one implementation of "a registered / exported model answers a chat"
shared by ``tuneops serve``, the jobs API's chat endpoint and the registered MLflow pyfunc.

``ChatEngine`` runs an ONNX Runtime causal LM (``OnnxCausalLM``, KV cache) with the model's own
chat template (``tuneops.inference.chat.prompt_ids``) and stop tokens (``inference.chat.stop_ids``: the
template's end-of-turn marker, the tokenizer's and generation_config's EOS); ``stop`` strings are
honoured on the decoded text. ``Classifier`` runs a classification / NER version.

``resolve`` turns a model reference into files: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``
(read in place from a local artifact store; downloaded otherwise) or an exported folder (an
optimize output with ``metrics.json``, or a folder holding ``model.onnx``).

Only numpy, onnxruntime, tokenizers/transformers (no torch) are needed for chat: the MLflow
pyfunc imports this module in a fresh environment.
"""
from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidInput
from .decode import stream
from .sampling import sampler


class ServeError(InvalidInput):
    """A model reference that cannot be served (names the reference and what is missing)."""


class Busy(Exception):
    """The bounded queue is full."""


class Closed(Exception):
    """The server is shutting down: no new requests (503)."""


class Cancelled(Exception):
    """A request cancelled before or while it ran (its client went away, or the server is stopping)."""


MIN_TEMPERATURE = 1e-5    # a lower temperature decodes greedily (logits / a subnormal number are inf: NaN odds)


# -- what runs --------------------------------------------------------------------------------------

@dataclass
class Generation:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"


class ChatEngine:
    """A causal LM ONNX graph + its tokenizer; ``deltas`` yields reply text as it is decoded."""

    kind = "chat"

    def __init__(self, onnx_path: Path, tokenizer_dir: Path, generation_dirs: tuple[Any, ...] = (),
                 threads: int = 0):
        from transformers import AutoTokenizer

        from .chat import load_generation_config, stop_ids
        from .runtimes import OnnxCausalLM

        self.onnx_path = Path(onnx_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.lm = OnnxCausalLM(self.onnx_path, threads)
        gen_cfg = load_generation_config(tokenizer_dir, self.onnx_path.parent, *generation_dirs)
        self.stop = set(stop_ids(self.tokenizer, gen_cfg))

    def prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        from .chat import prompt_ids

        return prompt_ids(self.tokenizer, messages)

    def deltas(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
               result: Generation | None = None, cancel: Any = None, top_k: int = 0) -> Iterator[str]:
        """Reply text pieces; ``result`` receives the token counts and finish reason. Text that
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
        tokens = stream(self.lm, ids, max_tokens, self.stop, pick)
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


# -- model references -------------------------------------------------------------------------------

URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


@dataclass
class ModelFiles:
    id: str                       # the model id clients send
    kind: str                     # chat | classify
    onnx_path: Path | None = None
    tokenizer_dir: Path | None = None
    pyfunc_dir: Path | None = None
    task_head: str = ""
    extra_dirs: tuple[Any, ...] = field(default_factory=tuple)
    version: str | None = None    # the registered version number (None for an exported folder)

    def load(self, threads: int = 0) -> Any:
        if self.kind == "chat":
            return ChatEngine(self.onnx_path, self.tokenizer_dir, self.extra_dirs, threads)
        if self.pyfunc_dir is not None:
            return Classifier(pyfunc_dir=self.pyfunc_dir, task_head=self.task_head)
        return Classifier(onnx_path=self.onnx_path, task_head=self.task_head)


def registered_dir(uri: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """The local folder of a registered model version (read in place when the artifact store is
    local) and its version number."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = URI.match(uri)
    if not m:
        raise ServeError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        elif m["version"] == "latest":
            mv = max(client.search_model_versions(f"name='{m['name']}'"), key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(m["name"], m["version"])
        location = client.get_model_version_download_uri(m["name"], mv.version)
    except (MlflowException, ValueError) as exc:
        raise ServeError(f"{uri}: no such registered model version ({str(exc).splitlines()[0]})") from None
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        location = unquote(urlparse(location).path)
    local = Path(location)
    if not (local / "MLmodel").is_file():
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{m['name']}/{mv.version}",
                                                         tracking_uri=tracking_uri))
    return local, str(mv.version)


def files_of_registered(folder: Path, model_id: str, variant: str | None = None) -> ModelFiles:
    """What to run from a registered pyfunc folder: its default ONNX variant (or ``variant``) +
    tokenizer, or its head."""
    import yaml

    meta = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = meta.get("flavors", {}).get("python_function", {})
    config = flavor.get("config") or flavor.get("model_config") or {}     # MLmodel writes model_config as config
    arts = {k: folder / (v["path"] if isinstance(v, dict) else v) for k, v in (flavor.get("artifacts") or {}).items()}
    if config.get("task_head"):
        return ModelFiles(model_id, "classify", pyfunc_dir=folder, task_head=str(config["task_head"]))
    variant = variant or config.get("variant", "fp32")
    if f"onnx_{variant}" not in arts or "tokenizer" not in arts:
        raise ServeError(f"{folder}: no ONNX variant {variant!r} or tokenizer among its artifacts {sorted(arts)}")
    return ModelFiles(model_id, "chat", arts[f"onnx_{variant}"] / "model.onnx", arts["tokenizer"])


def resolve(ref: str, tracking_uri: str | None = None, fallback_tokenizer: Path | None = None,
            model_id: str | None = None, variant: str | None = None) -> ModelFiles:
    """A model reference -> the files to serve (see the module docstring); ``variant``: that ONNX
    variant instead of the default one."""
    import json

    if ref.startswith("models:/"):
        folder, version = registered_dir(ref, tracking_uri)
        files = files_of_registered(folder, model_id or URI.match(ref)["name"], variant)
        files.version = version
        return files
    path = Path(ref).expanduser().resolve()
    name = model_id or path.name
    if (path / "MLmodel").is_file():
        return files_of_registered(path, name, variant)
    if (path / "metrics.json").is_file() and not (path / "model.onnx").is_file():     # an optimize output
        m = json.loads((path / "metrics.json").read_text())
        variant = variant or m.get("default_variant")
        if not variant:
            raise ServeError(f"{path}: every ONNX variant was rejected by its gate; serve one variant's folder")
        if variant not in m["variants"]:
            raise ServeError(f"{path}: no ONNX variant {variant!r}; built: {sorted(m['variants'])}")
        path = path / m["variants"][variant]["path"]
        path = path.parent if path.name == "model.onnx" else path
    elif variant and (path / variant).is_dir():
        path = path / variant
    onnx = path / "model.onnx" if path.is_dir() else path
    if not onnx.is_file():
        raise ServeError(f"{ref}: no model.onnx, MLmodel or optimize metrics.json there")
    if (onnx.parent / "labels.json").is_file():
        return ModelFiles(name, "classify", onnx_path=onnx)
    tok = next((d for d in (onnx.parent, onnx.parent.parent, fallback_tokenizer)
                if d is not None and (Path(d) / "tokenizer_config.json").is_file()), None)
    if tok is None:
        raise ServeError(f"{ref}: no tokenizer next to the ONNX model (tokenizer_config.json)")
    return ModelFiles(name, "chat", onnx, Path(tok), (fallback_tokenizer,))


# -- queueing and the model pool --------------------------------------------------------------------

class Scheduler:
    """A bounded queue in front of the model: at most ``max_concurrent`` generations run at once
    and ``max_queue`` more wait; ``admit()`` refuses the rest (``Busy`` -> 429).

    Every admitted request holds a ``Ticket`` until it is released (once, by whoever ran it), and
    a slot only while it runs (``Ticket.running``). ``Ticket.cancel`` (a client went away, the
    server is stopping) wakes a request waiting for a slot (``Cancelled``) and stops a running
    generation at its next token, so the counters never wait for garbage collection. ``close``
    cancels every admitted request and refuses new ones (``Closed`` -> 503)."""

    def __init__(self, max_concurrent: int = 1, max_queue: int = 16):
        self.max_concurrent = max_concurrent
        self.capacity = max_concurrent + max_queue
        self.admitted = 0            # running + waiting for a slot
        self.running = 0             # holding a slot
        self.cancelled = 0           # requests cancelled before they finished (since start)
        self.closed = False
        self.progress_at = time.monotonic()    # the last token produced, or slot taken / given back
        self._cond = threading.Condition()
        self._tickets: set[Ticket] = set()

    def admit(self) -> "Ticket":
        with self._cond:
            if self.closed:
                raise Closed("the server is shutting down")
            if self.admitted >= self.capacity:
                raise Busy(f"{self.admitted} requests are running or queued (serve.max_concurrent + "
                           f"serve.max_queue = {self.capacity}); retry later")
            self.admitted += 1
            ticket = Ticket(self)
            self._tickets.add(ticket)
        return ticket

    def close(self, reason: str = "the server is shutting down") -> None:
        """Refuse new requests and cancel the admitted ones (SIGINT / SIGTERM)."""
        with self._cond:
            self.closed = True
            tickets = list(self._tickets)
        for ticket in tickets:
            ticket.cancel(reason)

    def stalled_s(self) -> float:
        """Seconds every slot has been held with no token produced and no slot given back (0 while
        a slot is free): how long a new request could not have had one."""
        with self._cond:
            if self.running < self.max_concurrent:
                return 0.0
            return time.monotonic() - self.progress_at

    def state(self) -> dict[str, Any]:
        with self._cond:
            return {"running": self.running, "waiting": self.admitted - self.running,
                    "max_concurrent": self.max_concurrent, "capacity": self.capacity,
                    "cancelled": self.cancelled, "closed": self.closed}


class Ticket:
    """One admitted request (see ``Scheduler``)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.done = scheduler, False
        self.reason = ""                        # why it was cancelled
        self.cancelled = threading.Event()      # set by ``cancel``; generation looks at it every token

    def cancel(self, reason: str = "the client went away") -> None:
        """Stop this request: a wait for a slot ends in ``Cancelled``, a generation at its next
        token. Nothing happens to a released ticket."""
        s = self.scheduler
        with s._cond:
            if self.done or self.cancelled.is_set():
                return
            self.reason = reason
            self.cancelled.set()
            s.cancelled += 1
            s._cond.notify_all()

    @contextmanager
    def running(self) -> Iterator[None]:
        """Hold a slot (waiting for one; ``Cancelled`` if cancelled first)."""
        s = self.scheduler
        with s._cond:
            while not self.cancelled.is_set() and s.running >= s.max_concurrent:
                s._cond.wait()
            if self.cancelled.is_set():
                raise Cancelled(self.reason)
            s.running += 1
            s.progress_at = time.monotonic()
        try:
            yield
        finally:
            with s._cond:
                s.running -= 1
                s.progress_at = time.monotonic()
                s._cond.notify_all()

    def beat(self) -> None:
        """A token was produced (``Scheduler.stalled_s``)."""
        self.scheduler.progress_at = time.monotonic()

    def release(self) -> None:
        s = self.scheduler
        with s._cond:
            if not self.done:
                self.done = True
                s.admitted -= 1
                s._tickets.discard(self)
                s._cond.notify_all()


class ModelPool:
    """Loaded models by key, least-recently-used evicted beyond ``limit``; each loads once even
    when requests for it arrive together."""

    def __init__(self, limit: int, threads: int = 0):
        from collections import OrderedDict

        self.limit, self.threads = limit, threads
        self._models: "OrderedDict[str, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, key: str, files: Any) -> Any:
        """``files``: a ModelFiles or a zero-argument callable returning one (called only to load)."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            spec = files() if callable(files) else files
            model = spec.load(self.threads)
            model.id = spec.id
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.limit:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
            return model

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)
