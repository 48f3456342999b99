"""Optimize (issue 6) on the tiny Gemma-3: KV-cache export and incremental decoding,
quantized variants with gates and coverage reports per target, a broken variant caught
by the gate, sequence-classification export, `tuneops generate` / `tuneops classify`."""
from __future__ import annotations

import io
import subprocess
import sys
import json
from types import SimpleNamespace

import numpy as np
import pytest

from tuneops.io import read_json


@pytest.fixture(scope="module")
def optimized(stage, tiny_cfg):
    return stage("optimize")


def assert_greedy_like_pytorch(cfg, lm, tokens: int = 6) -> None:
    """Independent check: greedy decoding with the ONNX KV cache == PyTorch greedy ``generate`` of
    the merged fine-tuned model."""
    import torch

    from tuneops.inference import finetuned
    from tuneops.inference.decode import stream

    model = finetuned.load(cfg.path("base_model_dir"), cfg.path("train_dir"), merge=True).eval()
    prompt = [2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]
    with torch.inference_mode():
        ref = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                             min_new_tokens=tokens, pad_token_id=0)[0, len(prompt):].tolist()
    assert list(stream(lm, prompt, tokens)) == ref


def test_kv_cache_export_decodes_incrementally_like_full_sequence(optimized, tiny_cfg):
    from tuneops.inference.runtimes import OnnxCausalLM

    fp32 = optimized["variants"]["fp32"]
    assert fp32["accepted"] and fp32["max_abs_logits_diff"] <= tiny_cfg.optimize.parity_atol
    assert fp32["incremental_max_abs_diff"] <= 1e-4
    lm = OnnxCausalLM(tiny_cfg.path("optimize_dir") / fp32["path"])
    assert lm.has_cache and len(lm.past_names) == 2 * 2  # 2 layers x (key, value)
    assert_greedy_like_pytorch(tiny_cfg, lm)
    # the graph optimizer fused the RMSNorms
    assert optimized["graph_optimization"]["fused_ops"].get("SimplifiedLayerNormalization", 0) > 0


def test_every_variant_built_gated_and_covered_per_target(optimized, tiny_cfg):
    out = tiny_cfg.path("optimize_dir")
    variants = optimized["variants"]
    # the targets' variants (cpu: int8; fpga/npu: qdq) and the opt-in calibrated int4 (extra_variants)
    assert set(variants) == {"fp32", "int8", "int4", "qdq"}
    for name, v in variants.items():
        assert (out / v["path"]).is_file() and isinstance(v["accepted"], bool) and np.isfinite(v["perplexity"])
        for target in ("cpu", "fpga", "npu"):
            report = read_json((out / v["path"]).parent / f"coverage-{target}.json")
            assert 0 < report["node_share"] <= 1 and report["nodes"] == sum(report["op_counts"].values())
        if name != "fp32":
            assert v["size_ratio"] < 1 and "perplexity_change_pct" in v
    # the tied embedding shares the LM head's quantized weights: no second table
    assert variants["int4"]["size_ratio"] < variants["int8"]["size_ratio"] < 0.2
    assert abs(variants["int8"]["perplexity_change_pct"]) < 3
    # CPU runs everything; fp32 has no int8 compute for an int8-only FPGA; QDQ moves the
    # MatMul FLOPs onto it
    assert variants["fp32"]["coverage"]["cpu"]["node_share"] == 1.0
    assert variants["fp32"]["coverage"]["fpga"]["matmul_flops_share"] == 0
    assert variants["qdq"]["coverage"]["fpga"]["matmul_flops_share"] > 0.9
    # QDQ keeps perplexity (the random tiny model's next-token distributions are nearly flat, so its
    # top-1 agreement is noise: test_broken_variant_is_rejected_by_the_gate checks acceptance on
    # peaked logits)
    assert variants["qdq"]["fixed_shape"] == [1, 64] and abs(variants["qdq"]["perplexity_change_pct"]) < 3
    # the calibrated int4: GPTQ weights for every MatMul, the embedding read from the tied head's
    # codes, a sensitivity entry per decoder block and the LM head
    int4 = variants["int4"]
    assert int4["matmuls"]["unmatched"] == 0 and int4["embedding"].startswith("shared")
    assert set(int4["sensitivity"]) == {"layer.0", "layer.1", "lm_head"}
    assert all(np.isfinite(u["ppl_change_pct_alone_4bit"]) for u in int4["sensitivity"].values())
    assert abs(int4["perplexity_change_pct"]) < 3
    default = optimized["default_variant"]
    assert default is not None and variants[default]["accepted"]
    assert read_json(out / "metrics.json")["default_variant"] == default


