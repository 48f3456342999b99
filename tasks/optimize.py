"""Stage `optimize`: merge the adapter, export an ONNX causal LM with a KV cache, check
ONNX Runtime parity with PyTorch (full sequence and incremental decoding), optimise the
graph, build the quantized variants the target profiles ask for, gate each variant and
write a coverage report per variant and target.

Outputs in ``paths.optimize_dir``: ``<variant>/model.onnx`` (+ ``.data``),
``<variant>/coverage-<target>.json``, ``metrics.json`` (per variant: size, perplexity,
change vs PyTorch, gate, coverage; ``default_variant`` = the first accepted variant of
``optimize.default_order``, never a rejected one).

Variants (recipes): ``fp32`` (always), ``int8`` / ``int4`` (weight-only 8/4-bit
``MatMulNBits``; a tied embedding reads the LM head's quantized weights),
``int8_dynamic`` (``quantize_dynamic``: int8 weights and activations), ``qdq`` (static
INT8 QDQ from a calibration set drawn from the training data, fixed shape from the
target profile: what Vitis-AI / QNN-class EPs compile; run here on the CPU EP).

Classification / NER head models are not exported (yet): ``metrics.json`` records
``variants: {}`` and the reason under ``skipped``; register then registers the PyTorch model.
"""
from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tuneops import finetuned, log, targets
from tuneops.config import Config
from tuneops.io import dir_size, fresh_dir, read_jsonl, write_json
from tuneops.lm import encode, perplexity, torch_forward
from tuneops.models import load_tokenizer
from tuneops.onnx_lm import OnnxCausalLM

RECIPES = ("fp32", "int8", "int4", "int8_dynamic", "qdq")


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
    no sliding-window truncation: sliding-window layers get their window from the mask),
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
    torch.onnx.export(
        WithPast(model).eval(), (ids, mask, pos, *past), str(path), dynamo=True, opset_version=opset,
        input_names=["input_ids", "attention_mask", "position_ids", *names],
        output_names=["logits", *[n.replace("past_key_values", "present") for n in names]],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: total},
                        "position_ids": {0: batch, 1: seq},
                        "past": tuple({0: batch, 2: past_seq} for _ in range(2 * layers))},
        external_data=True, verbose=False)
    return path


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
    torch.onnx.export(LogitsOnly(model, causal).eval(), (ids, torch.ones_like(ids)), str(path), dynamo=True,
                      opset_version=opset, input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_shapes=dims, external_data=True, verbose=False)
    return path


