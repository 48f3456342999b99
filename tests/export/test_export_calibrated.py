"""The calibrated 4-bit recipe (tuneops/export/calibrated.py) and the variant registry, on tiny
random models: GPTQ beats round to nearest on the output error it minimises, the rewritten
MatMulNBits graph computes exactly the weights the plan holds, the mixed-precision plan keeps the
harmful layer in 8-bit within its budget, and unknown variants are clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from tests.family_models import CASES, build_model, build_tokenizer


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
    from tuneops.inference.runtimes import OnnxCausalLM

    model, tok = phi3
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, len(tok), 40).tolist() for _ in range(4)]
    plan = calibrated.calibrate(model, seqs, lambda: 1.0, 32, 0.01, 0.5, 0.1, sensitivity=False)
    fp32 = exporter.export_causal_lm(model, tmp_path / "fp32" / "model.onnx", 20)
    facts = calibrated.write(fp32, tmp_path / "int4" / "model.onnx", plan, accuracy_level=0)
    layers = model.config.num_hidden_layers
    # qkv, o, gate_up, down + head
    assert facts["matmuls"] == {"4": 4 * layers + 1, "8": 0, "split": 0, "unmatched": 0}
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

    def score() -> float:                           # layer 1 in 4-bit costs +50% (8-bit: within 1% of its
        err = float((watched.weight.detach() - original).abs().max())          # range), anything else nothing
        return 10.0 * (1.5 if err > float(original.abs().max()) / 100 else 1.0)

    seqs = [list(range(5, 45))]
    kept = calibrated.calibrate(model, seqs, score, 32, 0.01, 1.0, 0.5, gate_score=lambda: 2 * score())
    report = kept.report()
    assert report["calibration_perplexity"]["plan_pytorch_gate_rows"] == pytest.approx(20.0)  # the plan's weights
    assert report["units_8bit"] == ["layer.1"]
    assert report["sensitivity"]["layer.1"]["ppl_change_pct_alone_4bit"] == pytest.approx(50.0)
    assert report["sensitivity"]["layer.0"]["ppl_change_pct_alone_4bit"] == pytest.approx(0.0)
    assert report["calibration_perplexity"]["plan_pytorch"] == pytest.approx(10.0)     # the plan avoids the loss
    assert report["calibration_perplexity"]["all_4bit"] == pytest.approx(15.0)
    assert torch.equal(watched.weight, original)                           # the model is left as it was
    none = calibrated.calibrate(model, seqs, score, 32, 0.01, 1.0, 0.0)    # no 8-bit budget
    assert none.report()["units_8bit"] == []


def test_head_rows_the_model_puts_mass_on_score_higher():
    import torch

    from tuneops.export import calibrated

    torch.manual_seed(0)
    weight = torch.randn(512, 64) * 0.02
    weight[:8] = torch.randn(8, 64)                 # rows 0..7: large logits, the probability mass
    hidden = torch.randn(256, 64)
    noise = weight + torch.randn_like(weight) * 0.01    # the same error on every row
    scores = calibrated.head_row_scores(weight, noise, hidden)
    assert scores.shape == (512,)
    assert scores[:8].min() > 10 * np.median(scores[8:])


def test_split_lm_head_graph_computes_the_plans_weights(tmp_path):
    """A tied head whose rows do not all fit in 8 bits: the rows the model puts mass on go 8-bit,
    the graph computes both parts and the embedding reads both (ORT = PyTorch with the plan's
    weights), and the plan's size stays within the budget."""
    import torch

    from tuneops.export import calibrated, exporter
    from tuneops.inference.runtimes import OnnxCausalLM

    tok = build_tokenizer(CASES["llama3"])
    model = build_model("llama3", tok, head_dim=32).eval()     # width 128: 8-bit codes at block 128
    model.resize_token_embeddings(1536)             # a table the embedding passes handle (>= 1024 rows)
    head = model.get_output_embeddings()
    original = head.weight.detach().clone()

    def score() -> float:                           # the head in 4-bit costs +40%, the blocks nothing
        return 10.0 * (1.4 if not torch.allclose(head.weight, original, atol=1e-3) else 1.0)

    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, len(tok), 40).tolist() for _ in range(4)]
    linears = {n: m for members in calibrated.linear_units(model).values() for n, m in members}
    total = sum(m.weight.numel() for m in linears.values())
    model_bytes = 4 * sum(p.numel() for p in model.parameters())
    rows = 600                                      # the budget: this many head rows in 8-bit
    k = head.in_features
    # the whole model's size goal: 4-bit linears, the other weights (norms: fp32), the vocab-order table
    ratio = (calibrated.unit_bytes(total, 4, 32) + calibrated.other_bytes(model, linears) + 4 * 1536
             + rows * (calibrated.unit_bytes(k, 8, 128) - calibrated.unit_bytes(k, 4, 32))) / model_bytes
    plan = calibrated.calibrate(model, seqs, score, 32, 0.01, 1.0, ratio, block_size_8bit=128)
    report = plan.report()
    assert report["units_8bit"] == [] and report["lm_head_rows_8bit"] == rows
    assert report["model_size_ratio"] <= ratio + 1e-9
    assert len(plan.split) == 1
    split = next(iter(plan.split.values()))
    assert sorted(np.concatenate([split.rows8, split.rows4]).tolist()) == list(range(1536))
    assert calibrated.block_of(split.q8, split.s8) == 128 and calibrated.block_of(split.q4, split.s4) == 32
    fp32 = exporter.export_causal_lm(model, tmp_path / "fp32" / "model.onnx", 20)
    # what quantization leaves alone: the graph's own bytes and the norms, not the linears' weights
    overhead = exporter.overhead_bytes(fp32)
    assert fp32.stat().st_size < overhead <= exporter.graph_size(fp32) - 4 * total
    facts = calibrated.write(fp32, tmp_path / "int4" / "model.onnx", plan, accuracy_level=0)
    assert facts["matmuls"]["split"] == 1 and facts["matmuls"]["unmatched"] == 0
    assert facts["embedding"].startswith("shared")
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    stored = sum(numpy_helper.to_array(i).nbytes for i in graph.graph.initializer)
    assert stored <= ratio * model_bytes                        # the graph's tensors keep the planned size
    with torch.no_grad():                           # the same weights in PyTorch (the tied table too)
        for members in calibrated.linear_units(model).values():
            for _, m in members:
                key = calibrated.fingerprint(m.weight.detach().T.numpy())
                if key in plan.split:
                    s = plan.split[key]
                    w = torch.empty_like(m.weight)
                    w[torch.from_numpy(s.rows8)] = calibrated.dequantize(s.q8, s.s8, 8, 128)
                    w[torch.from_numpy(s.rows4)] = calibrated.dequantize(s.q4, s.s4, 4, 32)
                else:
                    bits, q, sc = plan.weights[key]
                    w = calibrated.dequantize(q, sc, bits, calibrated.block_of(q, sc))
                m.weight.copy_(w)
        ids = torch.tensor([seqs[0] + [1500, 3, 1400]])    # tokens of both parts
        ref = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()
    got = OnnxCausalLM(tmp_path / "int4" / "model.onnx")(ids.numpy(), np.ones_like(ids.numpy()))
    assert np.abs(got - ref).max() <= 1e-4


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
