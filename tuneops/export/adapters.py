"""LoRA adapters served unmerged over one shared base graph, and the base quantizer that training
(method ``qat_int4``, ``tuneops/training/methods.py``) and this export share: one definition.

**The base quantizer** (``BaseQuant``; ``BASE_QUANTS`` by name). ``int4``: every linear of the
decoder blocks asymmetric 4-bit, one fp32 scale and one fp32 zero point per block of 32 input
weights (``quantize_asym``: min-max; ``dequantize_asym``: ``(q - zero) * scale``), stored as
``MatMulNBits`` with exactly those codes, scales and zero points; the LM head (and with it a tied
embedding) 8-bit symmetric round to nearest (``calibrated.round_to_nearest``), which the embedding
lookup shares (``passes.share_tied_embedding``). ``fp32``: no quantization (an adapter trained in
fp32 is served over the fp32 base). SmolLM2's bundled linears were dequantized from a Q4_1 GGUF:
every block of 32 weights holds at most 16 values of one affine grid, so ``int4`` represents them
as they are (to float rounding); training against it (``fake_quantize``) gives an adapter that is
served over exactly the weights it saw.

**The base graph** (``export_base``): the base model with its weights replaced by the quantizer's
(``fake_quantize``), exported once (the optimize stage's exporter: onnxruntime-genai's builder or
``torch.onnx``), its ``MatMul`` weights found by fingerprint and rewritten as ``MatMulNBits`` from
the codes, and a LoRA *slot* on every decoder ``MatMul``: ``y = MatMulNBits(x) + (x @ A) @ B`` with
``A`` ``[K, r]`` and ``B`` ``[r, N]`` graph inputs (``<slot>.lora_A`` / ``.lora_B``, any rank; their
default is a rank-1 zero, so the base alone runs too). A ``MatMul`` the builder fused (q/k/v) is one
slot with several members: an adapter's ``A`` is its members' ``A`` side by side and ``B`` their
``B`` block-diagonal at each member's output columns. ``base.json`` beside the graph names it:
``md5`` (graph + weights), ``quant``, ``model`` and the slots.

**The adapter** (``export_adapter``): a peft LoRA adapter as an ONNX Runtime adapter file
(``adapter.onnx_adapter``, ``onnxruntime.AdapterFormat``: the slots' ``A``/``B``, LoRA's scaling
folded into ``B``) and ``adapter.json`` naming the base it needs (md5, quant, model).
``OnnxCausalLM(base, adapter=...)`` refuses an adapter whose base differs (``BaseMismatch``, naming
both) and activates it per call (``RunOptions.add_active_adapter``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import calibrated

ADAPTER_FILE = "adapter.onnx_adapter"
ADAPTER_JSON = "adapter.json"
BASE_JSON = "base.json"


@dataclass(frozen=True)
class BaseQuant:
    """How the shared base graph stores the frozen weights (``bits=0``: not quantized)."""

    name: str
    bits: int = 4                 # decoder-block linears: asymmetric, fp32 scale + zero point per block
    block_size: int = 32
    head_bits: int = 8            # the LM head (+ a tied embedding): symmetric round to nearest
    head_block: int = 128         # its block (halved until it divides the hidden size)

    @property
    def id(self) -> str:
        if not self.bits:
            return self.name
        return f"{self.name}(asym{self.bits} block {self.block_size}, head sym{self.head_bits} block {self.head_block})"


BASE_QUANTS: dict[str, BaseQuant] = {q.name: q for q in (BaseQuant("fp32", bits=0), BaseQuant("int4"))}


def base_quant(name: str) -> BaseQuant:
    if name not in BASE_QUANTS:
        raise ValueError(f"unknown base quantization {name!r}; known: {sorted(BASE_QUANTS)} (tuneops/export/adapters.py)")
    return BASE_QUANTS[name]


class BaseMismatch(ValueError):
    """An adapter whose base graph is not the one offered (another model or another quantization)."""


# -- the quantizer (training and export) -------------------------------------------------------

def quantize_asym(weight: Any, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric min-max quantization of ``weight`` ``[N, K]``, one scale and zero point per block
    of ``block_size`` consecutive inputs. Returns ``(q, scales, zero_points)``: ``q`` uint8 ``[N, K]``
    in ``0 .. 2**bits - 1``, ``scales`` and ``zero_points`` fp32 ``[N, K / block]``; the weight is
    ``(q - zero) * scale`` (``dequantize_asym``). A block on an affine grid of ``2**bits`` levels
    spanning its min and max (a Q4_1 block) is represented as it is."""
    w = weight.detach().to("cpu").float().numpy() if hasattr(weight, "detach") else np.asarray(weight, np.float32)
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"quantize_asym: {k} inputs are not a multiple of the block size {block_size}")
    blocks = w.reshape(n, k // block_size, block_size)
    lo, hi = blocks.min(-1), blocks.max(-1)
    levels = np.float32(2 ** bits - 1)
    scales = ((hi - lo) / levels).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)   # a constant block: any scale
    zero = (-lo / scales).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[..., None]) / scales[..., None]), 0, levels).astype(np.uint8)
    return q.reshape(n, k), scales, zero


