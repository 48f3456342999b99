"""Graph passes over exported ONNX models: ONNX Runtime's transformer fusions, untying the
transposed (tied) LM head so quantizers see it, the embedding table stored once (int8 rows,
or read from the LM head's quantized weights when they are tied), and the rotary cos/sin caches
of fused attention computed from two small factor tables (``factor_rotary_caches``)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def optimize_graph(src: Path, dst: Path, model: Any) -> dict[str, Any]:
    """ONNX Runtime's transformer optimizer (fusions: SimplifiedLayerNormalization /
    SkipSimplifiedLayerNormalization, Gelu, ...; ``model_type='gpt2'``, the decoder family),
    then the graph is saved for the quantizers. Returns the fused-op counts."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("gpt2")
    # the fusions that match a torch.onnx decoder graph; the others (attention, rotary, embedding
    # layer norm, ...) never matched here and were half of the pass's time (py-spy, SmolLM2-135M)
    for name in ("enable_attention", "enable_rotary_embeddings", "enable_embed_layer_norm",
                 "enable_qordered_matmul", "enable_bias_gelu"):
        setattr(options, name, False)
    original = onnx.load(str(src), load_external_data=False).graph.node
    before = {n.op_type for n in original}
    cfg = model.config
    opt = optimize_model(str(src), model_type="gpt2", num_heads=cfg.num_attention_heads,
                         hidden_size=cfg.hidden_size, opt_level=1, only_onnxruntime=False,
                         optimization_options=options)
    dst.parent.mkdir(parents=True, exist_ok=True)
    opt.save_model_to_file(str(dst), use_external_data_format=True)
    counts: dict[str, int] = {}
    for node in opt.model.graph.node:
        if node.op_type not in before:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"fused_ops": counts, "nodes_before": len(original), "nodes_after": len(opt.model.graph.node)}


