"""The registered models: MLflow pyfuncs. ``OnnxChatModel`` runs the ONNX variant of a causal LM
with ONNX Runtime; ``HeadModel`` a classification / NER head in PyTorch.

``mlflow.pyfunc.load_model("models:/<name>@champion").predict(["Hello"])`` returns
greedy replies (ONNX Runtime, KV cache); every ONNX variant the optimize stage built, the
adapter and the tokenizer travel as artifacts of the model version; the model config's
``variant`` (optimize's ``default_variant``, never a rejected one) picks the one to run.
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class OnnxChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from transformers import AutoTokenizer

        from tuneops.onnx_lm import OnnxCausalLM

        config = context.model_config or {}
        self.variant = config.get("variant", "fp32")
        self.artifacts = dict(context.artifacts)
        self.max_new_tokens = int(config.get("max_new_tokens", 32))
        self.lm = OnnxCausalLM(Path(context.artifacts[f"onnx_{self.variant}"]) / "model.onnx")
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])
        from tuneops.chat import load_generation_config

        self.generation_config = load_generation_config(context.artifacts["tokenizer"])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from tuneops.chat import prompt_ids, stop_ids

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        tok = self.tokenizer
        stop = set(stop_ids(tok, getattr(self, "generation_config", None)))
        limit = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        replies = []
        for prompt in prompts:
            ids = prompt_ids(tok, [{"role": "user", "content": str(prompt)}])
            new = list(self.lm.stream(ids, limit, stop))
            replies.append(tok.decode(new, skip_special_tokens=True).strip())
        return replies


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
            self.model = heads.auto_class(self.head).from_pretrained(context.artifacts["model"])
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
        out: list[Any] = []
        with torch.inference_mode():
            for row in rows:
                if self.head == heads.SEQ_CLS:
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
