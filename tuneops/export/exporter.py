"""Exporters: a merged PyTorch model -> ONNX graphs (``torch.onnx.export``, dynamo, external data;
or onnxruntime-genai's model builder).

- ``choose``: which exporter builds the fp32 KV-cache graph (``optimize.exporter``).
- ``export_builder``: that graph from onnxruntime-genai's builder (``tuneops/export/genai.py``): fused
  ``GroupQueryAttention`` with rotary embeddings, built from the weights of the merged model's
  Hugging Face folder (``save_merged``) in seconds; no ``position_ids`` input.
- ``export_causal_lm``: ``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``,
  the KV-cache decoder every dynamic-shape variant starts from (exported once per stage run and
  reused by every variant).
- ``export_logits``: ``(input_ids, attention_mask) -> logits``, dynamic or one fixed shape (the
  fixed-shape targets' static QDQ, classifiers).
- ``export_classifier``: a sequence-classification model with its head, tokenizer and labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneops.io import write_json


class LogitsOnly(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits`` without KV cache (fixed-shape targets,
    classifiers)."""

    def __init__(self, model: Any, causal: bool = True):
        super().__init__()
        self.inner, self.causal = model, causal

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        if self.causal:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


class WithPast(torch.nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)``.

    The flat past tensors fill a plain ``DynamicCache`` (one full layer per decoder layer,
    no sliding-window truncation: sliding-window layers of the families that have them
    (``Family.sliding_window`` in ``tuneops/families.py``: Mistral, Gemma 2/3) get their window from
    the mask, and RoPE of every variant (``Family.rope``) is computed from ``position_ids``),
    so the exported graph grows the cache by concatenation and works for any past length,
    0 (prefill) included.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.inner = model
        self.layers = model.config.num_hidden_layers

    def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, *past: Any) -> Any:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _fold(program: Any) -> Any:
    """The exporter's clean-up without its pattern rewrites: constant folding, dead-node removal,
    constants lifted to initializers, duplicate initializers and common subexpressions merged.

    ``torch.onnx.export(optimize=True)`` also runs onnxscript's rewrite rules, which were 42% of
    the export time of SmolLM2-135M (py-spy, 89 of 211 s); the fusions the pipeline relies on
    come from ONNX Runtime's transformer optimizer afterwards (``passes.optimize_graph``), and
    the parity gate checks the result against PyTorch either way."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding

    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([_constant_folding.FoldConstantsPass(shape_inference=True,
                                                                   input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                                                   output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
                               common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                               common.RemoveUnusedOpsetsPass()], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(program.model)
    return program


def _export(module: Any, args: tuple[Any, ...], path: Path, **kwargs: Any) -> Path:
    program = torch.onnx.export(module, args, dynamo=True, optimize=False, verbose=False, **kwargs)
    _fold(program).save(str(path), external_data=True)
    return path


def choose(setting: str, family: Any, variants: list[Any]) -> str:
    """``builder`` or ``torch`` for ``optimize.exporter`` (auto | builder | torch): auto is the builder
    when the family's spec makes it the default (``Family.genai_builder == "auto"``) and no variant
    needs the torch graph; builder is allowed wherever the builder builds the family (auto, opt-in)."""
    builds = family.genai_builder in ("auto", "opt-in")
    builders = [v.name for v in variants if v.builder]
    if builders and not builds:
        raise ValueError(f"optimize: variant(s) {builders} need onnxruntime-genai's model builder, which does not "
                         f"build the {family.name} family (tuneops/families.py genai_builder)")
    if setting == "builder":
        if not builds:
            raise ValueError(f"optimize.exporter: builder: onnxruntime-genai's model builder does not build the "
                             f"{family.name} family (tuneops/families.py genai_builder); use auto or torch")
        return "builder"
    if setting == "auto" and family.genai_builder == "auto" and not any(v.torch_graph for v in variants):
        return "builder"
    return "torch"


def save_merged(model: Any, tokenizer: Any, folder: Path) -> Path:
    """The merged model as a Hugging Face folder (what the builder reads)."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def export_builder(merged: Path, path: Path) -> Path:
    """fp32 KV-cache decoder from onnxruntime-genai's builder; ``path`` is ``<folder>/model.onnx``.
    Its rotary caches are factored (``passes.factor_rotary_caches``: 64 MiB -> 0.75 MiB on Gemma 3
    270M), so the variants quantized from it do not carry them."""
    from tuneops.export import genai

    from .passes import factor_rotary_caches

    path = genai.build(merged, path.parent, "fp32")
    factor_rotary_caches(path)
    return path