def untie_transposed_weights(model: Any) -> Any:
    """Fold ``Transpose(initializer) -> MatMul | Gather`` into a transposed initializer.

    With tied embeddings ``torch.onnx`` computes the LM head as ``MatMul(h, Transpose(embedding))``;
    quantizers only quantize MatMuls whose weight is an initializer, so the largest matrix
    (vocab x hidden) would stay fp32. onnxruntime-genai's builder ties the other way round
    (``Gather(Transpose(lm_head), ids)``): the head's fp32 weights would stay beside its quantized
    copy; as its own table, the embedding then shares the quantized head (``share_tied_embedding``).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in list(model.graph.node):
        if (node.op_type == "Transpose" and node.input[0] in inits
                and all(c.op_type in ("MatMul", "Gather") for c in consumers.get(node.output[0], []))):
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


def _dequantized_rows(model: Any, q: str, scales: str, bits: int, block: int, rows: int, hidden: int,
                      ids: str, out: str, p: str) -> list[Any]:
    """Nodes that gather rows ``ids`` of ``MatMulNBits`` weights (``q`` ``[rows, hidden/block,
    block*bits/8]`` uint8, 4-bit packed two per byte, the low nibble first; zero point 2**(bits-1);
    one fp32 scale per block) and dequantize only those: ``(q - zero) * scale`` (standard ops)."""
    from onnx import TensorProto, helper, numpy_helper

    model.graph.initializer.extend([
        numpy_helper.from_array(np.array([0, 0, hidden], np.int64), f"{p}_shape"),
        numpy_helper.from_array(np.array([rows, hidden // block, 1], np.int64), f"{p}_scale_shape"),
        numpy_helper.from_array(np.array(float(2 ** (bits - 1)), np.float32), f"{p}_zero")])
    if bits == 4:
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(15, np.uint8), f"{p}_mask"),
            numpy_helper.from_array(np.array(4, np.uint8), f"{p}_four"),
            numpy_helper.from_array(np.array([-1], np.int64), f"{p}_last"),
            numpy_helper.from_array(np.array([0, 0, hidden // block, block], np.int64), f"{p}_blocks")])
        unpack = [
            helper.make_node("Gather", [q, ids], [f"{p}_packed"], name=f"{p}_gather", axis=0),
            helper.make_node("BitwiseAnd", [f"{p}_packed", f"{p}_mask"], [f"{p}_lo"], name=f"{p}_lo"),
            helper.make_node("BitShift", [f"{p}_packed", f"{p}_four"], [f"{p}_hi"], name=f"{p}_hi",
                             direction="RIGHT"),
            helper.make_node("Unsqueeze", [f"{p}_lo", f"{p}_last"], [f"{p}_lo1"], name=f"{p}_lo1"),
            helper.make_node("Unsqueeze", [f"{p}_hi", f"{p}_last"], [f"{p}_hi1"], name=f"{p}_hi1"),
            helper.make_node("Concat", [f"{p}_lo1", f"{p}_hi1"], [f"{p}_pairs"], name=f"{p}_pairs", axis=-1),
            helper.make_node("Reshape", [f"{p}_pairs", f"{p}_blocks"], [f"{p}_q"], name=f"{p}_unpack")]
    else:
        unpack = [helper.make_node("Gather", [q, ids], [f"{p}_q"], name=f"{p}_gather", axis=0)]
    return unpack + [
        helper.make_node("Reshape", [scales, f"{p}_scale_shape"], [f"{p}_s3"], name=f"{p}_s3"),
        helper.make_node("Gather", [f"{p}_s3", ids], [f"{p}_s"], name=f"{p}_gather_scale", axis=0),
        helper.make_node("Cast", [f"{p}_q"], [f"{p}_f"], name=f"{p}_cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", [f"{p}_f", f"{p}_zero"], [f"{p}_c"], name=f"{p}_center"),
        helper.make_node("Mul", [f"{p}_c", f"{p}_s"], [f"{p}_d"], name=f"{p}_dequantize"),
        helper.make_node("Reshape", [f"{p}_d", f"{p}_shape"], [out], name=f"{p}_rows")]


def _rows_match(inits: dict[str, Any], q: str, scales: str, bits: int, block: int, hidden: int,
                ref: np.ndarray, steps: float) -> bool:
    """Do the first rows of these ``MatMulNBits`` weights dequantize to ``ref`` (within ``steps``
    quantization steps)?"""
    from onnx import numpy_helper

    n = len(ref)
    codes = numpy_helper.to_array(inits[q])[:n].reshape(n, -1)
    if bits == 4:  # two values per byte, low nibble first
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(n, -1)
    codes = codes[:, :hidden].astype(np.float32)
    s = numpy_helper.to_array(inits[scales]).reshape(-1, hidden // block)[:n]
    rows = ((codes - 2 ** (bits - 1)).reshape(n, -1, block) * s[:, :, None]).reshape(n, hidden)
    return bool(np.allclose(rows, ref.astype(np.float32), atol=float(s.max()) * steps + 1e-6))


def _embedding_gathers(model: Any, inits: dict[str, Any]) -> list[Any]:
    """The ``Gather`` nodes reading a large 2-D initializer (the token embedding)."""
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
            and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].dims[0] >= 1024]


def share_tied_embedding(model: Any, tied: bool = False) -> int:
    """Tied embeddings: let the token-embedding ``Gather`` read the LM head's 8/4-bit
    ``MatMulNBits`` weights instead of a second copy of the table (``_dequantized_rows``). Only
    when the head's weights dequantize to the table (a tied model); returns the number of tables
    shared."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    heads = []
    for n in model.graph.node:
        if n.op_type == "MatMulNBits" and len(n.input) == 3:  # no zero points: symmetric
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            if a.get("bits") in (4, 8) and n.input[1] in inits and n.input[2] in inits:
                heads.append((n, a))
    shared = 0
    for node in _embedding_gathers(model, inits):
        table = inits[node.input[0]]
        vocab, hidden = table.dims
        ref = numpy_helper.to_array(table)[:64]
        for head, a in heads:
            if a["N"] != vocab or a["K"] != hidden:
                continue
            # round to nearest: each code within one step of the table; GPTQ (``tied``: the model
            # says the head is the embedding) moves codes further, by design
            if not _rows_match(inits, head.input[1], head.input[2], a["bits"], a["block_size"], hidden,
                               ref, 8.0 if tied else 1.01):
                continue
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            for k, n in enumerate(_dequantized_rows(model, head.input[1], head.input[2], a["bits"], a["block_size"],
                                                    vocab, hidden, node.input[1], node.output[0],
                                                    f"{node.input[0]}_shared")):
                model.graph.node.insert(index + k, n)
            model.graph.initializer.remove(table)
            shared += 1
            break
    return shared