def optimize_graph(src: Path, dst: Path, model: Any) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (fusions: SimplifiedLayerNormalization /
    SkipSimplifiedLayerNormalization, Gelu, ...; ``model_type='gpt2'``, the decoder family),
    then the graph is saved for the quantizers. Returns the fused-op counts."""
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    original = onnx.load(str(src), load_external_data=False).graph.node
    before = {n.op_type for n in original}
    cfg = model.config
    opt = optimize_model(str(src), model_type="gpt2", num_heads=cfg.num_attention_heads,
                         hidden_size=cfg.hidden_size, opt_level=1, only_onnxruntime=False)
    dst.parent.mkdir(parents=True, exist_ok=True)
    opt.save_model_to_file(str(dst), use_external_data_format=True)
    counts: dict[str, int] = {}
    for node in opt.model.graph.node:
        if node.op_type not in before:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"fused_ops": counts, "nodes_before": len(original), "nodes_after": len(opt.model.graph.node)}


def max_logits_diff(reference: Any, candidate: Any, features: list[dict[str, list[int]]]) -> float:
    """Max abs logits difference over real tokens, one unpadded sequence at a time."""
    worst = 0.0
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        mask = torch.ones_like(ids)
        ref = np.asarray(reference(ids, mask), dtype=np.float32)
        worst = max(worst, float(np.abs(np.asarray(candidate(ids, mask)) - ref).max()))
    return worst


def incremental_diff(lm: OnnxCausalLM, features: list[dict[str, list[int]]], tokens: int) -> float:
    """Max abs difference between full-sequence logits and logits from a prefill followed
    by ``tokens`` one-token steps with the KV cache (both from ONNX Runtime)."""
    worst = 0.0
    for f in features:
        ids = np.array([f["input_ids"]], dtype=np.int64)
        n = ids.shape[1]
        split = max(1, n - tokens)
        full = lm(ids, np.ones_like(ids))
        logits, cache = lm.step(ids[:, :split], np.ones((1, split), np.int64), lm.empty_cache(1))
        parts = [logits]
        for t in range(split, n):
            logits, cache = lm.step(ids[:, t:t + 1], np.ones((1, t + 1), np.int64), cache)
            parts.append(logits)
        worst = max(worst, float(np.abs(np.concatenate(parts, 1) - full).max()))
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
    """Store each large ``Gather`` table (the token embedding) as int8 rows with one fp32
    scale per row (symmetric). The lookup gathers the int8 rows and their scales first and
    dequantizes only those (``Gather -> Cast -> Mul``, standard ops): dequantizing the whole
    table in front of the Gather would rewrite vocab x hidden floats on every call."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        name = node.input[0]
        table = numpy_helper.to_array(inits[name]).astype(np.float32)
        if table.ndim != 2 or table.shape[0] < 1024 or axis != 0:  # the token embedding only
            continue
        scale = np.maximum(np.abs(table).max(axis=1), 1e-12) / 127.0
        q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                                        numpy_helper.from_array(scale.astype(np.float32)[:, None], f"{name}_scale")])
        ids, out, p = node.input[1], node.output[0], f"{name}_rows"
        index = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        for k, n in enumerate([
                helper.make_node("Gather", [f"{name}_int8", ids], [f"{p}_q"], name=f"{p}_gather", axis=0),
                helper.make_node("Gather", [f"{name}_scale", ids], [f"{p}_scale"], name=f"{p}_gather_scale", axis=0),
                helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{p}_f", f"{p}_scale"], [out], name=f"{p}_dequantize")]):
            model.graph.node.insert(index + k, n)
    return model


def share_tied_embedding(model: Any) -> int:
    """Tied embeddings: let the token-embedding ``Gather`` read the LM head's 8/4-bit
    ``MatMulNBits`` weights (``[vocab, hidden/block, block]`` uint8, 4-bit packed two per
    byte; zero point 128 / 8, one scale per block) instead of a second copy of the table:
    gather the rows and their scales, unpack, then ``(q - zero) * scale`` (standard ops). Only when the head's weights
    dequantize to the table (a tied model); returns the number of tables shared."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    heads = []
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" and len(n.input) == 3:  # no zero points: symmetric
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            if a.get("bits") in (4, 8) and n.input[1] in inits and n.input[2] in inits:
                heads.append((n, a))
    shared = 0
    for node in list(model.graph.node):
        if node.op_type != "Gather" or node.input[0] not in inits:
            continue
        table = inits[node.input[0]]
        if len(table.dims) != 2 or table.dims[0] < 1024:
            continue
        vocab, hidden = table.dims
        for head, a in heads:
            if a["N"] != vocab or a["K"] != hidden:
                continue
            block, bits = a["block_size"], a["bits"]
            zero = float(2 ** (bits - 1))
            q = numpy_helper.to_array(inits[head.input[1]])[:64].reshape(64, -1)
            if bits == 4:  # two values per byte, low nibble first
                q = np.stack([q & 15, q >> 4], axis=-1).reshape(64, -1)
            q = q[:, :hidden].astype(np.float32)
            scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, -1)[:64]
            rows = (q - zero).reshape(64, -1, block) * scales[:, :, None]
            ref = numpy_helper.to_array(table)[:64].astype(np.float32)
            if not np.allclose(rows.reshape(64, hidden), ref, atol=float(scales.max()) * 1.01 + 1e-6):
                continue
            p = f"{node.input[0]}_shared"
            model.graph.initializer.append(numpy_helper.from_array(np.array([0, 0, hidden], np.int64), f"{p}_shape"))
            model.graph.initializer.append(numpy_helper.from_array(
                np.array([vocab, hidden // block, 1], np.int64), f"{p}_scale_shape"))
            model.graph.initializer.append(numpy_helper.from_array(np.array(zero, np.float32), f"{p}_zero"))
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            ids = node.input[1]
            unpack = []
            if bits == 4:
                model.graph.initializer.extend([
                    numpy_helper.from_array(np.array(15, np.uint8), f"{p}_mask"),
                    numpy_helper.from_array(np.array(4, np.uint8), f"{p}_four"),
                    numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last"),
                    numpy_helper.from_array(np.array([0, 0, hidden // block, block], np.int64), f"{p}_blocks")])
                unpack = [
                    helper.make_node("Gather", [head.input[1], ids], [f"{p}_packed"], name=f"{p}_gather", axis=0),
                    helper.make_node("BitwiseAnd", [f"{p}_packed", f"{p}_mask"], [f"{p}_lo"], name=f"{p}_lo"),
                    helper.make_node("BitShift", [f"{p}_packed", f"{p}_four"], [f"{p}_hi"], name=f"{p}_hi",
                                     direction="RIGHT"),
                    helper.make_node("Unsqueeze", [f"{p}_lo", f"{p}_last"], [f"{p}_lo1"], name=f"{p}_lo1"),
                    helper.make_node("Unsqueeze", [f"{p}_hi", f"{p}_last"], [f"{p}_hi1"], name=f"{p}_hi1"),
                    helper.make_node("Concat", [f"{p}_lo1", f"{p}_hi1"], [f"{p}_pairs"], name=f"{p}_pairs", axis=-1),
                    helper.make_node("Reshape", [f"{p}_pairs", f"{p}_blocks"], [f"{p}_q"], name=f"{p}_unpack")]
            else:
                unpack = [helper.make_node("Gather", [head.input[1], ids], [f"{p}_q"], name=f"{p}_gather", axis=0)]
            for k, n in enumerate(unpack + [
                    helper.make_node("Reshape", [head.input[2], f"{p}_scale_shape"], [f"{p}_s3"], name=f"{p}_s3"),
                    helper.make_node("Gather", [f"{p}_s3", ids], [f"{p}_s"], name=f"{p}_gather_scale", axis=0),
                    helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=TensorProto.FLOAT),
                    helper.make_node("Sub", [f"{p}_f", f"{p}_zero"], [f"{p}_c"], name=f"{p}_center"),
                    helper.make_node("Mul", [f"{p}_c", f"{p}_s"], [f"{p}_d"], name=f"{p}_dequantize"),
                    helper.make_node("Reshape", [f"{p}_d", f"{p}_shape"], [node.output[0]], name=f"{p}_rows")]):
                model.graph.node.insert(index + k, n)
            model.graph.initializer.remove(table)
            shared += 1
            break
    return shared


def _fresh(dst: Path) -> None:
    """Remove an earlier model at ``dst``: ONNX appends external data to an existing file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for f in (dst, dst.with_name(dst.name + ".data")):
        f.unlink(missing_ok=True)


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int | None = None) -> Path:
    """Weight-only ``MatMulNBits`` (``bits`` = 4 or 8, symmetric, ``block_size`` weights per
    scale; the untied LM head included); the embedding table shares the 8-bit LM head's
    weights when they are tied (``share_tied_embedding``), else is stored int8 per row.
    ``accuracy_level=4`` lets the kernel quantize activations to int8 on the fly (faster
    on CPU); 0/None keeps fp32 activations. Measured on Gemma 3 270M (bench/results):
    weight-only INT8 leaves perplexity unchanged, 4-bit RTN weights raise it by ~40%
    (the accuracy level makes no difference), dynamic INT8 activations everywhere doubled it."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = untie_transposed_weights(onnx.load(str(src)))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    out = quantizer.model.model
    if not share_tied_embedding(out):
        quantize_embedding_rows(out)
    quantizer.model.model = out
    _fresh(dst)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst


HEAD_SKIP = ("ONNX export of {head} models is not implemented in this stage yet: no ONNX variants; "
             "register registers the PyTorch model")


@contextlib.contextmanager
def _untied_copy(src: Path, dst: Path) -> Iterator[Path]:
    """A temporary copy of ``src`` next to ``dst`` with the tied/transposed weights untied (what
    ORT's quantizers need), removed once the quantized ``dst`` is written."""
    import onnx

    tmp = dst.parent / "untied.onnx"
    _fresh(dst)
    _fresh(tmp)
    onnx.save(untie_transposed_weights(onnx.load(str(src))), str(tmp), save_as_external_data=True,
              location="untied.onnx.data")
    yield tmp
    tmp.unlink()
    (dst.parent / "untied.onnx.data").unlink(missing_ok=True)


def quantize_int8_dynamic(src: Path, dst: Path) -> Path:
    """``quantize_dynamic``: int8 per-channel weights, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _untied_copy(src, dst) as tmp:
        quantize_dynamic(str(tmp), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True)
    return dst


class Calibration:
    """``CalibrationDataReader`` over training sequences padded/truncated to a fixed shape."""

    def __init__(self, features: list[dict[str, list[int]]], shape: tuple[int, int], pad_id: int):
        self.batches: list[dict[str, np.ndarray]] = []
        b, s = shape
        for i in range(0, len(features), b):
            ids, mask = np.full((b, s), pad_id, np.int64), np.zeros((b, s), np.int64)
            for r, f in enumerate(features[i:i + b]):
                tok = f["input_ids"][:s]
                ids[r, :len(tok)], mask[r, :len(tok)] = tok, 1
            self.batches.append({"input_ids": ids, "attention_mask": mask})
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)


def quantize_qdq(src: Path, dst: Path, calibration: Calibration, op_types: list[str] | None) -> Path:
    """Static INT8 in QDQ format (uint8 activations, int8 per-channel weights, MinMax
    calibration); ``op_types=None`` quantizes every op ORT can (embedding Gather included)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return calibration.get_next()

    calibration.rewind()
    with _untied_copy(src, dst) as tmp:
        quantize_static(str(tmp), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=True, extra_options={"WeightSymmetric": True})
    return dst


def qdq_ops(op_types: list[str]) -> list[str] | None:
    return None if list(op_types) == ["all"] else list(op_types)


def choose_default(variants: dict[str, dict[str, Any]], order: list[str]) -> str | None:
    """The first variant of ``order`` that was built and accepted; never a rejected one."""
    return next((n for n in order if n in variants and variants[n]["accepted"]), None)


def score(forward: Any, features: list[dict[str, list[int]]], batch_size: int, pad_id: int) -> dict[str, Any]:
    """Perplexity over assistant tokens and the top-1 (argmax) prediction at each of them."""
    import math

    from tuneops.chat import IGNORE_INDEX
    from tuneops.lm import batches, nll

    total, count, top1 = 0.0, 0, []
    for batch in batches(features, batch_size, pad_id):
        logits = forward(batch["input_ids"], batch["attention_mask"])
        s, n = nll(logits, batch["labels"])
        total, count = total + s, count + n
        labels = np.asarray(batch["labels"])[:, 1:]
        top1.append(np.asarray(logits)[:, :-1].argmax(-1)[labels != IGNORE_INDEX])
    loss = total / max(count, 1)
    return {"perplexity": math.exp(min(loss, 50.0)), "top1": np.concatenate(top1) if top1 else np.zeros(0)}


def gate_quantized(name: str, candidate: dict[str, Any], reference: dict[str, Any], max_change: dict[str, float],
                   min_agreement: dict[str, float]) -> dict[str, Any]:
    """A quantized variant must match the PyTorch model: perplexity within +-max_change %
    (a large drop is a deviation too, not a gain) and the same top-1 next token at
    >= min_agreement of the scored positions."""
    change = 100.0 * (candidate["perplexity"] / reference["perplexity"] - 1.0)
    agreement = float((candidate["top1"] == reference["top1"]).mean()) if len(reference["top1"]) else 0.0
    limit, floor = max_change[name], min_agreement[name]
    ok = bool(np.isfinite(change) and abs(change) <= limit and agreement >= floor)
    return {"perplexity": candidate["perplexity"], "perplexity_change_pct": change, "top1_agreement": agreement,
            "accepted": ok, "gate": f"|perplexity change| <= {limit}% and top-1 agreement >= {floor} vs PyTorch"}


def _coverage(path: Path, out: Path, profiles: dict[str, dict[str, Any]], context: int) -> dict[str, Any]:
    reports = {}
    for name, profile in profiles.items():
        report = targets.coverage(path, profile, context)
        write_json(path.parent / f"coverage-{name}.json", report)
        reports[name] = {k: report[k] for k in ("node_share", "matmul_flops_share", "cpu_fallback_ops")}
    return reports


def run(cfg: Config) -> dict[str, Any]:
    from tuneops.io import read_json
    from tuneops.training.heads import is_head

    info = read_json(cfg.path("train_dir") / "metrics.json")
    if is_head(finetuned.head_plan(info)):
        out = fresh_dir(cfg.path("optimize_dir"))
        metrics = {"task_head": info["task_head"], "variants": {}, "default_variant": None,
                   "skipped": HEAD_SKIP.format(head=info["task_head"])}
        write_json(out / "metrics.json", metrics)
        write_json(out / "variants.json", [])
        return {"optimize_dir": str(out), **metrics}
    o = cfg.optimize
    base_dir, out = cfg.path("base_model_dir"), fresh_dir(cfg.path("optimize_dir"))
    profiles = {t: targets.load(t) for t in o.targets}
    wanted = ["fp32"] + [v for t in o.targets for v in profiles[t]["variants"]]
    wanted = list(dict.fromkeys(wanted))
    unknown = [v for v in wanted if v not in RECIPES]
    if unknown:
        raise ValueError(f"target profiles ask for unknown variants {unknown}; known: {list(RECIPES)}")
    unknown = [v for v in wanted if v != "fp32" and not (v in o.max_ppl_change_pct and v in o.min_top1_agreement)]
    if unknown:
        raise ValueError(f"optimize.max_ppl_change_pct / min_top1_agreement have no threshold for {unknown}")

    tokenizer = load_tokenizer(base_dir)
    features = encode(read_jsonl(cfg.path("clean_eval_data")), tokenizer, cfg.model.max_seq_len)
    ppl_set, pad = features[: o.ppl_samples], tokenizer.pad_token_id

    model = finetuned.load(base_dir, cfg.path("train_dir"), merge=True).eval()
    reference = torch_forward(model)
    torch_score = score(reference, ppl_set, o.batch_size, pad)
    torch_ppl = torch_score["perplexity"]
    timings: dict[str, float] = {}
    t = time.perf_counter()
    fp32 = out / "fp32" / "model.onnx"
    with log.step("optimize: ONNX export with KV cache"):
        raw = export_causal_lm(model, out / "export" / "model.onnx" if o.graph_optimization else fp32, o.opset)
    timings["export_s"] = time.perf_counter() - t
    graph: dict[str, Any] = {"optimizer": None}
    if o.graph_optimization:
        graph = {"optimizer": "onnxruntime.transformers (gpt2 fusions)", **optimize_graph(raw, fp32, model)}
    lm = OnnxCausalLM(fp32)
    parity = max_logits_diff(reference, lm, features[: o.parity_samples])
    incremental = incremental_diff(lm, features[: o.parity_samples], o.kv_parity_tokens)
    fixed_shapes = {tuple(p["fixed_shape"].values()) for t, p in profiles.items()
                    if p.get("fixed_shape") and any(v == "qdq" for v in p["variants"])}
    if len(fixed_shapes) > 1:
        raise ValueError(f"targets building qdq need one fixed shape, got {sorted(fixed_shapes)}")
    fixed, shape, fixed_set, torch_fixed = None, (1, 1), ppl_set, torch_score
    if fixed_shapes:
        shape = fixed_shapes.pop()
        fixed = export_logits(model, out / "fp32_fixed" / "model.onnx", o.opset, shape)
        # fixed-shape variants score the same sequences cut to the fixed length, against
        # PyTorch on the same cut sequences
        fixed_set = [{k: v[: shape[1]] for k, v in f.items()} for f in ppl_set]
        torch_fixed = score(reference, fixed_set, o.batch_size, pad)
    del model, reference

    variants: dict[str, dict[str, Any]] = {}
    fp32_size = dir_size(fp32.parent)
    variants["fp32"] = {
        "path": str(fp32.relative_to(out)), "size_bytes": fp32_size,
        "perplexity": perplexity(lm, ppl_set, o.batch_size, pad)["perplexity"],
        "max_abs_logits_diff": parity, "incremental_max_abs_diff": incremental,
        "accepted": parity <= o.parity_atol and incremental <= o.parity_atol,
        "gate": f"max abs logits diff <= {o.parity_atol} (full sequence vs PyTorch, and KV-cache decoding vs full)"}
    del lm
    for i, name in enumerate(wanted[1:], 1):
        log.log.info(f"optimize: variant {name} ({i}/{len(wanted) - 1}): quantize, score, gate ...")
        dst = out / name / "model.onnx"
        t = time.perf_counter()
        if name in ("int8", "int4"):
            bits = 8 if name == "int8" else 4
            quantize_nbits(fp32, dst, bits, o.block_size, o.nbits_accuracy_level)
        elif name == "int8_dynamic":
            quantize_int8_dynamic(fp32, dst)
        else:
            train = encode(read_jsonl(cfg.path("clean_train_data")), tokenizer, cfg.model.max_seq_len)
            calibration = Calibration(train[: o.calibration_samples], shape, pad)
            quantize_qdq(fixed, dst, calibration, qdq_ops(o.qdq_op_types))
        timings[f"{name}_s"] = time.perf_counter() - t
        is_fixed = name == "qdq"
        got = score(OnnxCausalLM(dst), fixed_set if is_fixed else ppl_set, o.batch_size, pad)
        size = dir_size(dst.parent)
        variants[name] = {"path": str(dst.relative_to(out)), "size_bytes": size, "size_ratio": size / fp32_size,
                          **gate_quantized(name, got, torch_fixed if is_fixed else torch_score,
                                           o.max_ppl_change_pct, o.min_top1_agreement)}
        if is_fixed:
            variants[name].update(fixed_shape=list(shape), torch_perplexity_at_fixed_shape=torch_fixed["perplexity"],
                                  calibration_samples=len(calibration.batches) * shape[0])
    context = o.coverage_context
    for name, v in variants.items():
        v["coverage"] = _coverage(out / v["path"], out, profiles, context)
    if fixed is not None:
        shutil.rmtree(fixed.parent)
    if raw != fp32:
        shutil.rmtree(raw.parent, ignore_errors=True)
    metrics = {"torch_perplexity": torch_ppl, "ppl_samples": len(ppl_set), "parity_samples": o.parity_samples,
               "targets": list(o.targets), "graph_optimization": graph, "timings": timings,
               "variants": variants, "default_variant": choose_default(variants, list(o.default_order))}
    write_json(out / "metrics.json", metrics)
    write_json(out / "variants.json", [      # size vs perplexity per variant (the plot dvc.yaml declares)
        {"variant": n, "size_mb": v["size_bytes"] / 1e6, "perplexity": v["perplexity"], "accepted": v["accepted"]}
        for n, v in variants.items()])
    return {"optimize_dir": str(out), **metrics}


def export_classifier(model_dir: Path, out_dir: Path, opset: int, atol: float,
                      texts: list[str] | None = None) -> dict[str, Any]:
    """Export a sequence-classification model with its head (``input_ids``,
    ``attention_mask`` -> ``logits [batch, labels]``), dynamic batch/sequence; copy the
    tokenizer and the label names (``labels.json``) beside it; check parity with PyTorch
    on a padded batch. Returns the parity record (``accepted`` when <= ``atol``)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tuneops.onnx_lm import OnnxClassifier

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