@pytest.fixture(scope="module")
def built(stage, tiny_project):
    """The same trained model through onnxruntime-genai's builder: fp32 graph with fused attention,
    our int8 and calibrated int4 from it, and the builder's own int8 (a second optimize output
    folder; genai_int4 is the same build path with other options:
    test_genai_int4_passes_its_params_to_the_builder)."""
    from tasks import optimize
    from tuneops.config import load_config

    stage("train")
    cfg = load_config(tiny_project / "params.yaml", ["optimize.exporter=builder", "optimize.targets=[cpu]",
                                                      "optimize.extra_variants=[genai_int8,int4]",
                                                      "paths.optimize_dir=artifacts/optimize-builder"])
    return cfg, optimize.run(cfg)


def test_builder_graph_has_fused_attention_passes_parity_and_decodes_like_pytorch(built):
    from tuneops.inference.runtimes import OnnxCausalLM

    cfg, out = built
    fp32 = out["variants"]["fp32"]
    assert fp32["exporter"] == "builder" and fp32["accepted"]
    assert fp32["max_abs_logits_diff"] <= cfg.optimize.parity_atol and fp32["incremental_max_abs_diff"] <= 1e-4
    assert out["graph_optimization"]["fused_ops"]["GroupQueryAttention"] == 2      # one per layer
    lm = OnnxCausalLM(cfg.path("optimize_dir") / fp32["path"])
    assert not lm.has_positions and lm.kv_shape == (1, 32)   # positions from the mask; head size made concrete
    assert_greedy_like_pytorch(cfg, lm)
    assert not (cfg.path("optimize_dir") / "merged").exists()      # the merged folder is scratch