def fused_ops(path: Path) -> dict[str, int]:
    """Counts of the fused (com.microsoft) ops in a graph."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def graph_size(path: Path) -> int:
    """Bytes of a graph and its external data (not the tokenizer or config files beside it)."""
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file() and f.name.startswith(path.name))


def overhead_bytes(path: Path) -> int:
    """Bytes of a graph that a weight quantizer does not shrink: the graph itself (nodes, small
    inline tensors) and every initializer that is not a ``MatMul`` weight (or its transposed tied
    source) nor a token-embedding table: norms, and the rotary cos/sin tables (onnxruntime-genai's
    caches for Gemma 3 270M's 32k context were 64 MiB; factored, 0.75 MiB)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n.op_type)
    for n in model.graph.node:
        if n.op_type == "Transpose" and set(consumers.get(n.output[0], [])) <= {"MatMul", "Gather"}:
            weights.add(n.input[0])
    for n in model.graph.node:
        if n.op_type == "Gather":
            weights.add(n.input[0])           # an embedding table (small Gathers are index constants)
    total = path.stat().st_size
    for init in model.graph.initializer:
        if init.name in weights:
            continue
        ext = {e.key: e.value for e in init.external_data}
        if "length" in ext:
            total += int(ext["length"])
    return total


def copy_sidecar(src: Path, dst: Path) -> None:
    """The builder's files beside ``src`` (``genai_config.json``, tokenizer, chat template) copied
    beside ``dst``: a variant quantized from the builder's graph runs under onnxruntime-genai too."""
    import shutil

    for f in src.parent.iterdir():
        if f.is_file() and not f.name.startswith(src.name) and not f.name.startswith("coverage-"):
            shutil.copy2(f, dst.parent / f.name)


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def export_causal_lm(model: Any, path: Path, opset: int) -> Path:
    """Export with a KV cache: dynamic batch, sequence, past and total lengths."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    layers, heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    batch_size, past_len, seq_len = 2, 3, 4  # example sizes > 1: no 0/1 specialisation
    ids = torch.randint(4, 1000, (batch_size, seq_len))
    past = [torch.zeros(batch_size, heads, past_len, head_dim) for _ in range(2 * layers)]
    mask = torch.ones(batch_size, past_len + seq_len, dtype=torch.long)
    pos = torch.arange(past_len, past_len + seq_len).unsqueeze(0).expand(batch_size, -1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    past_seq, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
    names = past_names(layers)
    return _export(
        WithPast(model).eval(), (ids, mask, pos, *past), path, opset_version=opset,
        input_names=["input_ids", "attention_mask", "position_ids", *names],
        output_names=["logits", *[n.replace("past_key_values", "present") for n in names]],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                        "position_ids": {0: batch, 1: seq},
                        "past": tuple({0: batch, 2: past_seq} for _ in range(2 * layers))})


def export_logits(model: Any, path: Path, opset: int, fixed_shape: tuple[int, int] | None = None,
                  causal: bool = True) -> Path:
    """``(input_ids, attention_mask) -> logits``: dynamic batch/sequence, or one static shape."""
    path.parent.mkdir(parents=True, exist_ok=True)
    b, s = fixed_shape or (2, 8)
    ids = torch.randint(4, 1000, (b, s))
    dims = None
    if fixed_shape is None:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    return _export(LogitsOnly(model, causal).eval(), (ids, torch.ones_like(ids)), path, opset_version=opset,
                   input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_shapes=dims)


def export_classifier(model_dir: Path, out_dir: Path, opset: int, atol: float,
                      texts: list[str] | None = None) -> dict[str, Any]:
    """Export a sequence-classification model with its head (``input_ids``,
    ``attention_mask`` -> ``logits [batch, labels]``), dynamic batch/sequence; copy the
    tokenizer and the label names (``labels.json``) beside it; check parity with PyTorch
    on a padded batch. Returns the parity record (``accepted`` when <= ``atol``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneops.inference.runtimes import OnnxClassifier

    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    path = export_logits(model, out_dir / "model.onnx", opset, causal=False)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    write_json(out_dir / "labels.json", labels)
    tokenizer.save_pretrained(str(out_dir))
    texts = texts or ["a short one", "a somewhat longer sentence to classify, with padding on the other"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    got = OnnxClassifier(path, labels)(enc["input_ids"].numpy(), enc["attention_mask"].numpy())
    diff = float(np.abs(got - ref).max())
    record = {"path": str(path), "labels": labels, "max_abs_logits_diff": diff, "accepted": diff <= atol,
              "same_argmax": bool((got.argmax(-1) == ref.argmax(-1)).all())}
    write_json(out_dir / "metrics.json", record)
    return record
