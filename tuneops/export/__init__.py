"""ONNX export and optimisation, the package the optimize stage (``tasks/optimize.py``) and the
benchmark (``bench/bench_onnx.py``) both use:

- ``exporter``: PyTorch -> ONNX (KV-cache decoder, fixed-shape logits, classifiers);
- ``passes``: graph passes (ORT transformer fusions, untying the LM head, the embedding stored once);
- ``quantizers``: ONNX Runtime's quantizers (round to nearest, HQQ, dynamic INT8, static QDQ);
- ``calibrated``: the calibrated 4-bit recipe (GPTQ, per-layer sensitivity, mixed precision);
- ``basequant``: the int4 base quantizer that quantization-aware LoRA (``qat_int4``) trains against
  and the base graph stores (one definition), and which base graph an adapter needs;
- ``adapters``: LoRA adapters exported unmerged (ONNX Runtime adapter files) over one shared base graph;
- ``variants``: the registry of variants (a new variant is one entry);
- ``gate``: parity, perplexity / top-1 gates and the default variant.

Target profiles (what each target executes, which variants it needs) are ``tuneops/targets``.
Importing this package is cheap: the heavy libraries are imported where they are used.
"""
