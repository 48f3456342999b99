"""Target profiles (``tuneops/targets/<name>.yaml``: the operators and data types a target
executes, the variants to build for it, fixed shapes) and the coverage report of an ONNX
graph against a profile: share of nodes and of MatMul FLOPs the target executes, and the
operators that would fall back to the CPU execution provider.

Coverage is a static reading of the graph against the profile: it never claims that a
model runs on the target.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
MATMUL_OPS = {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul",
              "MatMulIntegerToFloat", "FusedMatMul"}
QUANTIZED = {"int8", "uint8", "int16", "uint16", "int4", "uint4"}
# Ops that only compute shapes / indices on int64 tensors: a compiler folds them.
SHAPE_TYPES = {"int64", "int32", "bool"}


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    path = HERE / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown target profile {name!r}; known: {', '.join(names())}")
    profile = yaml.safe_load(path.read_text())
    for key in ("name", "ops", "dtypes", "variants", "execution_provider"):
        if key not in profile:
            raise ValueError(f"target profile {path} lacks {key!r}")
    return profile


def _dims(shape: Any, nominal: dict[str, int]) -> list[int]:
    out = []
    for d in shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        else:
            out.append(int(nominal.get(d.dim_param, 1)))
    return out


def coverage(model_path: Path, profile: dict[str, Any], context: int = 128) -> dict[str, Any]:
    """Coverage of the graph at ``model_path`` by ``profile``.

    MatMul FLOPs are for one decoding step at ``context`` tokens of history (symbolic
    dims: batch 1, sequence 1, past ``context``), or for the fixed shape when the graph
    has one. A node counts as supported when its op is in the profile and its compute
    type is: quantized (a QDQ island: its float inputs come from DequantizeLinear, or a
    quantized op), a type the profile lists, or shape arithmetic (int64/int32/bool).
    """
    import onnx
    from onnx import TensorProto, shape_inference

    model = onnx.load(str(model_path), load_external_data=False)
    try:
        model = shape_inference.infer_shapes(model, data_prop=False)
    except Exception:  # noqa: BLE001 - coverage still works from op types without shapes
        pass
    g = model.graph
    types: dict[str, str] = {}
    shapes: dict[str, Any] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        types[vi.name] = TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else ""
        if t.HasField("shape"):
            shapes[vi.name] = t.shape
    inits = {i.name: i for i in g.initializer}
    for name, init in inits.items():
        types[name] = TensorProto.DataType.Name(init.data_type).lower()
    producer = {o: n for n in g.node for o in n.output}
    nominal = {"batch": 1, "sequence": 1, "past_sequence": context, "total_sequence": context + 1,
               "past_sequence + sequence": context + 1}

    all_ops = profile["ops"] == "*"
    all_types = profile["dtypes"] == "*"
    ops = set() if all_ops else set(profile["ops"])
    dtypes = set() if all_types else set(profile["dtypes"])

    def compute_type(node: Any) -> str:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.op_type in (
                "MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "GatherBlockQuantized"):
            return "int8"
        float_inputs = [i for i in node.input if i and types.get(i, "").startswith(("float", "bfloat"))]
        if float_inputs and all(i in producer and producer[i].op_type == "DequantizeLinear" for i in float_inputs):
            return "int8"
        for i in node.input:
            if i and types.get(i):
                return types[i]
        return ""

    def matmul_flops(node: Any) -> float:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            a = shapes.get(node.input[0])
            rows = 1
            if a is not None:
                d = _dims(a, nominal)
                rows = int(max(1, __import__("math").prod(d[:-1])))
            return 2.0 * rows * attrs.get("K", 0) * attrs.get("N", 0)
        a = shapes.get(node.input[0])
        b_name = node.input[1]
        if b_name in inits:
            b = list(inits[b_name].dims)
        elif b_name in shapes:
            b = _dims(shapes[b_name], nominal)
        else:
            return 0.0
        if a is None or len(b) < 2:
            return 0.0
        ad = _dims(a, nominal)
        import math

        batch = math.prod(ad[:-1])
        k, n = b[-2], b[-1]
        if node.op_type == "Gemm":
            trans_b = next((x.i for x in node.attribute if x.name == "transB"), 0)
            k, n = (b[1], b[0]) if trans_b else (b[0], b[1])
        extra = math.prod(b[:-2]) if len(b) > 2 and len(ad) <= 2 else 1
        return 2.0 * batch * k * n * extra

    total = Counter()
    unsupported = Counter()
    flops_total = flops_supported = 0.0
    for node in g.node:
        total[node.op_type] += 1
        ctype = compute_type(node)
        ok = (all_ops or node.op_type in ops) and (
            all_types or ctype in dtypes or ctype in SHAPE_TYPES or ctype == "")
        if not ok:
            unsupported[node.op_type] += 1
        if node.op_type in MATMUL_OPS:
            f = matmul_flops(node)
            flops_total += f
            flops_supported += f if ok else 0.0
    nodes = sum(total.values())
    return {
        "target": profile["name"], "execution_provider": profile["execution_provider"],
        "nodes": nodes, "supported_nodes": nodes - sum(unsupported.values()),
        "node_share": (nodes - sum(unsupported.values())) / max(nodes, 1),
        "matmul_gflops": flops_total / 1e9, "matmul_flops_share": flops_supported / flops_total if flops_total else None,
        "flops_at": "fixed shape" if not any(
            d.HasField("dim_param") for i in g.input for d in i.type.tensor_type.shape.dim) else
        f"one decoding step, {context} tokens of context",
        "cpu_fallback_ops": dict(sorted(unsupported.items(), key=lambda kv: -kv[1])),
        "op_counts": dict(sorted(total.items(), key=lambda kv: -kv[1])),
    }
