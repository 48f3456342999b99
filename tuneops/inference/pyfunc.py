"""The registered models: MLflow pyfuncs. ``OnnxChatModel`` runs the ONNX variant of a causal LM
with ONNX Runtime (through ``tuneops.inference.engine.ChatEngine``, the engine ``tuneops serve`` uses);
``HeadModel`` a classification / NER head in PyTorch.

A registered chat model loads outside this project: it carries the ``tuneops`` package
(``code_paths``), pinned requirements (mlflow, onnxruntime, transformers, tokenizers, numpy,
jinja2; no torch), a signature and an input example::

    model = mlflow.pyfunc.load_model("models:/<name>@champion")
    model.predict({"messages": [{"role": "user", "content": "Hello"}]}, params={"max_tokens": 32})
    # -> ["Hi! ..."]   (one reply per conversation)

Input: a ``messages`` column of OpenAI-style chat conversations (a DataFrame, a dict with
``messages``, or a list of such dicts); plain strings are taken as one user turn each. Params:
``max_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``seed`` (-1 = none). Every ONNX variant
the optimize stage built and the tokenizer travel as artifacts (laid out as ``tuneops.inference.layout``
says); the model config's ``variant`` (optimize's ``default_variant``, never a rejected one) picks
the one to run.
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc

CHAT_REQUIREMENTS = ("mlflow", "onnxruntime", "transformers", "tokenizers", "numpy", "jinja2")
CHAT_PARAMS = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "seed": -1}
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "Hello"}]}


def pinned(names: tuple[str, ...] | list[str]) -> list[str]:
    """``name==installed version`` for each distribution."""
    from importlib.metadata import version

    return [f"{n}=={version(n)}" for n in names]


def chat_model_spec(artifacts: dict[str, str], variant: str, max_new_tokens: int = 64) -> dict[str, Any]:
    """``mlflow.pyfunc.log_model`` arguments of a chat model (besides ``name``)."""
    from pathlib import Path

    import tuneops
    from mlflow.models import infer_signature

    signature = infer_signature(CHAT_EXAMPLE, ["Hello! How can I help?"], params=CHAT_PARAMS)
    return {"python_model": OnnxChatModel(), "artifacts": artifacts,
            "model_config": {"variant": variant, "max_new_tokens": max_new_tokens},
            "code_paths": [str(Path(tuneops.__file__).parent)], "signature": signature,
            "input_example": (CHAT_EXAMPLE, {"max_tokens": 8}), "pip_requirements": pinned(CHAT_REQUIREMENTS)}


def conversations(model_input: Any) -> list[list[dict[str, Any]]]:
    """The chat conversations in a pyfunc input (see the module docstring)."""
    if hasattr(model_input, "columns"):                    # a DataFrame (what a signature turns inputs into)
        col = "messages" if "messages" in model_input.columns else model_input.columns[0]
        rows = list(model_input[col])
    elif isinstance(model_input, dict):
        rows = [model_input["messages"]] if "messages" in model_input else [model_input[next(iter(model_input))]]
    else:
        rows = list(model_input)
    out = []
    for row in rows:
        if isinstance(row, dict) and "messages" in row:
            row = row["messages"]
        if isinstance(row, str):
            out.append([{"role": "user", "content": row}])
        else:
            out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in list(row)])
    return out


class OnnxChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from tuneops.inference import layout
        from tuneops.inference.engine import ChatEngine

        config = context.model_config or {}
        self.variant = config.get("variant", "fp32")
        self.artifacts = dict(context.artifacts)
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        self.engine = None
        if layout.ADAPTER in self.artifacts:     # the adapter over its shared base graph, where that is here
            from tuneops.inference.pool import SHARED_BASES
            from tuneops.inference.resolve import ServeError, files_of_adapter

            try:
                files = files_of_adapter(Path(self.artifacts[layout.ADAPTER]), "pyfunc")
                files.tokenizer_dir = Path(self.artifacts[layout.TOKENIZER])
                self.engine, self.variant = files.load(bases=SHARED_BASES), layout.UNMERGED
            except ServeError:
                pass                             # another machine: the merged variant below
        if self.engine is None:
            self.engine = ChatEngine(Path(context.artifacts[layout.artifact_key(self.variant)]) / layout.MODEL_FILE,
                                     Path(context.artifacts[layout.TOKENIZER]))
        self.lm, self.tokenizer = self.engine.lm, self.engine.tokenizer

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        params = params or {}
        limit = int(params.get("max_tokens") or params.get("max_new_tokens") or self.max_new_tokens)
        seed = params.get("seed")
        kw = {"temperature": float(params.get("temperature") or 0.0), "top_p": float(params.get("top_p") or 1.0),
              "seed": None if seed is None or int(seed) < 0 else int(seed)}
        convs = conversations(model_input)
        if len(convs) <= 1:
            return [self.engine.complete(msgs, limit, **kw).text.strip() for msgs in convs]
        from concurrent.futures import ThreadPoolExecutor

        # the conversations decode together in the engine's batch (continuous batching)
        with ThreadPoolExecutor(min(len(convs), self.engine.batcher.max_batch)) as pool:
            return list(pool.map(lambda msgs: self.engine.complete(msgs, limit, **kw).text.strip(), convs))


class HeadModel(mlflow.pyfunc.PythonModel):
    """A classification / NER head. ``predict(["some text", ...])`` returns one label per text
    (sequence classification) or one BIO tag per whitespace-separated word (token
    classification; a list of tokens per row is also accepted)."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoTokenizer

        from tuneops.training import heads

        config = context.model_config or {}
        self.head, self.labels = config["task_head"], list(config["labels"])
        self.max_len = int(config.get("max_seq_len", 256))
        plan = {"task_head": self.head, "labels": self.labels}
        if "model" in context.artifacts:
            self.model = heads.get(self.head).auto().from_pretrained(context.artifacts["model"])
        else:                                   # prompt tuning: base + adapter
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(heads.load(context.artifacts["base"], plan),
                                                   context.artifacts["adapter"])
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        import torch

        from tuneops.training import heads

        rows = list(model_input["text"]) if hasattr(model_input, "columns") else list(model_input)
        per_token = heads.get(self.head).per_token
        out: list[Any] = []
        with torch.inference_mode():
            for row in rows:
                if not per_token:
                    enc = self.tokenizer(str(row), truncation=True, max_length=self.max_len, return_tensors="pt")
                    out.append(self.labels[int(self.model(**enc).logits[0].argmax())])
                    continue
                words = list(row) if isinstance(row, (list, tuple)) else str(row).split()
                enc = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_len,
                                     return_tensors="pt")
                logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0]
                pred = logits[-enc["input_ids"].shape[1]:].argmax(-1)     # prompt tuning: virtual tokens first
                tags, prev = ["O"] * len(words), None
                for pos, word in enumerate(enc.word_ids()):
                    if word is not None and word != prev:
                        tags[word] = self.labels[int(pred[pos])]
                    prev = word
                out.append(tags)
        return out