def share_split_embedding(model: Any) -> int:
    """Tied embeddings with an LM head split by rows (``calibrated.apply``: 8-bit rows, 4-bit
    rows, ``Concat``, ``Gather`` back to vocabulary order): the token-embedding ``Gather`` reads
    both parts' codes. The vocab-order table gives each token its column ``c``; the 8-bit part
    holds columns ``< n8``, the 4-bit part the others (row ``c - n8``); both are gathered (clamped
    into range) and ``Where`` picks. Returns the number of tables shared."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    shared = 0
    for order_node in [n for n in model.graph.node if n.op_type == "Gather" and n.input[1] in inits
                       and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "Concat"]:
        parts = [producers.get(x) for x in producers[order_node.input[0]].input]
        if len(parts) != 2 or any(p is None or p.op_type != "MatMulNBits" for p in parts):
            continue
        (m8, a8), (m4, a4) = [(p, {x.name: helper.get_attribute_value(x) for x in p.attribute}) for p in parts]
        order = numpy_helper.to_array(inits[order_node.input[1]])
        n8, hidden, block8, block4 = a8["N"], a8["K"], a8["block_size"], a4["block_size"]
        for node in _embedding_gathers(model, inits):
            table = inits[node.input[0]]
            if list(table.dims) != [len(order), hidden]:
                continue
            ref = numpy_helper.to_array(table)
            by_column = np.argsort(order)                    # the tokens of each part, in its row order
            first8, first4 = by_column[:min(64, n8)], by_column[n8:n8 + 64]
            if not (_rows_match(inits, m8.input[1], m8.input[2], 8, block8, hidden, ref[first8], 8.0)
                    and _rows_match(inits, m4.input[1], m4.input[2], 4, block4, hidden, ref[first4], 8.0)):
                continue
            p, ids = f"{node.input[0]}_split", node.input[1]
            model.graph.initializer.extend([
                numpy_helper.from_array(np.array(n8, order.dtype), f"{p}_n8"),      # the order table's type
                numpy_helper.from_array(np.array(n8 - 1, order.dtype), f"{p}_last8"),
                numpy_helper.from_array(np.array(0, order.dtype), f"{p}_zero_id"),
                numpy_helper.from_array(np.array([-1], np.int64), f"{p}_axis")])
            nodes = [
                helper.make_node("Gather", [order_node.input[1], ids], [f"{p}_col"], name=f"{p}_col", axis=0),
                helper.make_node("Less", [f"{p}_col", f"{p}_n8"], [f"{p}_is8"], name=f"{p}_is8"),
                helper.make_node("Min", [f"{p}_col", f"{p}_last8"], [f"{p}_id8"], name=f"{p}_id8"),
                helper.make_node("Sub", [f"{p}_col", f"{p}_n8"], [f"{p}_col4"], name=f"{p}_col4"),
                helper.make_node("Max", [f"{p}_col4", f"{p}_zero_id"], [f"{p}_id4"], name=f"{p}_id4"),
                *_dequantized_rows(model, m8.input[1], m8.input[2], 8, block8, n8, hidden, f"{p}_id8", f"{p}_e8",
                                   f"{p}8"),
                *_dequantized_rows(model, m4.input[1], m4.input[2], 4, block4, a4["N"], hidden, f"{p}_id4",
                                   f"{p}_e4", f"{p}4"),
                helper.make_node("Unsqueeze", [f"{p}_is8", f"{p}_axis"], [f"{p}_pick"], name=f"{p}_pick"),
                helper.make_node("Where", [f"{p}_pick", f"{p}_e8", f"{p}_e4"], [node.output[0]], name=f"{p}_where")]
            index = list(model.graph.node).index(node)
            model.graph.node.remove(node)
            for k, n in enumerate(nodes):
                model.graph.node.insert(index + k, n)
            model.graph.initializer.remove(table)
            shared += 1
    return shared


def fresh(dst: Path) -> None:
    """Remove an earlier model at ``dst``: ONNX appends external data to an existing file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for f in (dst, dst.with_name(dst.name + ".data")):
        f.unlink(missing_ok=True)


@contextlib.contextmanager
def untied_copy(src: Path, dst: Path) -> Iterator[Path]:
    """A temporary copy of ``src`` next to ``dst`` with the tied/transposed weights untied (what
    ORT's quantizers need), removed once the quantized ``dst`` is written."""
    import onnx

    tmp = dst.parent / "untied.onnx"
    fresh(dst)
    fresh(tmp)
    onnx.save(untie_transposed_weights(onnx.load(str(src))), str(tmp), save_as_external_data=True,
              location="untied.onnx.data")
    yield tmp
    tmp.unlink()
    (dst.parent / "untied.onnx.data").unlink(missing_ok=True)


# -- rotary caches ---------------------------------------------------------------------------------

