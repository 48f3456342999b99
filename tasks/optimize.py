"""Stage `optimize`: merge the adapter, export ONNX (fp32), check ONNX Runtime parity
with PyTorch, and build a weight-only INT8 variant with its perplexity change.

Outputs in ``paths.optimize_dir``: ``fp32/model.onnx``, ``int8/model.onnx``,
``metrics.json`` with, per variant, size, perplexity, change vs PyTorch and the gate.

Classification / NER head models are not exported (yet): ``metrics.json`` records
``variants: {}`` and the reason under ``skipped``; register then registers the PyTorch model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneops import finetuned
from tuneops.config import Config
from tuneops.io import dir_size, fresh_dir, read_jsonl, write_json
from tuneops.lm import encode, perplexity, torch_forward
from tuneops.models import load_tokenizer


class LogitsOnly(torch.nn.Module):
    """``(input_ids, attention_mask) -> logits`` without KV cache: the exported signature."""

    def __init__(self, model: Any):
        super().__init__()
        self.inner = model

    def forward(self, input_ids: Any, attention_mask: Any) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def export_onnx(model: Any, path: Path, opset: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[2, 105, 2364, 107, 9259, 106, 107, 105]])
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    torch.onnx.export(LogitsOnly(model).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=True, opset_version=opset,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
                      external_data=True, verbose=False)
    return path


def ort_forward(path: Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(input_ids: Any, attention_mask: Any) -> Any:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return session.run(["logits"], feeds)[0]
    return forward


def max_logits_diff(reference: Any, candidate: Any, features: list[dict[str, list[int]]]) -> float:
    """Max abs logits difference over real tokens, one unpadded sequence at a time."""
    worst = 0.0
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        mask = torch.ones_like(ids)
        ref = np.asarray(reference(ids, mask), dtype=np.float32)
        worst = max(worst, float(np.abs(np.asarray(candidate(ids, mask)) - ref).max()))
    return worst


def untie_transposed_weights(model: Any) -> Any:
    """Fold ``Transpose(initializer) -> MatMul`` into a transposed initializer.

    With tied embeddings the exporter computes the LM head as
    ``MatMul(h, Transpose(embedding))``; quantizers only quantize MatMuls whose weight is
    an initializer, so the largest matrix (vocab x hidden) would stay fp32.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in list(model.graph.node):
        if (node.op_type == "Transpose" and node.input[0] in inits
                and all(c.op_type == "MatMul" for c in consumers.get(node.output[0], []))):
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            weight = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), node.output[0]))
            model.graph.node.remove(node)
    return model


def quantize_embedding_rows(model: Any) -> Any:
    """Store each ``Gather`` table (the token embedding) as int8 rows with one fp32 scale
    per row (symmetric), dequantized by a ``DequantizeLinear(axis=0)`` in front of the Gather."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        name = node.input[0]
        table = numpy_helper.to_array(inits[name]).astype(np.float32)
        scale = np.maximum(np.abs(table).max(axis=1), 1e-12) / 127.0
        q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                        numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")])
        index = list(model.graph.node).index(node)
        model.graph.node.insert(index, helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale"], [name],
                                                        axis=0, name=f"{name}_dequantize"))
    return model


def quantize_int8(src: Path, dst: Path, block_size: int) -> Path:
    """Weight-only INT8: every MatMul weight (the untied LM head included) becomes an
    8-bit ``MatMulNBits`` (symmetric, ``block_size`` values per scale; activations stay
    fp32), and the embedding table int8 per row. Measured on Gemma 3 270M: dynamic INT8
    (int8 activations) doubled perplexity; weight-only INT8 left it unchanged."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = quantize_embedding_rows(untie_transposed_weights(onnx.load(str(src))))
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    dst.parent.mkdir(parents=True, exist_ok=True)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst


HEAD_SKIP = ("ONNX export of {head} models is not implemented in this stage yet: no ONNX variants; "
             "register registers the PyTorch model")


def run(cfg: Config) -> dict[str, Any]:
    from tuneops.io import read_json
    from tuneops.training.heads import is_head

    info = read_json(cfg.path("train_dir") / "metrics.json")
    if is_head(finetuned.head_plan(info)):
        out = fresh_dir(cfg.path("optimize_dir"))
        metrics = {"task_head": info["task_head"], "variants": {}, "default_variant": None,
                   "skipped": HEAD_SKIP.format(head=info["task_head"])}
        write_json(out / "metrics.json", metrics)
        return {"optimize_dir": str(out), **metrics}
    o = cfg.optimize
    base_dir, out = cfg.path("base_model_dir"), fresh_dir(cfg.path("optimize_dir"))
    tokenizer = load_tokenizer(base_dir)
    features = encode(read_jsonl(cfg.path("clean_eval_data")), tokenizer, cfg.model.max_seq_len)
    ppl_set, pad = features[: o.ppl_samples], tokenizer.pad_token_id

    model = finetuned.load(base_dir, cfg.path("train_dir"), merge=True).eval()
    reference = torch_forward(model)
    torch_ppl = perplexity(reference, ppl_set, o.batch_size, pad)["perplexity"]
    fp32 = export_onnx(model, out / "fp32" / "model.onnx", o.opset)
    fp32_forward = ort_forward(fp32)
    parity = max_logits_diff(reference, fp32_forward, features[: o.parity_samples])
    del model

    variants: dict[str, dict[str, Any]] = {}
    fp32_ppl = perplexity(fp32_forward, ppl_set, o.batch_size, pad)["perplexity"]
    variants["fp32"] = {"path": str(fp32.relative_to(out)), "size_bytes": dir_size(fp32.parent),
                        "perplexity": fp32_ppl, "max_abs_logits_diff": parity,
                        "accepted": parity <= o.parity_atol, "gate": f"max abs logits diff <= {o.parity_atol}"}
    if o.int8:
        int8 = quantize_int8(fp32, out / "int8" / "model.onnx", o.int8_block_size)
        ppl = perplexity(ort_forward(int8), ppl_set, o.batch_size, pad)["perplexity"]
        change = 100.0 * (ppl / torch_ppl - 1.0)
        variants["int8"] = {"path": str(int8.relative_to(out)), "size_bytes": dir_size(int8.parent),
                            "perplexity": ppl, "perplexity_change_pct": change,
                            "size_ratio": dir_size(int8.parent) / variants["fp32"]["size_bytes"],
                            "accepted": change <= o.max_int8_ppl_increase_pct,
                            "gate": f"perplexity change <= {o.max_int8_ppl_increase_pct}%"}
    accepted = [n for n in ("int8", "fp32") if n in variants and variants[n]["accepted"]]
    metrics = {"torch_perplexity": torch_ppl, "ppl_samples": len(ppl_set), "parity_samples": o.parity_samples,
               "variants": variants, "default_variant": accepted[0] if accepted else None}
    write_json(out / "metrics.json", metrics)
    return {"optimize_dir": str(out), **metrics}
