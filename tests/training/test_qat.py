"""Quantization-aware LoRA (method ``qat_int4``): the base the adapter trains against is exactly the
int4 base graph the export writes (the same codes, blocks, scales and zero points, decoded bit for
bit), the LoRA matrices learn over it, and the planner knows the method."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.family_models import CASES, build_model, build_tokenizer
from tuneops.export import adapters
from tuneops.training import methods

PLAN = {"method": "qat_int4", "precision": "int4+fp32", "task_head": "causal_lm",
        "peft": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qat") / "base"
    tok = build_tokenizer(CASES["llama3"])
    build_model("llama3", tok, head_dim=16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _graph_weights(path: Path) -> list[tuple[str, int, np.ndarray]]:
    """Every ``MatMulNBits`` of a graph, decoded from its stored codes and scales with the op's own
    definition (``(q - 2**(bits-1)) * scale``, no zero points), plus the offsets the graph adds for an
    asymmetric block (``<name>_Q<bits>_offsets``): [N, K]."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n, k, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
        packed = inits[node.input[1]].reshape(n, -1)
        q = np.stack([packed & 15, packed >> 4], -1).reshape(n, -1) if bits == 4 else packed
        q = q[:, :k].astype(np.float32).reshape(n, k // block, block)
        scales = inits[node.input[2]].reshape(n, k // block, 1)
        w = (q - np.float32(2 ** (bits - 1))) * scales
        offsets = node.name.replace(f"_MatMulNBits{bits}", f"_Q{bits}_offsets")    # an asymmetric block's
        if offsets in inits:                                     # offset, added by blocksum(x) @ offsets
            w = w + inits[offsets].T.reshape(n, k // block, 1)
        out.append((node.name, bits, w.reshape(n, k).astype(np.float32)))
    return out


def test_the_trained_base_is_the_exported_int4_graph_bit_for_bit(base_dir, tmp_path):
    model = methods.build(base_dir, PLAN)
    base = model.get_base_model()
    adapters.export_base(base_dir, tmp_path / "g", adapters.base_quant("int4"), how="builder")
    graph = _graph_weights(tmp_path / "g" / "model.onnx")
    # the candidates: each linear's weight as training computes with it, and fused q/k/v rows
    lin = {n.removesuffix(".base_layer"): m.weight.detach().numpy() for n, m in base.named_modules()
           if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    layers = sorted({n.split(".self_attn")[0] for n in lin if ".self_attn." in n})
    fused = {f"{p}.qkv": np.concatenate([lin[f"{p}.self_attn.{x}_proj"] for x in "qkv"]) for p in layers}
    candidates = {**lin, **fused}
    matched = {}
    for name, bits, w in graph:
        hits = [c for c, ref in candidates.items() if ref.shape == w.shape and np.array_equal(ref, w)]
        assert hits, f"{name}: its decoded weights are not any linear's training weights"
        matched[hits[0]] = bits
    assert matched.pop("lm_head") == 8
    assert set(matched.values()) == {4}
    decoder = {n for n in lin if n != "lm_head"}
    covered = {n for n in matched if n in lin} | {f"{p}.self_attn.{x}_proj" for p in layers if f"{p}.qkv" in matched
                                                  for x in "qkv"}
    assert covered == decoder
    # and the weights really are quantized: at most 16 values per block of 32
    w = lin[f"{layers[0]}.mlp.down_proj"]
    assert max(len(np.unique(b)) for b in w.reshape(-1, 32)) <= 16


def test_lora_learns_over_the_frozen_int4_base(base_dir):
    model = methods.build(base_dir, PLAN)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[5, 9, 17, 33, 40, 51, 60, 71]])
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_the_planner_knows_the_method():
    """Its precision names the base quantization; its memory and time are LoRA's (the base is held
    dequantized in the compute dtype, quantized once at load)."""
    from tuneops.planner import Goals, Hardware, ModelSpec, make_plan

    model = ModelSpec.from_path(Path(__file__).parents[1] / "fixtures" / "model_configs" / "gemma3-270m.json")
    cpu = Hardware(gpus=0, host_ram_gb=24.0, nodes=1, cpu_cores=2)
    plans = {m: make_plan(model, cpu, 256, Goals(method=m, allowed_methods=(m,))) for m in ("qat_int4", "lora")}
    qat, lora = (plans[m].to_dict() if hasattr(plans[m], "to_dict") else vars(plans[m]) for m in ("qat_int4", "lora"))
    assert qat["method"] == "qat_int4" and qat["precision"] == "int4+fp32"
    assert methods.compute_precision(qat) == "fp32"
    assert qat["predicted_peak_gb_per_device"] == lora["predicted_peak_gb_per_device"]
    assert qat["breakdown"] == lora["breakdown"]
