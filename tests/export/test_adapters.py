"""LoRA adapters exported unmerged over one shared base graph (``tuneops/export/adapters.py``): the
int4 quantizer represents a Q4_1 grid as it is, the served logits match the PyTorch model (the
fake-quant base + the adapter), one session serves several adapters, and an adapter whose base
differs (another quantization, another model) is refused naming both."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.family_models import CASES, build_model, build_tokenizer
from tuneops.export import adapters
from tuneops.inference.runtimes import OnnxCausalLM

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _base_folder(root: Path, seed: int) -> Path:
    tok = build_tokenizer(CASES["llama3"])
    model = build_model("llama3", tok, seed=seed, head_dim=16)
    folder = root / f"base-{seed}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _peft(base_dir: Path, quant: str, seed: int, targets=TARGETS):
    """A LoRA model over the base as ``quant`` stores it, with random (non-zero) B matrices."""
    from peft import LoraConfig, get_peft_model

    from tuneops.models import load_causal_lm

    model = load_causal_lm(base_dir).eval()
    adapters.fake_quantize(model, adapters.base_quant(quant))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return model.eval()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    b0, b1 = _base_folder(root, 0), _base_folder(root, 1)
    out = {"dir0": b0, "dir1": b1, "root": root}
    for key, folder, quant, how in (("int4", b0, "int4", "builder"), ("fp32", b0, "fp32", "builder"),
                                    ("int4_torch", b0, "int4", "torch"), ("other_int4", b1, "int4", "builder")):
        adapters.export_base(folder, root / key, adapters.base_quant(quant), how=how, model_name=f"tiny-{folder.name}")
        out[key] = root / key / "model.onnx"
    return out


def test_a_q4_1_block_is_stored_as_it_is():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (6, 64)).astype(np.uint8)
    q[:, ::32] = 0                    # llama.cpp's Q4_1: min -> 0, max -> 15 in every block
    q[:, 1::32] = 15
    d = rng.uniform(1e-3, 2e-2, (6, 2)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.2, 0.0, (6, 2)).astype(np.float16).astype(np.float32)
    w = (q.reshape(6, 2, 32) * d[..., None] + m[..., None]).reshape(6, 64).astype(np.float32)
    codes, scales, zero = adapters.quantize_asym(torch.from_numpy(w), 4, 32)
    assert np.array_equal(codes, q)
    back = adapters.dequantize_asym(codes, scales, zero, 32)
    assert np.abs(back - w).max() <= 4 * np.finfo(np.float32).eps * np.abs(w).max()
    # a weight off the grid (a merged LoRA delta) is not: rounding error up to half a step
    off = w + rng.normal(0, 3e-3, w.shape).astype(np.float32)
    c2, s2, z2 = adapters.quantize_asym(torch.from_numpy(off), 4, 32)
    assert np.abs(adapters.dequantize_asym(c2, s2, z2, 32) - off).max() > 1e-4


@pytest.mark.parametrize("key", ["int4", "int4_torch"])
def test_adapter_served_unmerged_matches_pytorch(bases, key, tmp_path):
    from tuneops.export import gate
    from tuneops.inference.scoring import torch_forward

    base = bases[key]
    info = adapters.read_base(base)
    assert info["quant"] == "int4" and info["matmuls"]["4"] > 0 and info["matmuls"]["8"] == 1   # LM head 8-bit
    model = _peft(bases["dir0"], "int4", seed=1)
    record = adapters.export_adapter(model, base, tmp_path / "a", "qat_int4")
    assert record["base"]["md5"] == info["md5"] and record["base"]["quant"] == "int4"
    lm = OnnxCausalLM(base, adapter=tmp_path / "a")
    rows = [{"input_ids": list(range(5, 5 + n))} for n in (7, 12)]
    diff = gate.max_logits_diff(torch_forward(model), lm, rows)
    assert diff <= 1e-3, diff                       # the fp32 gate's tolerance (optimize.parity_atol)
    assert gate.incremental_diff(lm, rows, 4) <= 1e-3
    # the adapter matters (the check above is not the base alone passing)
    with model.disable_adapter():
        base_only = gate.max_logits_diff(torch_forward(model), lm, rows)
    assert base_only > 1e-2, base_only


def test_one_session_serves_several_adapters(bases, tmp_path):
    from tuneops.export import gate
    from tuneops.inference.scoring import torch_forward

    rows = [{"input_ids": list(range(9, 20))}]
    m1, m2 = _peft(bases["dir0"], "int4", seed=1), _peft(bases["dir0"], "int4", seed=2, targets=["o_proj", "up_proj"])
    adapters.export_adapter(m1, bases["int4"], tmp_path / "a1", "qat_int4")
    adapters.export_adapter(m2, bases["int4"], tmp_path / "a2", "qat_int4")
    lm1 = OnnxCausalLM(bases["int4"], adapter=tmp_path / "a1")
    lm2 = lm1.with_adapter(tmp_path / "a2")
    assert lm2.session is lm1.session
    assert gate.max_logits_diff(torch_forward(m1), lm1, rows) <= 1e-3
    assert gate.max_logits_diff(torch_forward(m2), lm2, rows) <= 1e-3
    assert gate.max_logits_diff(torch_forward(m1), lm2, rows) > 1e-2


def test_an_adapter_for_another_base_is_refused_naming_both(bases, tmp_path):
    model = _peft(bases["dir0"], "int4", seed=1)
    adapters.export_adapter(model, bases["int4"], tmp_path / "a", "qat_int4")
    need = adapters.read_base(bases["int4"])
    for other in ("fp32", "other_int4"):                 # another quantization; another model's int4
        have = adapters.read_base(bases[other])
        with pytest.raises(adapters.BaseMismatch) as err:
            OnnxCausalLM(bases[other], adapter=tmp_path / "a")
        msg = str(err.value)
        assert need["md5"] in msg and have["md5"] in msg and f" {need['quant']} " in msg and f" {have['quant']} " in msg
        assert need["model"] in msg and have["model"] in msg


def test_fp32_adapter_over_the_fp32_base(bases, tmp_path):
    from tuneops.export import gate
    from tuneops.inference.scoring import torch_forward

    model = _peft(bases["dir0"], "fp32", seed=3)
    adapters.export_adapter(model, bases["fp32"], tmp_path / "a", "lora")
    lm = OnnxCausalLM(bases["fp32"], adapter=tmp_path / "a")
    assert gate.max_logits_diff(torch_forward(model), lm, [{"input_ids": list(range(3, 14))}]) <= 1e-3


def test_dora_is_not_exported_unmerged(bases, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tuneops.models import load_causal_lm

    model = get_peft_model(load_causal_lm(bases["dir0"]), LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        adapters.export_adapter(model, bases["fp32"], tmp_path / "a", "dora")


@pytest.mark.pipeline
@pytest.mark.slow     # a whole tiny run with an ONNX export: 23 min under load; the default suite keeps its 40-min budget
def test_the_optimize_stage_exports_a_qat_adapter_unmerged_and_gates_it():
    """select.method=qat_int4 end to end on the tiny model: the optimize stage writes the adapter
    beside the merged variants, over the int4 base graph (built once, cached), and gates it on parity
    with the PyTorch model; the registry's tags name that base."""
    import json

    from tasks import optimize, select, train
    from tasks.register import _adapter_tags
    from tests.conftest import make_project
    from tuneops import stages
    from tuneops.config import load_config

    root = make_project("adapters", ("select.method=qat_int4", "select.allowed_methods=[lora, qat_int4]",
                                       "optimize.targets=[]", "optimize.exporter=builder"))
    cfg = load_config(root / "params.yaml")
    for name in ("model", "ingest", "validate"):
        stages.get(name).load()(cfg)
    select.run(cfg)
    assert json.loads(cfg.path("plan").read_text())["precision"] == "int4+fp32"
    train.run(cfg)
    m = optimize.run(cfg)
    a = m["adapter"]
    assert a["accepted"] and a["max_abs_logits_diff"] <= cfg.optimize.parity_atol, a
    assert a["base"]["quant"] == "int4" and a["base"]["md5"] == adapters.read_base(a["base"]["path"])["md5"]
    folder = cfg.path("optimize_dir") / a["path"]
    assert (folder / adapters.ADAPTER_FILE).is_file()
    # the merged PyTorch model's perplexity and the unmerged int4 graph's agree (same weights, same function)
    assert abs(a["exact_perplexity"] / m["torch_perplexity"] - 1) < 1e-3
    assert a["accuracy_level"] == cfg.optimize.nbits_accuracy_level      # served with the fast int8-activation kernel
    tags = _adapter_tags(m)
    assert tags["adapter.base_md5"] == a["base"]["md5"] and tags["adapter.base_quant"] == "int4"
    # a second run reuses the base graph (exported once per base model and quantization)
    assert optimize.run(cfg)["adapter"]["base"]["path"] == a["base"]["path"]


