"""The registered model: an MLflow pyfunc that runs the ONNX variant with ONNX Runtime.

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

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        from tuneops.chat import render

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        tok = self.tokenizer
        stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
        limit = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        replies = []
        for prompt in prompts:
            text = render([{"role": "user", "content": str(prompt)}], add_generation_prompt=True, bos="")
            ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
            new = list(self.lm.stream(ids, limit, stop))
            replies.append(tok.decode(new, skip_special_tokens=True).strip())
        return replies