def _graphs(graph: Any) -> Iterator[Any]:
    """A graph and its subgraphs (``If`` branches, loops), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graphs(g)


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor a graph stores: initializers and constant attributes, subgraphs included."""
    for g in _graphs(graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _array(tensor: Any, folder: Path) -> np.ndarray:
    """One initializer's values, read alone from its external data file (or its raw bytes)."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    ext = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    with open(folder / ext["location"], "rb") as f:
        f.seek(int(ext.get("offset", 0)))
        raw = f.read(int(ext["length"]))
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(tensor.dims)).copy()


def compact_external(model: Any, folder: Path, chunk: int = 1 << 24) -> None:
    """Rewrite the external data files of ``model`` (saved in ``folder``) with only the bytes its
    tensors still reference (streamed: no tensor is held in memory), and point the tensors at
    their new offsets. The graph itself is saved by the caller."""
    import os

    from onnx import TensorProto

    by_file: dict[str, list[Any]] = {}
    for tensor in _tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            ext = {e.key: e for e in tensor.external_data}
            by_file.setdefault(ext["location"].value, []).append(ext)
    for location, entries in by_file.items():
        src, tmp = folder / location, folder / f"{location}.compact"
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            for ext in entries:
                offset, length = int(ext["offset"].value) if "offset" in ext else 0, int(ext["length"].value)
                fout.write(b"\0" * (-fout.tell() % 4096))     # ONNX's page alignment (mmap)
                new_offset = fout.tell()
                fin.seek(offset)
                left = length
                while left:
                    block = fin.read(min(chunk, left))
                    if not block:
                        raise ValueError(f"{src}: external data ends before offset {offset} + {length}")
                    fout.write(block)
                    left -= len(block)
                if "offset" in ext:
                    ext["offset"].value = str(new_offset)
                elif new_offset:
                    raise ValueError(f"{src}: a tensor without an offset after the first")
        os.replace(tmp, src)


ROTARY_BLOCK_KEY = "tuneops.rotary_block"      # graph metadata: the factored caches' block (rows)


def factor_rotary_caches(path: Path, atol: float = 1e-5) -> dict[str, Any]:
    """Replace the cos/sin cache initializers of every ``GroupQueryAttention`` (with rotary) in the
    graph at ``path`` by two small tables each, and compute the rows the call needs from them.

    onnxruntime-genai's builder stores ``cos[p, k] = m cos(p t_k)`` and ``sin[p, k] = m sin(p t_k)``
    for every position ``p`` of the model's context: for Gemma 3 270M (32k positions, head 256, a
    local and a global RoPE base) that is 64 MiB of fp32, which no weight quantizer shrinks: a
    quarter of a 0.2x int4 model. With ``p = i B + j`` (``B`` a power of two near the square root
    of the context) the angle-sum identities give every row from the rows ``i B`` ("high") and
    ``j`` ("low", divided by ``m``)::

        cos[p] = cos_hi[i] cos_lo[j] - sin_hi[i] sin_lo[j]
        sin[p] = sin_hi[i] cos_lo[j] + cos_hi[i] sin_lo[j]

    At run time ``Range(total_sequence_length) -> Div/Mod B -> Gather -> Mul/Sub/Add`` builds the
    ``[total, half]`` caches the attention reads (the same names, so the attention nodes are
    untouched): for Gemma 3 270M 384 rows per table instead of 32,768 (0.75 MiB in all), and
    positions past the context are still refused (the high tables end there, ``Gather`` fails).
    Rows ``p < B`` are the builder's own values; the others agree with the builder's to the fp32
    rounding of the angle both carry (the builder computes ``p t_k`` in fp32: at position 4096,
    2.4e-4; a pair that differs by more than that is left as it is). Standard ops
    only: ``onnxruntime_genai`` runs the graph as before.

    Returns ``{"block", "bytes_before", "bytes_after", "max_abs_diff", "pairs"}``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for x in node.input:
            consumers.setdefault(x, []).append(node)
    pairs: dict[tuple[str, str, str], int] = {}         # (cos, sin, total length) -> first consumer's index
    for index, node in enumerate(graph.node):
        if node.op_type == "GroupQueryAttention" and len(node.input) > 8 and node.input[7] in inits:
            pairs.setdefault((node.input[7], node.input[8], node.input[6]), index)
    info: dict[str, Any] = {"block": None, "bytes_before": 0, "bytes_after": 0, "max_abs_diff": 0.0, "pairs": 0}
    plans = []
    for (cos_name, sin_name, total), index in pairs.items():
        if not all(c.op_type == "GroupQueryAttention" and c.input[6] == total
                   for n in (cos_name, sin_name) for c in consumers[n]):
            continue                                    # read by something else too: left as it is
        cos, sin = _array(inits[cos_name], path.parent), _array(inits[sin_name], path.parent)
        rows = cos.shape[0]
        block = 1 << max(0, int(np.ceil(np.log2(np.sqrt(rows)))))
        scale = float(cos[0, 0])
        if cos.ndim != 2 or sin.shape != cos.shape or rows < 4 * block or scale == 0 or np.any(sin[0] != 0):
            continue
        hi_cos, hi_sin = cos[::block], sin[::block]
        lo_cos, lo_sin = cos[:block] / cos.dtype.type(scale), sin[:block] / sin.dtype.type(scale)
        p = np.arange(rows)
        i, j = p // block, p % block
        got_cos = hi_cos[i] * lo_cos[j] - hi_sin[i] * lo_sin[j]
        got_sin = hi_sin[i] * lo_cos[j] + hi_cos[i] * lo_sin[j]
        diff_rows = np.maximum(np.abs(got_cos - cos).max(1), np.abs(got_sin - sin).max(1))
        # the builder's rows carry fp32 rounding of the angle p t_k (half an ulp: ~6e-8 p t_max), the
        # factored ones the same at i B and j: they may differ by twice that, no more
        rate = float(np.abs(np.arctan2(sin[1], cos[1])).max())
        bound = abs(scale) * (atol + 4 * float(np.finfo(cos.dtype).eps) * rate * p)
        if np.any(diff_rows > bound):
            continue
        diff = float(diff_rows.max())
        plans.append((cos_name, sin_name, total, index, block, (hi_cos, hi_sin, lo_cos, lo_sin)))
        info["max_abs_diff"] = max(info["max_abs_diff"], diff)
        info["bytes_before"] += cos.nbytes + sin.nbytes
        info["bytes_after"] += hi_cos.nbytes * 2 + lo_cos.nbytes * 2
        info["block"] = block
    if not plans:
        return info
    new_nodes: dict[int, list[Any]] = {}
    for k, (cos_name, sin_name, total, index, block, tables) in enumerate(plans):
        tag = f"tuneops_rotary_{k}"
        names = [f"{tag}_{t}" for t in ("hi_cos", "hi_sin", "lo_cos", "lo_sin")]
        for name in (cos_name, sin_name):
            graph.initializer.remove(inits[name])
        graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(t), n) for t, n in zip(tables, names))
        graph.initializer.extend([numpy_helper.from_array(np.array(0, np.int64), f"{tag}_zero"),
                                  numpy_helper.from_array(np.array(1, np.int64), f"{tag}_one"),
                                  numpy_helper.from_array(np.array(block, np.int64), f"{tag}_block"),
                                  numpy_helper.from_array(np.array([], np.int64), f"{tag}_scalar")])
        t = f"{tag}_"
        new_nodes.setdefault(index, []).extend([
            helper.make_node("Cast", [total], [t + "total64"], to=TensorProto.INT64, name=t + "cast"),
            helper.make_node("Reshape", [t + "total64", t + "scalar"], [t + "total"], name=t + "reshape"),
            helper.make_node("Range", [t + "zero", t + "total", t + "one"], [t + "p"], name=t + "range"),
            helper.make_node("Div", [t + "p", t + "block"], [t + "i"], name=t + "div"),
            helper.make_node("Mod", [t + "p", t + "block"], [t + "j"], name=t + "mod"),
            *[helper.make_node("Gather", [n, t + idx], [n + "_rows"], axis=0, name=n + "_gather")
              for n, idx in zip(names, ("i", "i", "j", "j"))],
            helper.make_node("Mul", [names[0] + "_rows", names[2] + "_rows"], [t + "cc"], name=t + "cc"),
            helper.make_node("Mul", [names[1] + "_rows", names[3] + "_rows"], [t + "ss"], name=t + "ss"),
            helper.make_node("Mul", [names[1] + "_rows", names[2] + "_rows"], [t + "sc"], name=t + "sc"),
            helper.make_node("Mul", [names[0] + "_rows", names[3] + "_rows"], [t + "cs"], name=t + "cs"),
            helper.make_node("Sub", [t + "cc", t + "ss"], [cos_name], name=t + "cos"),
            helper.make_node("Add", [t + "sc", t + "cs"], [sin_name], name=t + "sin"),
        ])
    nodes = list(graph.node)
    del graph.node[:]
    for index, node in enumerate(nodes):
        graph.node.extend(new_nodes.get(index, []))
        graph.node.append(node)
    compact_external(model, path.parent)
    helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                   ROTARY_BLOCK_KEY: str(info["block"])})
    onnx.save(model, str(path))
    info["pairs"] = len(plans)
    return info
