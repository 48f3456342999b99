"""LoRA adapters served unmerged over one shared base graph, and the base quantizer that training
(method ``qat_int4``, ``tuneops/training/methods.py``) and this export share: one definition.

**The base quantizer** (``tuneops/export/basequant.py``: ``BaseQuant``; ``BASE_QUANTS`` by name). ``int4``: every linear of the
decoder blocks asymmetric 4-bit, one fp32 scale and one fp32 zero point per block of 32 input
weights (``quantize_asym``: min-max; ``dequantize_asym``: ``(q - zero) * scale``), stored as
``MatMulNBits`` with exactly those codes and scales, symmetric, plus each block's offset
``(2**(bits-1) - zero) * scale`` added as ``blocksum(x) @ offsets`` (ONNX Runtime runs float zero
points in a reference kernel ~100x slower: ``calibrated._nbits_node``); the LM head (and with it a tied
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
from pathlib import Path
from typing import Any

import numpy as np

from . import calibrated
from .basequant import (ADAPTER_FILE, ADAPTER_JSON, BASE_JSON, BASE_QUANTS, BaseMismatch, BaseQuant,  # noqa: F401
                        Codes, base_codes, base_quant, check_base, dequantize_asym, describe, fake_quantize,
                        quantize_asym, read_base)



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


GRAPH_LAYOUT = 2     # the base graph's layout; a cached base of another layout is built again
                     # (2: asymmetric blocks as symmetric MatMulNBits + offsets, not float zero points)


def cached_base(cache_root: Path, base_dir: Path, quant: BaseQuant, how: str, opset: int,
                accuracy_level: int | None, model_name: str) -> tuple[Path, dict[str, Any]]:
    """The base graph for (base model weights, quant, exporter, accuracy level), exported once into
    ``cache_root/<key>/`` and reused by every adapter of that base."""
    key = f"{model_md5(base_dir)[:12]}-{quant.name}-{how}-acc{accuracy_level or 0}-g{GRAPH_LAYOUT}"
    folder = Path(cache_root) / key
    if not (folder / BASE_JSON).is_file():
        tmp = folder.with_name(folder.name + ".tmp")
        export_base(base_dir, tmp, quant, how, opset, accuracy_level, model_name)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder / "model.onnx", read_base(folder / "model.onnx")


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
            "base_path": str(Path(base_path).resolve()),      # where it was on the exporting machine (a hint)
            "params": len(params), "size_bytes": (out_dir / ADAPTER_FILE).stat().st_size}
    (out_dir / ADAPTER_JSON).write_text(json.dumps(info, indent=1))
    return info


# -- the optimize stage ------------------------------------------------------------------------

def unmerged_quant(method: Any, setting: str, lora_setting: str = "none") -> BaseQuant | None:
    """The base quantization an adapter of ``method`` (a ``Method`` spec, None: no adapter) is exported
    unmerged over, for ``optimize.adapter_base``: ``auto`` = the method's own (``qat_int4``: int4), or for
    a plain LoRA adapter ``lora_setting`` (``optimize.lora_adapter_base``: none, or a name; the other
    methods: none), ``none``, or a name. A LoRA-family adapter only (DoRA's magnitude, IA3 and prompt
    tuning are no low-rank term); QLoRA's NF4 base is not a graph base: refused by name."""
    if setting == "none" or method is None:
        return None
    plain_lora = method.trains == "lora" and not (method.dora or method.nf4_base or method.base_quant)
    if setting == "auto":
        if method.base_quant:
            return base_quant(method.base_quant)
        return base_quant(lora_setting) if plain_lora and lora_setting != "none" else None
    if method.trains != "lora" or method.dora or method.nf4_base:
        raise ValueError(f"optimize.adapter_base: {setting}: a {method.name} adapter cannot be served unmerged over "
                         f"a base graph (LoRA and qat_int4 adapters can); set optimize.adapter_base: auto or none")
    if method.base_quant and method.base_quant != setting:
        raise BaseMismatch(f"optimize.adapter_base: {setting}: the {method.name} adapter was trained against the "
                           f"{method.base_quant} base; served over {setting} it would not be the model trained")
    return base_quant(setting)


