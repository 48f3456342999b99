"""onnxruntime-genai's model builder (Microsoft's): a merged Hugging Face folder -> an ONNX decoder
with fused attention (``GroupQueryAttention`` with rotary embeddings, ``SkipSimplifiedLayerNormalization``),
built from the weights without tracing (seconds, where ``torch.onnx`` takes minutes).

The optimize stage uses it as its fp32 exporter (``optimize.exporter``, for the families whose
``Family.genai_builder`` allows it) and for the ``genai_*`` variants (the builder's own INT8 / INT4).
The graphs have the pipeline's input and output names (``input_ids``, ``attention_mask``,
``past_key_values.{i}.key|value`` -> ``logits``, ``present.{i}.key|value``); there is no
``position_ids``: the attention takes positions from the mask (right padding, which is what
full-sequence scoring and one-sequence decoding use). ``genai_config.json`` and the tokenizer are
written beside the graph, so ``onnxruntime_genai.Model(folder)`` runs it too.

What ``build`` adjusts:

- ``windowed_kv_cache=false``: with a windowed cache, a sliding-window layer (Gemma 2/3, Mistral)
  needs a preallocated cache buffer of at least the window (what ``og.Generator`` provides, not
  a plain ONNX Runtime session); a full-length cache per layer gives the same logits.
- the KV cache's head size is written into the graph's input/output shapes (the builder leaves it
  symbolic, ``kv_cache_dim``).
- onnxruntime-genai 0.18's builder reads Gemma 3's RoPE settings in the transformers 4 layout
  (``rope_theta`` + ``rope_local_base_freq``); transformers 5 configs nest them per layer type
  (``rope_parameters: {full_attention: .., sliding_attention: ..}``) and the builder fails with
  ``KeyError: 'rope_type'``: they are flattened before the builder reads them.
- the builder loads the tokenizer three times (options, config, processing files); a 262k-token
  vocabulary (Gemma) costs ~6 s each: it is loaded once.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

DEFAULTS = {"windowed_kv_cache": "false"}


def _flatten_gemma3_rope(config: Any) -> None:
    from ..families import for_config

    if for_config(config).rope != "local-global":     # the family spec: two RoPE bases (sliding / full)
        return
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:
        config.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rp["full_attention"])
        config.rope_theta = rp["full_attention"]["rope_theta"]


@contextlib.contextmanager
def _builder_patched() -> Iterator[Any]:
    from onnxruntime_genai.models import builder
    from onnxruntime_genai.models.builders import base

    original_gemma3, original_tok = builder.Gemma3Model, (builder.AutoTokenizer, base.AutoTokenizer)

    class Gemma3Flat(original_gemma3):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            _flatten_gemma3_rope(config)
            super().__init__(config, *args, **kwargs)

    loaded: dict[str, Any] = {}

    class OnceTokenizer:                     # same folder, same options in the builder's three calls
        @staticmethod
        def from_pretrained(path: Any, **kwargs: Any) -> Any:
            if str(path) not in loaded:
                loaded[str(path)] = original_tok[0].from_pretrained(path, **kwargs)
            return loaded[str(path)]

    builder.Gemma3Model = Gemma3Flat
    builder.AutoTokenizer = base.AutoTokenizer = OnceTokenizer
    try:
        yield builder
    finally:
        builder.Gemma3Model = original_gemma3
        builder.AutoTokenizer, base.AutoTokenizer = original_tok


def _concrete_head_size(path: Path) -> None:
    """Replace the symbolic ``kv_cache_dim`` of the cache inputs/outputs by the head size."""
    import json

    import onnx

    head = int(json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"])
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == "kv_cache_dim":
                dim.dim_value = head
    onnx.save(model, str(path))


def build(model_dir: Path, out_dir: Path, precision: str = "int4", cache_dir: Path | None = None,
          extra_options: dict[str, str] | None = None) -> Path:
    """``python -m onnxruntime_genai.models.builder -i model_dir -o out_dir -p precision -e cpu``
    (offline, local folder), with ``DEFAULTS`` under ``extra_options``. Returns ``out_dir/model.onnx``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir or out_dir / ".cache"
    options = {**DEFAULTS, **(extra_options or {})}
    with _builder_patched() as builder:
        args = (None, str(model_dir), str(out_dir), precision, "cpu", str(cache))
        parsed = builder.parse_extra_options(*args, [f"{k}={v}" for k, v in options.items()])
        builder.create_model(*args, **parsed)
    if cache_dir is None:
        shutil.rmtree(cache, ignore_errors=True)
    path = out_dir / "model.onnx"
    _concrete_head_size(path)
    return path


if __name__ == "__main__":
    import sys

    build(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
