"""The registered model: an MLflow pyfunc that runs the ONNX variant with ONNX Runtime.

``mlflow.pyfunc.load_model("models:/<name>@champion").predict(["Hello"])`` returns
greedy replies; the fp32/INT8 ONNX files, the adapter and the tokenizer travel as
artifacts of the model version.
"""
from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class OnnxChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from pathlib import Path

        from transformers import AutoTokenizer

        from tasks.optimize import ort_forward

        config = context.model_config or {}
        variant = config.get("variant", "fp32")
        self.max_new_tokens = int(config.get("max_new_tokens", 32))
        self.forward = ort_forward(Path(context.artifacts[f"onnx_{variant}"]) / "model.onnx")
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        import numpy as np

        from tuneops.chat import render

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        tok = self.tokenizer
        stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
        limit = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        replies = []
        for prompt in prompts:
            text = render([{"role": "user", "content": str(prompt)}], add_generation_prompt=True, bos="")
            ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
            new: list[int] = []
            for _ in range(limit):  # full recompute per token (no KV cache in this export)
                arr = np.array([ids + new], dtype=np.int64)
                nxt = int(self.forward(arr, np.ones_like(arr))[0, -1].argmax())
                if nxt in stop:
                    break
                new.append(nxt)
            replies.append(tok.decode(new, skip_special_tokens=True).strip())
        return replies