def export_unmerged(base_dir: Path, train_dir: Path, out_dir: Path, cache_root: Path, quant: BaseQuant, how: str,
                    opset: int, reference: Any, parity_rows: list[dict[str, list[int]]],
                    ppl_rows: list[dict[str, list[int]]], batch_size: int, pad_id: int, atol: float, kv_tokens: int,
                    model_name: str, accuracy_level: int = 0, max_change_pct: float = 0.0) -> dict[str, Any]:
    """The optimize stage's unmerged export: the shared base graph (``cached_base``), the adapter file
    in ``out_dir``, and its gate: served logits vs ``reference`` (the PyTorch model the stage
    exported: for ``qat_int4`` the fake-quant base + the adapter) within ``atol``, full sequence and
    KV-cache decoding, over the base with fp32 activations; its perplexity on the gate's rows.

    A quantized base is served at ``accuracy_level`` (``optimize.nbits_accuracy_level``; 4 = int8
    activations, ONNX Runtime's fast int4 kernel: SmolLM2's int4 base decodes ~7x faster than with
    fp32 activations on an AVX2 CPU): that base is built too, the adapter in ``out_dir`` names it,
    and its perplexity must be within ``max_change_pct`` of the fp32-activation one (the parity-gated
    model), as a quantized variant's is. Returns the record for ``metrics.json``."""
    import time

    from tuneops.inference import finetuned
    from tuneops.inference.runtimes import OnnxCausalLM
    from tuneops.io import read_json

    from . import gate

    t = time.perf_counter()
    base, info = cached_base(cache_root, base_dir, quant, how, opset, None, model_name)
    served_level = accuracy_level if quant.bits else 0
    served, served_info = (base, info) if not served_level else \
        cached_base(cache_root, base_dir, quant, how, opset, served_level, model_name)
    base_s = time.perf_counter() - t
    method = read_json(train_dir / "metrics.json")["method"]
    peft_model = finetuned.load(base_dir, train_dir).eval()
    record = export_adapter(peft_model, base, out_dir, method)
    lm = OnnxCausalLM(base, adapter=out_dir)
    parity = gate.max_logits_diff(reference, lm, parity_rows)
    incremental = gate.incremental_diff(lm, parity_rows, kv_tokens)
    exact_ppl = ppl = gate.score(lm, ppl_rows, batch_size, pad_id)["perplexity"]
    accepted = parity <= atol and incremental <= atol
    rule = f"max abs logits diff <= {atol} vs PyTorch (full sequence and KV-cache decoding)"
    extra: dict[str, Any] = {}
    if served_level:
        del lm
        record = export_adapter(peft_model, served, out_dir, method)       # the same tensors, over the served base
        ppl = gate.score(OnnxCausalLM(served, adapter=out_dir), ppl_rows, batch_size, pad_id)["perplexity"]
        change = 100.0 * (ppl / exact_ppl - 1.0)
        accepted = accepted and abs(change) <= max_change_pct
        rule += (f"; served with accuracy_level {served_level}: |perplexity change| <= {max_change_pct}% vs fp32 "
                 f"activations")
        extra = {"accuracy_level": served_level, "exact_perplexity": exact_ppl, "perplexity_change_pct": change,
                 "parity_base_md5": info["md5"]}
    del peft_model
    return {"path": str(out_dir.name), "base": {**record["base"], "path": str(served)},
            "adapter_size_bytes": record["size_bytes"], "base_size_bytes": served_info["size_bytes"],
            "perplexity": ppl, "max_abs_logits_diff": parity, "incremental_max_abs_diff": incremental,
            "accepted": accepted, "base_build_s": base_s, "gate": rule, **extra}
