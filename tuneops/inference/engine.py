"""The engine: one implementation of "a model answers" shared by every entry point (``tuneops
generate``, ``tuneops serve``, the jobs API's model endpoints, the registered MLflow pyfunc).

``ChatEngine`` runs an ONNX Runtime causal LM (``OnnxCausalLM``, KV cache) through the one decode
loop (``tuneops.inference.decode``) with the model's own chat template (``tuneops.inference.chat.
prompt_ids``) and stop tokens (``inference.chat.stop_ids``: the template's end-of-turn marker, the
tokenizer's and generation_config's EOS); ``stop`` strings are honoured on the decoded text.
``Classifier`` runs a classification / NER version. ``tuneops.inference.resolve`` says which files
to load; ``tuneops.inference.scheduler`` which request runs when.

Only numpy, onnxruntime, tokenizers/transformers (no torch) are needed for chat: the MLflow
pyfunc imports this module in a fresh environment.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .decode import stream
from .sampling import MIN_TEMPERATURE, sampler
from .scheduler import Cancelled


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
                 threads: int = 0, lm: Any = None):
        from transformers import AutoTokenizer

        from .chat import load_generation_config, stop_ids
        from .runtimes import OnnxCausalLM

        self.onnx_path = Path(onnx_path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        self.lm = lm if lm is not None else OnnxCausalLM(self.onnx_path, threads)   # lm: e.g. an adapter over a shared base
        gen_cfg = load_generation_config(tokenizer_dir, self.onnx_path.parent, *generation_dirs)
        self.stop = set(stop_ids(self.tokenizer, gen_cfg))

    def prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        from .chat import prompt_ids

        return prompt_ids(self.tokenizer, messages, tools=tools)

    def deltas(self, ids: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
               result: Generation | None = None, cancel: Any = None, top_k: int = 0,
               constraint: Any = None) -> Iterator[str]:
        """Reply text pieces; ``result`` receives the token counts and finish reason. ``constraint``
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