def test_variants_from_the_builder_graph_and_the_builders_own_are_gated(built):
    import onnx

    cfg, out = built
    root, variants = cfg.path("optimize_dir"), out["variants"]
    assert set(variants) == {"fp32", "int8", "genai_int8", "int4"}
    int8 = variants["int8"]         # our recipe on the builder's graph: the tied embedding reads the head's codes
    assert abs(int8["perplexity_change_pct"]) < 3 and int8["size_ratio"] < 0.4
    ops = {n.op_type for n in onnx.load(str(root / int8["path"]), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "MatMulNBits"} <= ops
    assert (root / "int8" / "genai_config.json").is_file()     # onnxruntime_genai.Model runs the folder too
    int4 = variants["int4"]         # GPTQ's codes for every builder MatMul, the fused qkv_proj included
    # per layer qkv (fused), o, gate, up, down; and the head
    assert int4["matmuls"]["unmatched"] == 0 and sum(int4["matmuls"][k] for k in ("4", "8", "split")) == 2 * 5 + 1
    assert int4["embedding"].startswith("shared")
    # the graph computes the plan: ORT's perplexity is PyTorch's with the same dequantized weights
    assert int4["perplexity"] == pytest.approx(int4["calibration_perplexity"]["plan_pytorch_gate_rows"], rel=0.02)
    ops = {n.op_type for n in onnx.load(str(root / int4["path"]), load_external_data=False).graph.node}
    assert {"GroupQueryAttention", "MatMulNBits"} <= ops and "MatMul" not in ops
    v = variants["genai_int8"]
    assert isinstance(v["accepted"], bool) and np.isfinite(v["perplexity"]) and "top1_agreement" in v
    assert v["builder_options"]["block_size"] == str(cfg.optimize.block_size)
    assert (root / "genai_int8" / "genai_config.json").is_file()
    assert out["default_variant"] in {n for n, v in variants.items() if v["accepted"]}


def test_genai_int4_passes_its_params_to_the_builder(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tuneops.export import genai
    from tuneops.export.variants import Context, get

    calls = []
    monkeypatch.setattr(genai, "build", lambda src, out, precision, **kw: calls.append((src, out, precision, kw)))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    params = SimpleNamespace(nbits_accuracy_level=4, block_size=32,
                             genai=SimpleNamespace(int4_algo="k_quant", int4_mixed_precision="last_matmul:int8"))
    ctx = Context(fp32=tmp_path, fixed=None, shape=(1, 1), params=params, calibration=list, pad_id=0, merged=tmp_path)
    get("genai_int4").build(ctx, tmp_path / "genai_int4" / "model.onnx")
    (src, out, precision, kw), = calls
    assert (src, out.name, precision) == (tmp_path, "genai_int4", "int4")
    assert kw["extra_options"] == {"accuracy_level": "4", "block_size": "32", "algo_config": "k_quant",
                                   "matmul_mixed_precision": "last_matmul:int8", "shared_embeddings": "true"}
    assert ctx.info["genai_int4"]["builder_options"] == kw["extra_options"]


def test_exporter_choice_follows_the_family_and_the_variants(monkeypatch):
    from types import SimpleNamespace

    from tuneops.export.exporter import choose
    from tuneops.export.variants import VARIANTS, Variant, VariantParamError, get, wanted
    from tuneops.families import FAMILIES, GENERIC

    needs_torch = Variant("needs_torch", "maps torch.onnx node names", lambda ctx, dst: dst, torch_graph=True)
    monkeypatch.setitem(VARIANTS, needs_torch.name, needs_torch)

    llama, gemma3 = (next(f for f in FAMILIES if f.name == n) for n in ("llama", "gemma3"))
    assert choose("auto", llama, [get("int8")]) == "builder"
    assert choose("auto", gemma3, [get("int8")]) == "torch"          # opt-in: the builder on request only
    assert choose("builder", gemma3, [get("int8"), get("genai_int8")]) == "builder"
    assert choose("auto", llama, [get("int8"), get("int4")]) == "builder"   # GPTQ's plan knows the fused qkv too
    assert choose("auto", llama, [get("int8"), needs_torch]) == "torch"
    assert choose("torch", llama, [get("int8")]) == "torch"
    assert choose("auto", GENERIC, [get("int8")]) == "torch"
    with pytest.raises(ValueError, match="optimize.exporter: builder: .* generic family"):
        choose("builder", GENERIC, [])
    with pytest.raises(ValueError, match=r"\['genai_int8'\] need onnxruntime-genai's model builder"):
        choose("auto", GENERIC, [get("genai_int8")])
    params = SimpleNamespace(targets=[], extra_variants=["needs_torch"], exporter="builder",
                             max_ppl_change_pct={"needs_torch": 3}, min_top1_agreement={"needs_torch": 0.8})
    with pytest.raises(VariantParamError, match="optimize.exporter: builder: variant.*needs_torch.* torch.onnx") as err:
        wanted(params, {})
    assert err.value.key == "optimize.exporter"


def test_quantized_gate_rejects_perplexity_drift_both_ways_and_top1_flips():
    import numpy as np

    from tuneops.export.gate import gate_quantized

    ref = {"perplexity": 10.0, "top1": np.arange(100)}
    limits, floors = {"int8": 3.0}, {"int8": 0.9}

    def gate(ppl, flips):
        top1 = ref["top1"].copy()
        top1[:flips] = -1
        return gate_quantized("int8", {"perplexity": ppl, "top1": top1}, ref, limits, floors)

    assert gate(10.2, 5)["accepted"]                                  # +2%, 95% agreement
    assert not gate(10.4, 0)["accepted"]                              # +4% perplexity
    assert not gate(9.6, 0)["accepted"]                               # -4%: a deviation too, not a gain
    assert not gate(10.0, 11)["accepted"]                             # 89% top-1 agreement
    assert not gate(float("nan"), 0)["accepted"]
    assert gate(10.2, 5)["perplexity_change_pct"] == pytest.approx(2.0)


@pytest.mark.slow   # ~1.5 min: two QDQ builds + scoring (CI time); the gate rules are unit-tested too
def test_broken_variant_is_rejected_by_the_gate(stage, tiny_cfg, tmp_path):
    """Static QDQ of every op (embedding, norms, softmax, mask arithmetic) calibrated on one
    sequence is rejected; the proper recipe (MatMuls, 32 calibration sequences) passes the
    same gate. The random tiny model's logits are nearly flat (perplexity ~ vocabulary
    size), so its final norm is scaled x30 first: peaked next-token distributions that a
    bad variant visibly changes."""
    import torch

    from tuneops.export import exporter, gate, quantizers
    from tuneops.inference import finetuned
    from tuneops.io import read_jsonl
    from tuneops.inference.scoring import encode, torch_forward
    from tuneops.models import load_tokenizer
    from tuneops.inference.runtimes import OnnxCausalLM

    stage("train")
    o = tiny_cfg.optimize
    tok = load_tokenizer(tiny_cfg.path("base_model_dir"))
    model = finetuned.load(tiny_cfg.path("base_model_dir"), tiny_cfg.path("train_dir"), merge=True).eval()
    with torch.no_grad():
        model.model.norm.weight += 29.0  # Gemma RMSNorm scales by (1 + weight)
    fixed = exporter.export_logits(model, tmp_path / "fixed" / "model.onnx", o.opset, (1, 64))
    train = encode(read_jsonl(tiny_cfg.path("clean_train_data")), tok, 64)
    evalset = encode(read_jsonl(tiny_cfg.path("clean_eval_data")), tok, 64)[: o.ppl_samples]
    reference = gate.score(torch_forward(model), evalset, 4, tok.pad_token_id)
    gates = {}
    for name, ops, n in (("proper", ["MatMul"], 32), ("broken", ["all"], 1)):
        q = quantizers.quantize_qdq(fixed, tmp_path / name / "model.onnx",
                             quantizers.Calibration(train[:n], (1, 64), tok.pad_token_id), quantizers.qdq_ops(ops))
        got = gate.score(OnnxCausalLM(q), evalset, 4, tok.pad_token_id)
        gates[name] = gate.gate_quantized("qdq", got, reference, o.max_ppl_change_pct, o.min_top1_agreement)
    assert gates["proper"]["accepted"], gates
    assert not gates["broken"]["accepted"], gates


def test_default_variant_is_never_a_rejected_one():
    from tuneops.export.gate import choose_default

    v = {"fp32": {"accepted": True}, "int8": {"accepted": False}, "int4": {"accepted": False}}
    assert choose_default(v, ["int4", "int8", "fp32"]) == "fp32"
    assert choose_default({"fp32": {"accepted": False}, "int4": {"accepted": False}}, ["int4", "fp32"]) is None
    assert choose_default({**v, "int4": {"accepted": True}}, ["int4", "int8", "fp32"]) == "int4"


def test_unknown_target_profile_is_a_clear_error(tiny_project):
    from tuneops.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="unknown target profile"):
        load_config(tiny_project / "params.yaml", ["optimize.targets=[gpu]"])


def test_generate_streams_greedy_and_seeded_sampling(optimized, tiny_cfg, capsys):
    from tuneops.cli import main
    from tuneops.inference.commands import generate

    args = SimpleNamespace(model=None, variant="fp32", prompt="Hello", max_new_tokens=4, sample=False,
                           temperature=1.0, top_k=0, top_p=1.0, seed=None, raw=False)
    greedy = [generate(tiny_cfg, args, io.StringIO()) for _ in range(2)]
    assert greedy[0] == greedy[1]
    sampled = [generate(tiny_cfg, SimpleNamespace(**{**vars(args), "sample": True, "top_k": 50, "seed": s}),
                        io.StringIO()) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]
    rc = main(["generate", "Hi", "--max-new-tokens", "2", "--params", str(tiny_cfg.source)])
    assert rc == 0 and capsys.readouterr().out.endswith("\n")
    assert main(["generate", "Hi", "--model", "/nonexistent", "--params", str(tiny_cfg.source)]) == 2


def test_sequence_classifier_exports_with_head_and_classifies(stage, tiny_cfg, tmp_path, capsys):
    """A tiny Gemma-3 classifier (random head, 3 labels): ONNX logits equal PyTorch on a
    padded batch; `tuneops classify` prints one label per text."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tuneops.export.exporter import export_classifier
    from tuneops.cli import main
    from tuneops.models import load_tokenizer

    stage("model")
    base = tiny_cfg.path("base_model_dir")
    cfg = AutoConfig.from_pretrained(str(base), num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                                     label2id={"neg": 0, "neu": 1, "pos": 2})
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    src = tmp_path / "classifier"
    model.save_pretrained(str(src))
    load_tokenizer(base).save_pretrained(str(src))
    record = export_classifier(src, tmp_path / "onnx", tiny_cfg.optimize.opset, tiny_cfg.optimize.parity_atol)
    assert record["accepted"] and record["same_argmax"] and record["labels"] == ["neg", "neu", "pos"]
    rc = main(["classify", "good", "a much longer and worse text", "--model", str(tmp_path / "onnx"),
               "--params", str(tiny_cfg.source)])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and [x["text"] for x in lines] == ["good", "a much longer and worse text"]
    assert all(x["label"] in {"neg", "neu", "pos"} for x in lines)


def test_qlora_merge_base_is_the_4bit_weights_training_saw():
    """QLoRA merges into the dequantized 4-bit base: our round trip gives the same outputs
    as a bitsandbytes Linear4bit (NF4) layer, and the LM head stays fp32."""
    import bitsandbytes as bnb
    import torch

    from tuneops.inference.finetuned import dequantize_like_qlora

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.proj, model.lm_head = torch.nn.Linear(128, 64, bias=False), torch.nn.Linear(128, 32, bias=False)
    original, head = model.proj.weight.detach().clone(), model.lm_head.weight.detach().clone()
    q4 = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q4.weight = bnb.nn.Params4bit(original.clone(), requires_grad=False, quant_type="nf4", blocksize=64)
    q4 = q4.to("cpu")
    dequantize_like_qlora(model)
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected, unquantized = q4(x), x @ original.T
        got = model.proj(x)
    assert not torch.equal(model.proj.weight, original) and torch.equal(model.lm_head.weight, head)
    # equal up to the 4-bit kernel's own rounding (bf16 on some CPUs), far closer than the
    # original fp32 weights (the 4-bit quantization error)
    assert (got - expected).abs().max() < 0.05 * (unquantized - expected).abs().max()


def test_coverage_counts_nodes_flops_and_fallback_ops(tmp_path):
    """A hand-built graph: a QDQ MatMul (int8 island) + an fp32 MatMul + Softmax. The fpga
    profile executes the QDQ MatMul, not the fp32 one nor Softmax; the cpu profile all."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tuneops import targets

    w1 = numpy_helper.from_array(np.ones((8, 16), np.int8), "w1_q")
    w2 = numpy_helper.from_array(np.ones((16, 4), np.float32), "w2")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["x_q"]),
        helper.make_node("DequantizeLinear", ["x_q", "s", "z"], ["x_dq"]),
        helper.make_node("DequantizeLinear", ["w1_q", "s", "z"], ["w1"]),
        helper.make_node("MatMul", ["x_dq", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
        helper.make_node("Softmax", ["y"], ["p"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [2, 4])], [w1, w2, scale, zero])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    fpga = targets.coverage(path, targets.load("fpga"))
    assert fpga["nodes"] == 6 and fpga["supported_nodes"] == 4
    assert fpga["cpu_fallback_ops"] == {"MatMul": 1, "Softmax": 1}
    # FLOPs: 2*2*8*16 = 512 on the target, 2*2*16*4 = 256 on CPU
    assert fpga["matmul_flops_share"] == pytest.approx(512 / 768)
    assert targets.coverage(path, targets.load("cpu"))["node_share"] == 1.0


def test_generate_runs_a_registered_variant(stage, tiny_cfg, tmp_path):
    """`tuneops generate --model models:/NAME@champion`: the registered pyfunc's ONNX
    variant (its default, or --variant) runs with the KV cache."""
    from tuneops.inference.commands import InferError, generate

    stage("register")
    uri = f"models:/{tiny_cfg.register.model_name}@champion"
    args = SimpleNamespace(model=uri, variant=None, prompt="Hello", max_new_tokens=3, sample=False,
                           temperature=1.0, top_k=0, top_p=1.0, seed=None, raw=False)
    buf = io.StringIO()
    reply = generate(tiny_cfg, args, buf)
    assert buf.getvalue() == reply + "\n"
    local = generate(tiny_cfg, SimpleNamespace(**{**vars(args), "model": None}), io.StringIO())
    assert reply == local  # the registered default variant == this project's default variant
    with pytest.raises(InferError, match="no ONNX variant"):
        generate(tiny_cfg, SimpleNamespace(**{**vars(args), "variant": "int3"}), io.StringIO())
    # the CLI, from another folder: it must find this project's registry, not create one there
    proc = subprocess.run([sys.executable, "-m", "tuneops", "--params", str(tiny_cfg.root / "params.yaml"),
                           "generate", "--model", uri, "--max-new-tokens", "3", "Hello"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == reply.strip() and not list(tmp_path.iterdir())


def _gqa_graph(folder, positions: int, heads: int = 2, kv: int = 1, head: int = 16, scale: float = 1.0):
    """One ``GroupQueryAttention`` with rotary whose cos/sin caches hold ``positions`` rows computed
    in fp32 as the builder does (``scale``: a longrope/YaRN attention factor), saved with external
    data like the builder's, beside an unrelated initializer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    half = head // 2
    inv_freq = (1.0 / 10000 ** (np.arange(half, dtype=np.float32) * 2 / head)).astype(np.float32)
    angles = np.arange(positions, dtype=np.float32)[:, None] * inv_freq[None]
    inits = [numpy_helper.from_array((np.cos(angles) * scale).astype(np.float32), "cos_cache"),
             numpy_helper.from_array((np.sin(angles) * scale).astype(np.float32), "sin_cache"),
             numpy_helper.from_array(np.arange(1024, dtype=np.float32), "unrelated")]
    nodes = [helper.make_node("GroupQueryAttention", ["q", "k", "v", "past_key", "past_value", "seqlens_k", "total",
                                                      "cos_cache", "sin_cache"], ["out", "present_key", "present_value"],
                              domain="com.microsoft", num_heads=heads, kv_num_heads=kv, do_rotary=1),
             helper.make_node("ReduceSum", ["unrelated"], ["checksum"], keepdims=0)]
    f = TensorProto.FLOAT
    graph = helper.make_graph(nodes, "gqa", [
        helper.make_tensor_value_info("q", f, [1, "s", heads * head]),
        helper.make_tensor_value_info("k", f, [1, "s", kv * head]),
        helper.make_tensor_value_info("v", f, [1, "s", kv * head]),
        helper.make_tensor_value_info("past_key", f, [1, kv, "p", head]),
        helper.make_tensor_value_info("past_value", f, [1, kv, "p", head]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_key", "present_value", "checksum")], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    folder.mkdir(parents=True)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return folder / "model.onnx"


@pytest.mark.parametrize("scale", [1.0, 1.25])
def test_factored_rotary_caches_give_the_same_attention_at_every_position_from_a_fraction_of_the_bytes(tmp_path, scale):
    """passes.factor_rotary_caches: 4096 cache rows become 64 + 64 (block 64); the attention's
    output is the same before the block and within the caches' own fp32 rounding across and far
    past it (decoding from a past of 0, 40, 300 and 4000 positions), the unrelated data is intact, the data file loses the
    caches' bytes, and a position past the context is still refused."""
    import onnx
    import onnxruntime as ort

    from tuneops.export.passes import ROTARY_BLOCK_KEY, factor_rotary_caches

    path = _gqa_graph(tmp_path / "g", positions=4096, scale=scale)
    data = path.parent / "model.onnx.data"
    rng = np.random.default_rng(0)

    def feeds(past, new=3):
        return {"q": rng.standard_normal((1, new, 32)).astype(np.float32),
                "k": rng.standard_normal((1, new, 16)).astype(np.float32),
                "v": rng.standard_normal((1, new, 16)).astype(np.float32),
                "past_key": rng.standard_normal((1, 1, past, 16)).astype(np.float32),
                "past_value": rng.standard_normal((1, 1, past, 16)).astype(np.float32),
                "seqlens_k": np.array([past + new - 1], np.int32), "total": np.array(past + new, np.int32)}

    cases = [feeds(past) for past in (0, 40, 300, 4000)]
    before = [ort.InferenceSession(str(path)).run(None, f) for f in cases]
    size = data.stat().st_size
    info = factor_rotary_caches(path)
    assert info["pairs"] == 1 and info["block"] == 64
    assert info["bytes_before"] == 2 * 4096 * 8 * 4 and info["bytes_after"] == 4 * 64 * 8 * 4
    assert data.stat().st_size <= size - info["bytes_before"] + 4096    # gone from the file (page alignment)
    model = onnx.load(str(path), load_external_data=False)
    assert {i.name for i in model.graph.initializer}.isdisjoint({"cos_cache", "sin_cache"})
    session = ort.InferenceSession(str(path))
    assert session.get_modelmeta().custom_metadata_map[ROTARY_BLOCK_KEY] == "64"
    for past, f, want in zip((0, 40, 300, 4000), cases, before):
        got = session.run(None, f)
        # below the block the rows are the builder's own; past it both carry the fp32 rounding of
        # the angle p t_k (the builder computes it in fp32): 2.4e-4 at position 4096
        tol = 1e-6 + (0 if past + 3 <= 64 else 3e-7 * (past + 3))
        for i in (0, 1):                                  # the attention, the rotated keys
            assert np.abs(got[i] - want[i]).max() <= tol * np.abs(want[i]).max(), (past, i)
        assert np.array_equal(got[2], want[2]) and got[3] == want[3] == 1023 * 1024 / 2
    with pytest.raises(Exception):                       # the context ends where the builder's caches did
        session.run(None, feeds(4095, new=2))
    assert factor_rotary_caches(path)["pairs"] == 0      # already factored: nothing left to do
