"""The calibrated 4-bit recipe (tuneops/export/calibrated.py) and the variant registry, on tiny
random models: GPTQ beats round to nearest on the output error it minimises, the rewritten
MatMulNBits graph computes exactly the weights the plan holds, the mixed-precision plan keeps the
harmful layer in 8-bit within its budget, and unknown variants are clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from .family_models import CASES, build_model, build_tokenizer


def test_gptq_output_error_is_lower_than_round_to_nearest():
    import torch

    from tuneops.export import calibrated

    torch.manual_seed(0)
    weight = torch.randn(64, 256) * 0.05
    x = torch.randn(2048, 256) @ torch.randn(256, 256) * 0.1          # correlated inputs, like activations
    h = x.T @ x / len(x)
    errors = {}
    for name, (q, s) in {"gptq": calibrated.gptq(weight, h, 4, 32),
                         "rtn": calibrated.round_to_nearest(weight, 4, 32)}.items():
        assert q.dtype == np.uint8 and q.max() <= 15 and s.shape == (64, 256 // 32)
        errors[name] = float(((x @ (weight - calibrated.dequantize(q, s, 4, 32)).T) ** 2).mean())
    assert errors["gptq"] < 0.7 * errors["rtn"], errors


def test_packing_is_the_matmulnbits_layout():
    from tuneops.export.calibrated import pack

    q = np.arange(64, dtype=np.uint8).reshape(2, 32) % 16
    packed = pack(q, 4, 32)
    assert packed.shape == (2, 1, 16)
    assert packed[0, 0, 0] == (q[0, 0] | (q[0, 1] << 4))               # even element in the low nibble
    assert pack(q, 8, 16).shape == (2, 2, 16)


@pytest.fixture(scope="module")
def phi3():
    """Phi-3 (fused qkv / gate_up projections, untied LM head): every MatMul is a plan weight."""
    tok = build_tokenizer(CASES["phi3"])
    return build_model("phi3", tok).eval(), tok


def test_rewritten_graph_computes_the_plans_weights(phi3, tmp_path):
    import torch

    from tuneops.export import calibrated, exporter
    from tuneops.onnx_lm import OnnxCausalLM

    model, tok = phi3
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, len(tok), 40).tolist() for _ in range(4)]
    plan = calibrated.calibrate(model, seqs, lambda: 1.0, 32, 0.01, 0.5, 0.1, sensitivity=False)
    fp32 = exporter.export_causal_lm(model, tmp_path / "fp32" / "model.onnx", 20)
    facts = calibrated.write(fp32, tmp_path / "int4" / "model.onnx", plan, accuracy_level=0)
    layers = model.config.num_hidden_layers
    assert facts["matmuls"] == {"4": 4 * layers + 1, "8": 0, "unmatched": 0}   # qkv, o, gate_up, down + head
    with torch.no_grad():                           # the same weights in PyTorch
        for members in calibrated.linear_units(model).values():
            for _, m in members:
                bits, q, s = plan.weights[calibrated.fingerprint(m.weight.detach().T.numpy())]
                m.weight.copy_(calibrated.dequantize(q, s, bits, 32))
        ids = torch.tensor([seqs[0]])
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    got = OnnxCausalLM(tmp_path / "int4" / "model.onnx")(ids.numpy(), np.ones_like(ids.numpy()))
    assert np.abs(got - ref).max() <= 1e-4


def test_mixed_precision_keeps_the_harmful_layer_in_8bit_within_the_budget():
    import torch

    from tuneops.export import calibrated

    tok = build_tokenizer(CASES["llama3"])
    model = build_model("llama3", tok).eval()
    watched = model.model.layers[1].mlp.down_proj
    original = watched.weight.detach().clone()

    def score() -> float:                           # layer 1 in 4-bit costs +50%, anything else nothing
        return 10.0 * (1.5 if not torch.equal(watched.weight, original) else 1.0)

    seqs = [list(range(5, 45))]
    kept = calibrated.calibrate(model, seqs, score, 32, 0.01, 1.0, 0.5)
    report = kept.report()
    assert report["units_8bit"] == ["layer.1"]
    assert report["sensitivity"]["layer.1"]["ppl_change_pct_alone_4bit"] == pytest.approx(50.0)
    assert report["sensitivity"]["layer.0"]["ppl_change_pct_alone_4bit"] == pytest.approx(0.0)
    assert report["calibration_perplexity"]["plan_pytorch"] == pytest.approx(10.0)     # the plan avoids the loss
    assert report["calibration_perplexity"]["all_4bit"] == pytest.approx(15.0)
    assert torch.equal(watched.weight, original)                           # the model is left as it was
    none = calibrated.calibrate(model, seqs, score, 32, 0.01, 1.0, 0.0)    # no 8-bit budget
    assert none.report()["units_8bit"] == []


def test_unknown_variant_and_missing_gate_threshold_are_clear_errors():
    from types import SimpleNamespace

    from tuneops.export.variants import VARIANTS, get, wanted

    with pytest.raises(ValueError, match="unknown ONNX variant 'int3'.*int4_hqq"):
        get("int3")
    o = SimpleNamespace(targets=["cpu"], extra_variants=["int4_hqq"], max_ppl_change_pct={"int8": 3, "int4": 3},
                        min_top1_agreement={"int8": 0.9, "int4": 0.8, "int4_hqq": 0.8})
    profiles = {"cpu": {"variants": ["int8", "int4"]}}
    with pytest.raises(ValueError, match=r"optimize.max_ppl_change_pct: no threshold for variant\(s\) \['int4_hqq'\]"):
        wanted(o, profiles)
    o.max_ppl_change_pct["int4_hqq"] = 10
    assert wanted(o, profiles) == ["fp32", "int8", "int4", "int4_hqq"]
    o.extra_variants.append("int3")
    with pytest.raises(ValueError, match=r"optimize.extra_variants: unknown ONNX variant 'int3'"):
        wanted(o, profiles)
    assert "int8_dynamic" in VARIANTS and "int8_dynamic" not in profiles["cpu"]["variants"]