def dequantize_asym(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int) -> np.ndarray:
    """``(q - zero) * scale`` per block, fp32 ``[N, K]`` (what ``MatMulNBits`` computes with zero points)."""
    n, k = q.shape
    x = (q.astype(np.float32).reshape(n, k // block_size, block_size) - zero_points[..., None]) * scales[..., None]
    return x.reshape(n, k).astype(np.float32)


@dataclass
class Codes:
    """One linear's stored weights: ``bits``, codes ``q`` ``[N, K]``, ``scales``, ``zero_points``
    (None: symmetric, the ``calibrated`` layout)."""
    bits: int
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        block = calibrated.block_of(self.q, self.scales)
        if self.zero_points is not None:
            return dequantize_asym(self.q, self.scales, self.zero_points, block)
        return calibrated.dequantize(self.q, self.scales, self.bits, block).numpy()


def base_codes(model: Any, quant: BaseQuant) -> dict[str, Codes]:
    """The stored weights of every linear ``quant`` quantizes, by module name: the decoder blocks'
    linears (``bits``, asymmetric) and the LM head (``head_bits``, symmetric)."""
    if not quant.bits:
        return {}
    codes: dict[str, Codes] = {}
    for unit, members in calibrated.linear_units(model).items():
        for name, m in members:
            if unit == "lm_head":
                if m.in_features % quant.block_size == 0:
                    block = calibrated.wide_block(m.in_features, quant.block_size, quant.head_block)
                    codes[name] = Codes(quant.head_bits, *calibrated.round_to_nearest(m.weight, quant.head_bits, block),
                                        None)
            elif m.in_features % quant.block_size == 0:
                codes[name] = Codes(quant.bits, *quantize_asym(m.weight, quant.bits, quant.block_size))
    return codes


def fake_quantize(model: Any, quant: BaseQuant) -> dict[str, Codes]:
    """Replace the weights ``quant`` stores quantized by their dequantized values (in place, fp32 or
    the model's dtype): the forward then computes with exactly the base the export writes (a tied
    embedding is the LM head's table: it gets the head's values, as the graph's shared lookup does).
    Returns the codes (``base_codes``)."""
    import torch

    codes = base_codes(model, quant)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, c in codes.items():
            w = modules[name].weight
            w.data.copy_(torch.from_numpy(c.dequantize()).to(w.dtype))
    return codes


# -- the base graph ----------------------------------------------------------------------------

def _md5(paths: list[Path]) -> str:
    h = hashlib.md5()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def graph_md5(path: Path) -> str:
    """md5 of a graph and its external data (the files ``<name>*`` beside it)."""
    return _md5(sorted(f for f in path.parent.iterdir() if f.is_file() and f.name.startswith(path.name)))


def model_md5(model_dir: Path) -> str:
    """md5 of a Hugging Face model folder's weights and config (the base a graph is built from)."""
    files = sorted(f for f in Path(model_dir).iterdir()
                   if f.suffix in (".safetensors", ".bin") or f.name == "config.json")
    return _md5(files)


def _slot_groups(model: Any) -> dict[str, list[str]]:
    """Fingerprint of each decoder-block ``MatMul`` an exporter may build -> its member linears (in
    output-column order): each linear alone, and runs of 2-3 consecutive linears of one layer that
    read the same input (a fused q/k/v or gate/up ``MatMul``)."""
    import torch

    groups: dict[str, list[str]] = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer in model.get_decoder().layers:
        lins = [(names[id(m)], m) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        for n, m in lins:
            groups[calibrated.fingerprint(m.weight.detach().T.numpy())] = [n]
        for size in (2, 3):
            for i in range(len(lins) - size + 1):
                run = lins[i:i + size]
                if len({m.in_features for _, m in run}) == 1:
                    groups[calibrated.fused_fingerprint([m.weight for _, m in run])] = [n for n, _ in run]
    return groups


def _rewrite(model_proto: Any, model: Any, codes: dict[str, Codes], accuracy_level: int | None) -> dict[str, Any]:
    """MatMuls -> MatMulNBits from ``codes`` (by fingerprint), then a LoRA slot on each decoder
    MatMul. Returns the slots: ``{slot: {"in": K, "members": [[module, column, width], ...]}}``."""
    from onnx import TensorProto, helper, numpy_helper

    groups = _slot_groups(model)
    modules = dict(model.named_modules())
    inits = {i.name: i for i in model_proto.graph.initializer}
    slots: dict[str, Any] = {}
    targets: dict[str, tuple[str, str]] = {}          # MatMul output -> (its input, slot name)
    for node in model_proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        B = numpy_helper.to_array(inits[node.input[1]])
        members = groups.get(calibrated.fingerprint(B)) if B.ndim == 2 else None
        if not members:
            continue
        slot = members[0] if len(members) == 1 else "+".join(members)
        col, cols = 0, []
        for n in members:
            cols.append([n, col, modules[n].out_features])
            col += modules[n].out_features
        slots[slot] = {"in": int(B.shape[0]), "members": cols}
        targets[node.output[0]] = (node.input[0], slot)
    plan = calibrated.Plan(block_size=0)
    for n, c in codes.items():
        key = calibrated.fingerprint(modules[n].weight.detach().T.numpy())
        plan.weights[key] = (c.bits, c.q, c.scales)
        if c.zero_points is not None:
            plan.zero_points[key] = c.zero_points
    for members in groups.values():
        if len(members) > 1 and all(n in codes for n in members) and len({codes[n].bits for n in members}) == 1:
            key = calibrated.fused_fingerprint([modules[n].weight for n in members])
            plan.weights[key] = (codes[members[0]].bits, np.concatenate([codes[n].q for n in members]),
                                 np.concatenate([codes[n].scales for n in members]))
            if codes[members[0]].zero_points is not None:
                plan.zero_points[key] = np.concatenate([codes[n].zero_points for n in members])
    counts = calibrated.apply(model_proto, plan, accuracy_level) if codes else {}
    nodes = []
    for node in model_proto.graph.node:
        nodes.append(node)
        if node.output and node.output[0] in targets:
            x, slot = targets[node.output[0]]
            y = node.output[0]
            node.output[0] = f"{y}_base"
            a, b = f"{slot}.lora_A", f"{slot}.lora_B"
            k, n = slots[slot]["in"], sum(w for _, _, w in slots[slot]["members"])
            rank = f"{slot}.lora_rank"           # one dimension per slot: adapters train some slots only
            model_proto.graph.input.extend([helper.make_tensor_value_info(a, TensorProto.FLOAT, [k, rank]),
                                            helper.make_tensor_value_info(b, TensorProto.FLOAT, [rank, n])])
            model_proto.graph.initializer.extend([numpy_helper.from_array(np.zeros((k, 1), np.float32), a),
                                                  numpy_helper.from_array(np.zeros((1, n), np.float32), b)])
            nodes += [helper.make_node("MatMul", [x, a], [f"{y}_lora_down"], name=f"{slot}_lora_down"),
                      helper.make_node("MatMul", [f"{y}_lora_down", b], [f"{y}_lora_up"], name=f"{slot}_lora_up"),
                      helper.make_node("Add", [f"{y}_base", f"{y}_lora_up"], [y], name=f"{slot}_lora_add")]
    model_proto.graph.ClearField("node")
    model_proto.graph.node.extend(nodes)
    return {"slots": slots, "matmuls": counts}


def export_base(base_dir: Path, out_dir: Path, quant: BaseQuant, how: str = "torch", opset: int = 20,
                accuracy_level: int | None = None, model_name: str = "") -> dict[str, Any]:
    """The base graph for ``quant`` with LoRA slots at ``out_dir/model.onnx`` (+ ``base.json``, the
    tokenizer); ``how``: ``builder`` (onnxruntime-genai's, from the quantized weights' folder) or
    ``torch``. Returns ``base.json``."""
    import onnx
    import torch

    from tuneops.models import load_causal_lm, load_tokenizer

    from . import exporter
    from .passes import fresh, quantize_embedding_rows, share_tied_embedding, untie_transposed_weights

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    scratch = out_dir / "scratch"
    model = load_causal_lm(base_dir).eval()
    tokenizer = load_tokenizer(base_dir)
    codes = fake_quantize(model, quant)
    raw = scratch / "fp32" / "model.onnx"
    with torch.inference_mode():
        if how == "builder":
            exporter.export_builder(exporter.save_merged(model, tokenizer, scratch / "merged"), raw)
        else:
            exporter.export_causal_lm(model, raw, opset)
    proto = untie_transposed_weights(onnx.load(str(raw)))
    facts = _rewrite(proto, model, codes, accuracy_level)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if codes and tied and not share_tied_embedding(proto, tied=True):
        quantize_embedding_rows(proto)
    dst = out_dir / "model.onnx"
    fresh(dst)
    onnx.save(proto, str(dst), save_as_external_data=True, location=dst.name + ".data")
    if how == "builder":
        exporter.copy_sidecar(raw, dst)
    shutil.rmtree(scratch, ignore_errors=True)
    tokenizer.save_pretrained(str(out_dir))
    gen = Path(base_dir) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out_dir / gen.name)
    info = {"md5": graph_md5(dst), "quant": quant.name, "quant_id": quant.id, "model": model_name,
            "model_md5": model_md5(base_dir), "exporter": how, "accuracy_level": accuracy_level or 0,
            "size_bytes": exporter.graph_size(dst), "matmuls": facts["matmuls"], "slots": facts["slots"]}
    (out_dir / BASE_JSON).write_text(json.dumps(info, indent=1))
    return info


def cached_base(cache_root: Path, base_dir: Path, quant: BaseQuant, how: str, opset: int,
                accuracy_level: int | None, model_name: str) -> tuple[Path, dict[str, Any]]:
    """The base graph for (base model weights, quant, exporter, accuracy level), exported once into
    ``cache_root/<key>/`` and reused by every adapter of that base."""
    key = f"{model_md5(base_dir)[:12]}-{quant.name}-{how}-acc{accuracy_level or 0}"
    folder = Path(cache_root) / key
    if not (folder / BASE_JSON).is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        export_base(base_dir, tmp, quant, how, opset, accuracy_level, model_name)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder / "model.onnx", read_base(folder / "model.onnx")


def read_base(path: Path) -> dict[str, Any]:
    f = Path(path).parent / BASE_JSON
    if not f.is_file():
        raise BaseMismatch(f"{path}: not an adapter base graph (no {BASE_JSON} beside it)")
    return json.loads(f.read_text())


# -- the adapter -------------------------------------------------------------------------------

def _lora_weights(peft_model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{module name in the base model: (A [K, r], B [r, N] with the scaling folded in)}`` of the
    active adapter of a peft LoRA model (DoRA's magnitude is not a low-rank term: refused)."""
    from peft.tuners.lora import LoraLayer

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if getattr(config, "use_dora", False):
        raise ValueError("unmerged export: DoRA's magnitude rescales the merged weight; export it merged")
    if str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"unmerged export: {config.peft_type} adapters are not LoRA; export them merged")
    base = peft_model.get_base_model()
    prefix = {id(m): n for n, m in base.named_modules()}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module in base.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            a = module.lora_A[name].weight.detach().float().T.numpy()                         # [K, r]
            b = (module.lora_B[name].weight.detach().float() * module.scaling[name]).T.numpy()  # [r, N]
            out[prefix[id(module)]] = (np.ascontiguousarray(a), np.ascontiguousarray(b))
    return out


def adapter_params(lora: dict[str, tuple[np.ndarray, np.ndarray]], base: dict[str, Any]) -> dict[str, np.ndarray]:
    """The slot inputs of ``base`` for these LoRA weights: per slot with a trained member, ``A`` its
    trained members' ``A`` side by side and ``B`` their ``B`` at each member's output columns."""
    member_of = {m: slot for slot, s in base["slots"].items() for m, _, _ in s["members"]}
    unknown = sorted(set(lora) - set(member_of))
    if unknown:
        raise BaseMismatch(f"LoRA modules {unknown[:4]} have no slot in the base graph ({base['quant']}, "
                           f"md5 {base['md5']})")
    params: dict[str, np.ndarray] = {}
    for slot, s in base["slots"].items():
        trained = [(m, col, width) for m, col, width in s["members"] if m in lora]
        if not trained:
            continue
        width = sum(w for _, _, w in s["members"])
        A = np.concatenate([lora[m][0] for m, _, _ in trained], axis=1)
        B = np.zeros((A.shape[1], width), np.float32)
        r0 = 0
        for m, col, w in trained:
            r = lora[m][0].shape[1]
            B[r0:r0 + r, col:col + w] = lora[m][1]
            r0 += r
        params[f"{slot}.lora_A"], params[f"{slot}.lora_B"] = A.astype(np.float32), B
    return params


def export_adapter(peft_model: Any, base_path: Path, out_dir: Path, method: str) -> dict[str, Any]:
    """``out_dir/adapter.onnx_adapter`` + ``adapter.json`` (the base graph it needs) for a peft LoRA
    model over the base at ``base_path``."""
    import onnxruntime as ort

    base = read_base(base_path)
    params = adapter_params(_lora_weights(peft_model), base)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(out_dir / ADAPTER_FILE))
    info = {"method": method, "base": {k: base[k] for k in ("md5", "quant", "quant_id", "model", "model_md5")},
            "params": len(params), "size_bytes": (out_dir / ADAPTER_FILE).stat().st_size}
    (out_dir / ADAPTER_JSON).write_text(json.dumps(info, indent=1))
    return info


def describe(base: dict[str, Any]) -> str:
    return f"{base.get('model') or 'model'} {base['quant']} base graph md5 {base['md5']}"


def check_base(adapter_dir: Path, base_path: Path) -> dict[str, Any]:
    """The adapter's record, after checking that ``base_path`` is the base graph it needs;
    ``BaseMismatch`` names both otherwise."""
    adapter_dir = Path(adapter_dir)
    f = adapter_dir / ADAPTER_JSON
    if not f.is_file():
        raise BaseMismatch(f"{adapter_dir}: no {ADAPTER_JSON} (not an exported adapter)")
    info = json.loads(f.read_text())
    need, have = info["base"], read_base(base_path)
    if need["md5"] != have["md5"] or need["quant"] != have["quant"]:
        raise BaseMismatch(f"adapter {adapter_dir} needs the {describe(need)}; {base_path} is the {describe(have)}: "
                           f"refused (serve it over its own base)")
    return info