def test_lora_adapter_base_applies_to_plain_lora_adapters_only():
    """``optimize.adapter_base: auto``: qat_int4 over its int4 base; a plain LoRA adapter over
    ``optimize.lora_adapter_base`` (the jobs API's shared base), none by default; the other methods none."""
    from tuneops.training.methods import spec

    assert adapters.unmerged_quant(spec("lora"), "auto") is None
    assert adapters.unmerged_quant(spec("lora"), "auto", "fp32").name == "fp32"
    assert adapters.unmerged_quant(spec("qat_int4"), "auto", "fp32").name == "int4"
    assert adapters.unmerged_quant(None, "auto", "fp32") is None                  # full fine-tuning: no adapter
    for name in ("dora", "qlora", "ia3"):
        assert adapters.unmerged_quant(spec(name), "auto", "fp32") is None, name
    assert adapters.unmerged_quant(spec("lora"), "none", "fp32") is None
    with pytest.raises(ValueError, match="optimize.adapter_base: fp32: a dora adapter"):
        adapters.unmerged_quant(spec("dora"), "fp32")


def test_the_stage_export_gates_parity_exactly_and_serves_the_fast_kernel(bases, tmp_path):
    """``export_unmerged``: parity with PyTorch over the fp32-activation int4 base (exact), then the adapter
    names the base built at ``accuracy_level`` 4 (int8 activations), gated on its perplexity change;
    a quantized base's asymmetric blocks are symmetric MatMulNBits + offsets (no float zero points,
    which ONNX Runtime runs in a slow reference kernel)."""
    import json

    import onnx

    from tuneops.inference.scoring import torch_forward

    model = _peft(bases["dir0"], "int4", seed=3)
    train_dir = tmp_path / "train"
    model.save_pretrained(train_dir / "adapter")
    (train_dir / "metrics.json").write_text(json.dumps({"method": "qat_int4", "artifact": "adapter"}))
    rows = [{"input_ids": list(range(5, 5 + n)), "attention_mask": [1] * n, "labels": list(range(5, 5 + n))}
            for n in (9, 14, 20)]
    rec = adapters.export_unmerged(bases["dir0"], train_dir, tmp_path / "out", tmp_path / "cache",
                                   adapters.base_quant("int4"), "builder", 17, torch_forward(model), rows[:2], rows,
                                   2, 0, 1e-3, 4, "tiny", accuracy_level=4, max_change_pct=3.0)
    assert rec["max_abs_logits_diff"] <= 1e-3 and rec["incremental_max_abs_diff"] <= 1e-3
    assert rec["accuracy_level"] == 4 and rec["accepted"], rec
    assert abs(rec["perplexity_change_pct"]) <= 3.0 and rec["base"]["md5"] != rec["parity_base_md5"]
    served = adapters.read_base(Path(rec["base"]["path"]))
    assert served["accuracy_level"] == 4 and served["md5"] == rec["base"]["md5"]
    assert json.loads((tmp_path / "out" / "adapter.json").read_text())["base"]["md5"] == served["md5"]
    graph = onnx.load(rec["base"]["path"], load_external_data=False)
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(len(n.input) == 3 for n in nbits)          # no zero points input
    assert any(n.name.endswith("_asym") for n in graph.graph.node)
    strict = adapters.export_unmerged(bases["dir0"], train_dir, tmp_path / "out2", tmp_path / "cache",
                                      adapters.base_quant("int4"), "builder", 17, torch_forward(model), rows[:2], rows,
                                      2, 0, 1e-3, 4, "tiny", accuracy_level=4, max_change_pct=1e-9)
    assert not strict["accepted"]            # a perplexity change beyond the gate rejects the served adapter
