"""onnxruntime-genai: build a model with Microsoft's model builder from a local Hugging
Face folder (offline) and generate with ``og.Generator``.

onnxruntime-genai 0.18's builder reads Gemma 3's RoPE settings in the transformers 4
layout (``rope_theta`` + ``rope_local_base_freq``); transformers 5 configs nest them per
layer type (``rope_parameters: {full_attention: .., sliding_attention: ..}``) and the
builder fails with ``KeyError: 'rope_type'``. ``build`` flattens them before the builder
reads them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _flatten_gemma3_rope(config: Any) -> None:
    from .families import for_config

    if for_config(config).rope != "local-global":     # the family spec: two RoPE bases (sliding / full)
        return
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:
        config.rope_local_base_freq = rp["sliding_attention"]["rope_theta"]
        config.rope_parameters = dict(rp["full_attention"])
        config.rope_theta = rp["full_attention"]["rope_theta"]


def build(model_dir: Path, out_dir: Path, precision: str = "int4", cache_dir: Path | None = None,
          extra_options: dict[str, str] | None = None) -> Path:
    """``python -m onnxruntime_genai.models.builder -i model_dir -o out_dir -p precision -e cpu``."""
    from onnxruntime_genai.models import builder

    original = builder.Gemma3Model

    class Gemma3Flat(original):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            _flatten_gemma3_rope(config)
            super().__init__(config, *args, **kwargs)

    builder.Gemma3Model = Gemma3Flat
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        args = (None, str(model_dir), str(out_dir), precision, "cpu", str(cache_dir or out_dir / ".cache"))
        options = builder.parse_extra_options(*args, [f"{k}={v}" for k, v in (extra_options or {}).items()])
        builder.create_model(*args, **options)
    finally:
        builder.Gemma3Model = original
    return out_dir


if __name__ == "__main__":
    import sys

    build(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
