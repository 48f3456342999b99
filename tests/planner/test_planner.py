"""Tests for tuneops.planner: parameter counts, memory arithmetic, decision rules, table, CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tuneops.planner import (RULES, Goals, Hardware, MemoryModelConstants, ModelSpec, PlanError, Setup, estimate,
                             explain, load_table, main, make_plan)

CONFIGS = Path(__file__).parents[1] / "fixtures" / "model_configs"
GIB = 2**30
CPU24 = Hardware(gpus=0, host_ram_gb=24.0, nodes=1, cpu_cores=2)
PARAMS_SELECT = {  # params.yaml `select`, as decided
    "method": "auto", "allowed_methods": ["full", "lora", "qlora", "dora"], "minimize": "cost",
    "quality": "standard", "global_batch_size": 8, "max_micro_batch_size": 4,
    "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "hardware": {"gpus": "auto", "gpu_memory_gb": "auto", "host_ram_gb": "auto", "nodes": 1},
    "memory_headroom": 0.9,
}
PLAN_KEYS = {"method", "peft", "precision", "zero_stage", "offload", "micro_batch_size", "grad_accum",
             "global_batch_size", "gradient_checkpointing", "launcher", "nproc_per_node", "nodes", "world_size",
             "predicted_peak_gb_per_device", "breakdown", "fits", "reasons", "model", "hardware"}


def spec(name: str) -> ModelSpec:
    return ModelSpec.from_path(CONFIGS / f"{name}.json")


def gpus(n: int, mem: float, host: float = 512.0, nodes: int = 1) -> Hardware:
    return Hardware(gpus=n, gpu_memory_gb=mem, host_ram_gb=host, nodes=nodes, cpu_cores=32)


def setup_for(model: ModelSpec, method: str, **kw) -> Setup:
    targets = tuple(model.resolve_targets(["q_proj", "k_proj", "v_proj", "o_proj"])) \
        if method in ("lora", "qlora", "dora") else ()
    return Setup(method=method, compute_bytes=kw.pop("compute_bytes", 2), targets=targets, **kw)


# --- model configs -------------------------------------------------------------------------

@pytest.mark.parametrize("name,known", [
    ("gemma3-270m", 268e6), ("qwen2.5-0.5b", 494e6), ("phi-3-mini", 3.82e9), ("llama-2-7b", 6.74e9),
    ("mistral-7b", 7.24e9), ("phi-3-medium", 14.0e9), ("llama-2-70b", 69.0e9), ("all-minilm-l6-v2", 22.7e6),
])
def test_parameter_count_matches_published(name, known):
    assert abs(spec(name).params / known - 1) < 0.03


def test_gemma3_nested_text_config_in_a_model_folder(tmp_path):
    text = json.loads((CONFIGS / "gemma3-270m.json").read_text())
    folder = tmp_path / "gemma-3-270m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text}))
    m = ModelSpec.from_path(folder)
    assert (m.name, m.params, m.vocab, m.tied_embeddings) == ("gemma-3-270m", spec("gemma3-270m").params, 262144, True)


def test_bad_config_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelSpec.from_path(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        ModelSpec.from_path(tmp_path / "nope")


def test_target_modules_map_to_fused_phi3_and_reject_unknown():
    assert spec("phi-3-mini").resolve_targets(["q_proj", "k_proj", "v_proj", "o_proj"]) == ["qkv_proj", "o_proj"]
    assert spec("all-minilm-l6-v2").resolve_targets(["q_proj", "v_proj"]) == ["query", "value"]
    with pytest.raises(ValueError, match="no module 'c_attn'"):
        spec("llama-2-7b").resolve_targets(["c_attn"])


# --- memory arithmetic ---------------------------------------------------------------------

def test_full_finetuning_model_states_follow_the_zero_paper():
    m = spec("llama-2-7b")
    psi, n = m.params, 8
    c = MemoryModelConstants()
    live = c.zero3_live_layers * m.layer_params * 2
    for stage, expected in [(0, 2 * psi + 2 * psi + 12 * psi), (1, 2 * psi + 2 * psi + 12 * psi / n),
                            (2, 2 * psi + (2 + 12) * psi / n), (3, (2 + 2 + 12) * psi / n + live)]:
        e = estimate(m, setup_for(m, "full", zero_stage=stage, world_size=n))
        assert (e.weights + e.gradients + e.optimizer_states) * GIB == pytest.approx(expected), stage
    fp32 = estimate(m, setup_for(m, "full", compute_bytes=4))
    assert (fp32.weights, fp32.gradients, fp32.optimizer_states) == pytest.approx(
        (4 * psi / GIB, 4 * psi / GIB, 8 * psi / GIB))


def test_qlora_weights_are_nf4_double_quant_and_adapters_fp32():
    m = spec("llama-2-7b")
    c = MemoryModelConstants()
    assert c.nf4_bits_per_param == pytest.approx(4.127, abs=1e-3)
    e = estimate(m, setup_for(m, "qlora"))
    phi = m.layers * sum(8 * (i + o) for i, o in (m.modules[t] for t in ("q_proj", "k_proj", "v_proj", "o_proj")))
    frozen = m.linear_params * 4.127 / 8 + (m.params - m.linear_params) * 2
    assert e.weights * GIB == pytest.approx(frozen + 4 * phi, rel=1e-4)
    assert (e.gradients * GIB, e.optimizer_states * GIB) == pytest.approx((4 * phi, 8 * phi))


def test_dora_costs_more_than_lora_by_magnitude_and_activations():
    m = spec("phi-3-mini")
    lora, dora = estimate(m, setup_for(m, "lora")), estimate(m, setup_for(m, "dora"))
    magnitude = m.layers * (m.modules["qkv_proj"][1] + m.modules["o_proj"][1])
    assert (dora.gradients - lora.gradients) * GIB == pytest.approx(4 * magnitude)
    assert dora.activations > lora.activations


def test_gemma_logits_use_the_262k_vocabulary():
    m = spec("gemma3-270m")
    e = estimate(m, setup_for(m, "lora", micro_batch=4, seq_len=256, compute_bytes=4, on_gpu=False))
    assert e.logits * GIB == 4 * 256 * 262144 * 12
    cls = estimate(m, setup_for(m, "lora", micro_batch=4, seq_len=256, task_head="sequence_classification"))
    assert cls.logits * GIB == 4 * m.num_labels * 12


def test_activations_reduce_to_korthikanti_for_a_standard_transformer():
    """MiniLM is a plain MHA encoder with I = 4h: with eager attention (5as) and fused LayerNorm
    (2 bytes per value) the per-layer activations are s*b*h*(34 + 5as/h) bytes in 16-bit."""
    m = spec("all-minilm-l6-v2")
    assert m.intermediate == 4 * m.hidden and m.heads * m.head_dim == m.hidden
    c = MemoryModelConstants(attention_score_bytes=5.0, norm_bytes=2.0)
    b, s, h, a = 2, 128, m.hidden, m.heads
    e = estimate(m, setup_for(m, "full", micro_batch=b, seq_len=s, task_head="sequence_classification"), c)
    assert (e.activations - e.logits) * GIB == pytest.approx(m.layers * s * b * h * (34 + 5 * a * s / h))
    ckpt = estimate(m, setup_for(m, "full", micro_batch=b, seq_len=s, task_head="sequence_classification",
                                 checkpointing=True), c)
    assert (ckpt.activations - ckpt.logits) * GIB == pytest.approx(
        m.layers * 2 * s * b * h + s * b * h * (34 + 5 * a * s / h))


@pytest.mark.parametrize("name", ["phi-3-mini", "llama-2-7b", "phi-3-medium", "llama-2-70b"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("n", [2, 8])
def test_zero_stages_are_monotonic(name, method, n):
    m = spec(name)
    peaks = [estimate(m, setup_for(m, method, zero_stage=s, world_size=n)).total for s in range(4)]
    assert peaks == sorted(peaks, reverse=True)
    if method == "full":
        assert peaks[0] > peaks[1] > peaks[2] > peaks[3]


def test_offload_moves_states_from_device_to_host():
    m = spec("phi-3-medium")
    base = setup_for(m, "full", zero_stage=3, world_size=4)
    plain, opt = estimate(m, base), estimate(m, replace(base, offload_optimizer=True))
    both = estimate(m, replace(base, offload_optimizer=True, offload_params=True))
    assert plain.total > opt.total > both.total
    assert plain.host_gb == 0 < opt.host_gb < both.host_gb
    # host = the optimizer states that left the device + ZeRO-Offload's fp32 gradient partition
    # (stage 3: it replaces the device's gradient partition)
    phi = m.params
    assert opt.host_gb == pytest.approx(plain.optimizer_states + 4 * phi / 4 / GIB)
    assert opt.gradients == 0 < plain.gradients


def test_stage2_offload_prices_deepspeed_host_buffers():
    """ZeRO-2 + optimizer offload, 270M fp32 on 2 CPU ranks: the measured +2.24 GiB at the first
    step (bench/results/calibration-cpu.md) = fp32 gradient partition + staging copy of the weight
    partition (4 bytes/param/N each) + one largest-parameter gradient buffer on each side."""
    m = spec("gemma3-270m")
    base = setup_for(m, "full", zero_stage=2, world_size=2, on_gpu=False, compute_bytes=4)
    plain, off = estimate(m, base), estimate(m, replace(base, offload_optimizer=True))
    largest = 4 * m.embedding_params / GIB
    assert off.host_gb == pytest.approx(plain.optimizer_states + 2 * 4 * m.params / 2 / GIB + largest)
    assert off.gradients == pytest.approx(plain.gradients + largest)
    extra = (off.total + off.host_gb) - (plain.total + plain.host_gb)
    assert 2.1 < extra < 2.4


def test_checkpointing_reduces_activations():
    for name in ("gemma3-270m", "llama-2-7b", "llama-2-70b"):
        m = spec(name)
        on = estimate(m, setup_for(m, "lora", seq_len=2048, checkpointing=True))
        off = estimate(m, setup_for(m, "lora", seq_len=2048))
        assert on.activations < off.activations
        assert on.activations - on.logits < (off.activations - off.logits) / 4  # logits are not recomputed


def test_constants_are_overridable():
    m = spec("llama-2-7b")
    setup = setup_for(m, "lora", micro_batch=2)
    default = estimate(m, setup)
    heavier = estimate(m, setup, MemoryModelConstants(cuda_context_gb=3.0, logits_bytes=16.0))
    assert heavier.total - default.total == pytest.approx(2.2 + 2 * 512 * m.vocab * 4 / GIB)
    p = make_plan(m, gpus(1, 24), 512, Goals(), constants=MemoryModelConstants(cuda_context_gb=3.0))
    assert p.to_dict()["breakdown"]["overhead"] == 3.0


# --- decision rules ------------------------------------------------------------------------

def test_default_params_on_this_cpu_machine_plan_lora():
    p = make_plan(spec("gemma3-270m"), CPU24, 256, Goals.from_params(PARAMS_SELECT))
    assert (p.method, p.zero_stage, p.launcher, p.nproc_per_node, p.nodes) == ("lora", 0, "python", 1, 1)
    assert p.precision == "fp32" and p.fits
    assert p.peft["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and p.peft["r"] == 8
    assert "R7-cpu-prefers-lora" in {r["rule"] for r in p.reasons}


# (model, GPUs, GiB per GPU, host RAM GiB, goals) -> (method, zero stage, launcher)
GRID = [
    ("qwen2.5-0.5b", 1, 24, 64, {}, ("lora", 0, "python")),
    ("qwen2.5-0.5b", 1, 24, 64, {"quality": "best"}, ("full", 0, "python")),
    ("qwen2.5-0.5b", 1, 24, 64, {"minimize": "memory"}, ("qlora", 0, "python")),
    ("phi-3-mini", 1, 24, 64, {}, ("lora", 0, "python")),
    ("phi-3-mini", 1, 24, 32, {"quality": "best"}, ("dora", 0, "python")),
    ("phi-3-mini", 1, 24, 128, {"quality": "best"}, ("full", 2, "deepspeed")),   # ZeRO-Offload
    ("phi-3-mini", 4, 24, 128, {"quality": "best"}, ("full", 3, "deepspeed")),
    ("llama-2-7b", 1, 24, 64, {}, ("lora", 0, "python")),
    ("llama-2-7b", 1, 16, 64, {}, ("lora", 0, "python")),
    ("llama-2-7b", 1, 12, 1024, {}, ("qlora", 0, "python")),
    ("llama-2-7b", 1, 12, 1024, {"allowed_methods": ("full", "lora")}, ("lora", 3, "deepspeed")),
    ("llama-2-7b", 8, 80, 512, {"method": "full"}, ("full", 1, "deepspeed")),
    ("llama-2-7b", 8, 80, 512, {}, ("lora", 0, "torchrun")),
    ("mistral-7b", 2, 80, 512, {"quality": "best"}, ("full", 1, "deepspeed")),
    ("mistral-7b", 2, 48, 512, {"quality": "best"}, ("full", 3, "deepspeed")),
    ("phi-3-medium", 1, 24, 1024, {}, ("qlora", 0, "python")),
    ("phi-3-medium", 1, 80, 128, {}, ("lora", 0, "python")),
    ("phi-3-medium", 8, 80, 1024, {"quality": "best"}, ("full", 2, "deepspeed")),
    ("llama-2-70b", 1, 80, 1024, {}, ("qlora", 0, "python")),
    ("llama-2-70b", 8, 80, 1024, {}, ("lora", 3, "deepspeed")),
    ("llama-2-70b", 8, 80, 1024, {"minimize": "memory"}, ("qlora", 0, "torchrun")),
    # full 70B needs ZeRO-3 + offload: 16 bytes/param of host RAM (fp32 master, Adam, fp32 gradients)
    # = 1.1 TB; a 2 TB node (DGX H100) fits it, a 1 TB node falls back to DoRA (the "best" PEFT)
    ("llama-2-70b", 8, 80, 2048, {"quality": "best"}, ("full", 3, "deepspeed")),
    ("llama-2-70b", 8, 80, 1024, {"quality": "best"}, ("dora", 3, "deepspeed")),
]


@pytest.mark.parametrize("name,n,mem,host,goals,expected", GRID)
def test_decision_grid(name, n, mem, host, goals, expected):
    p = make_plan(spec(name), gpus(n, mem, host=host), 512, Goals(**goals))
    assert (p.method, p.zero_stage, p.launcher) == expected
    assert p.fits and p.predicted_peak_gb_per_device <= 0.9 * mem
    assert p.nproc_per_node == n and p.world_size == n


def test_full_7b_on_8x80_uses_zero_and_a_distributed_launcher():
    p = make_plan(spec("llama-2-7b"), gpus(8, 80), 1024, Goals(method="full"))
    assert p.zero_stage >= 1 and p.launcher in ("deepspeed", "torchrun") and p.nproc_per_node == 8
    stage0 = estimate(spec("llama-2-7b"), setup_for(spec("llama-2-7b"), "full", world_size=8, seq_len=1024))
    assert stage0.total > 72  # why stage 0 was rejected: 16 bytes/param of a 6.7B model
    assert any(r["rule"] == "R10-zero-stage" and "stage 0" in r["text"] for r in p.reasons)


def test_forced_full_7b_on_one_24gb_gpu_fails_and_names_qlora():
    with pytest.raises(PlanError) as exc:
        make_plan(spec("llama-2-7b"), gpus(1, 24, host=32), 512, Goals(method="full"))
    msg = str(exc.value)
    assert msg.startswith("full fine-tuning of llama-2-7b does not fit: needs ~")
    assert "have 21.6 GB; qlora fits in ~" in msg and "\n" not in msg


def test_70b_on_one_24gb_gpu_only_qlora_is_close():
    m, hw = spec("llama-2-70b"), gpus(1, 24, host=64)
    with pytest.raises(PlanError, match="least is qlora"):
        make_plan(m, hw, 512, Goals())
    need = {meth: estimate(m, setup_for(m, meth, checkpointing=True)).total
            for meth in ("full", "lora", "qlora", "dora")}
    assert 24 < need["qlora"] < 2 * 24  # ~36 GiB of NF4 weights: the only one within 2x
    assert min(need["full"], need["lora"], need["dora"]) > 5 * 24


def test_70b_on_one_gpu_fits_with_parameter_offload_given_enough_host_ram():
    p = make_plan(spec("llama-2-70b"), gpus(1, 24, host=512), 512, Goals())
    assert (p.method, p.zero_stage, p.offload, p.launcher) == (
        "lora", 3, {"optimizer": True, "params": True}, "deepspeed")
    assert p.estimate.host_gb > 100


def test_forced_method_and_allowed_methods_are_respected():
    m, hw = spec("llama-2-7b"), gpus(1, 24)
    assert make_plan(m, hw, 512, Goals(method="dora")).method == "dora"
    assert make_plan(m, hw, 512, Goals(allowed_methods=("full", "dora"))).method == "dora"
    assert make_plan(m, hw, 512, Goals(allowed_methods=("qlora",), quality="best")).method == "qlora"
    with pytest.raises(ValueError, match="not in select.allowed_methods"):
        Goals(method="ia3")


@pytest.mark.parametrize("name,n,mem,global_batch,world", [
    ("gemma3-270m", 0, None, 8, 1), ("llama-2-7b", 8, 80, 8, 8), ("llama-2-7b", 4, 40, 10, 4),
    ("phi-3-mini", 2, 24, 64, 4), ("qwen2.5-0.5b", 1, 24, 3, 1),
])
def test_micro_times_accum_times_world_is_the_reported_global_batch(name, n, mem, global_batch, world):
    hw = CPU24 if n == 0 else gpus(n, mem, nodes=world // n)
    p = make_plan(spec(name), hw, 256, Goals(global_batch_size=global_batch))
    assert p.micro_batch_size * p.grad_accum * p.world_size == p.global_batch_size >= global_batch
    assert p.world_size == world and p.micro_batch_size & (p.micro_batch_size - 1) == 0
    assert p.global_batch_size - global_batch < p.micro_batch_size * p.world_size


def test_checkpointing_only_when_needed_or_minimizing_memory():
    m, hw = spec("llama-2-7b"), gpus(1, 24)
    assert not make_plan(m, hw, 512, Goals()).gradient_checkpointing
    assert make_plan(m, hw, 4096, Goals()).gradient_checkpointing
    assert make_plan(m, hw, 512, Goals(minimize="memory")).gradient_checkpointing


def test_micro_batch_shrinks_for_long_sequences():
    m, hw = spec("gemma3-270m"), gpus(1, 16)
    assert make_plan(m, hw, 256, Goals()).micro_batch_size == 4
    assert make_plan(m, hw, 4096, Goals()).micro_batch_size < 4


def test_multi_node_launch():
    p = make_plan(spec("phi-3-medium"), gpus(8, 40, nodes=2), 1024, Goals(method="full", global_batch_size=64))
    assert (p.launcher, p.nproc_per_node, p.nodes, p.world_size) == ("deepspeed", 8, 2, 16)


def test_scenarios_pick_task_heads_and_encoders_need_one():
    m = spec("all-minilm-l6-v2")
    assert make_plan(m, CPU24, 128, Goals(), scenario="classification").task_head == "sequence_classification"
    assert make_plan(m, CPU24, 128, Goals(), scenario="ner").task_head == "token_classification"
    with pytest.raises(PlanError, match="encoder"):
        make_plan(m, CPU24, 128, Goals(), scenario="chat")
    with pytest.raises(PlanError, match="max_position_embeddings"):
        make_plan(m, CPU24, 1024, Goals(), scenario="classification")
    with pytest.raises(PlanError, match="unknown scenario"):
        make_plan(spec("gemma3-270m"), CPU24, 128, Goals(), scenario="poetry")


def test_tokens_give_steps_per_epoch():
    p = make_plan(spec("gemma3-270m"), CPU24, 256, Goals(), tokens=1_000_000)
    assert p.steps_per_epoch == math.ceil(1_000_000 / (8 * 256))


# --- the scenario table --------------------------------------------------------------------

TABLE_MODELS = ["gemma3-270m", "qwen2.5-0.5b", "phi-3-mini", "llama-2-7b", "phi-3-medium", "llama-2-70b"]


@pytest.mark.parametrize("name", TABLE_MODELS)
def test_table_much_less_memory_methods_predict_less_memory(name):
    t, m = load_table(), spec(name)
    methods = [n for n, row in t.methods.items() if row.kind == "method"]
    need = {meth: estimate(m, setup_for(m, meth)).total for meth in methods}
    much = t.methods_with("much_less_memory")
    assert much
    for a in much:
        for b in (x for x in methods if x not in much):
            assert need[a] < need[b], (a, b)
    for b in (x for x in methods if not t.has(x, "most_memory")):
        assert need[b] < need["full"]


@pytest.mark.parametrize("hw", [CPU24, gpus(1, 24), gpus(8, 80), gpus(2, 40)])
@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "phi-3-mini", "llama-2-7b"])
def test_rules_agree_with_the_table(hw, name):
    t = load_table()
    assert t.has(make_plan(spec(name), hw, 512, Goals(minimize="memory")).method, "less_memory")
    quality = tuple(t.methods_with("quality"))
    try:
        make_plan(spec(name), hw, 512, Goals(allowed_methods=quality))
    except PlanError:  # no quality method fits this hardware: the rule falls back
        assert make_plan(spec(name), hw, 512, Goals(quality="best")).method not in quality
    else:
        assert t.has(make_plan(spec(name), hw, 512, Goals(quality="best")).method, "quality")
    assert t.has(make_plan(spec(name), hw, 512, Goals(minimize="time")).method, "cheaper")


def test_explain_lists_every_method_scenario_and_rule():
    text = explain()
    t = load_table()
    for name in list(t.methods) + list(t.scenarios) + list(RULES):
        assert name in text
    assert "DeepSpeed/ZeRO: memory-efficient data parallelism across all GPUs" in text


def test_every_reason_cites_a_known_rule():
    p = make_plan(spec("phi-3-medium"), gpus(2, 40), 1024, Goals(method="full"))
    assert p.reasons and {r["rule"] for r in p.reasons} <= set(RULES)
    assert {"R1-candidates", "R2-fit", "R3-forced", "R10-zero-stage", "R13-micro-batch"} <= {r["rule"] for r in p.reasons}


# --- goals and hardware --------------------------------------------------------------------

def test_goals_from_params_accepts_the_section_and_rejects_bad_values():
    g = Goals.from_params(PARAMS_SELECT)
    assert (g.method, g.allowed_methods, g.minimize, g.lora.target_modules[0]) == (
        "auto", ("full", "lora", "qlora", "dora"), "cost", "q_proj")
    with pytest.raises(ValueError) as exc:
        Goals.from_params({**PARAMS_SELECT, "minimize": "fast"})
    assert str(exc.value) == "select.minimize: must be one of memory, cost, time (got 'fast')"
    for bad, key in [({"quality": "great"}, "select.quality"), ({"method": "adapter"}, "select.method"),
                     ({"allowed_methods": ["lora", "sft"]}, "select.allowed_methods"),
                     ({"global_batch_size": 0}, "select.global_batch_size"),
                     ({"memory_headroom": 1.5}, "select.memory_headroom"), ({"typo": 1}, "select.typo"),
                     ({"lora": {"r": 0}}, "select.lora.r")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            Goals.from_params({**PARAMS_SELECT, **bad})


def test_hardware_from_params_declared_and_auto(monkeypatch):
    hw = Hardware.from_params({"gpus": 4, "gpu_memory_gb": 80, "host_ram_gb": 512, "nodes": 2})
    assert (hw.world_size, hw.device_memory_gb, hw.nproc_per_node) == (8, 80.0, 4)
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: Hardware(host_ram_gb=31.0, cpu_cores=8)))
    auto = Hardware.from_params(PARAMS_SELECT["hardware"])
    assert (auto.is_cpu, auto.device_memory_gb, auto.cpu_cores) == (True, 31.0, 8)
    assert Hardware.from_params({**PARAMS_SELECT["hardware"], "host_ram_gb": 12}).host_ram_gb == 12
    with pytest.raises(ValueError, match="no GPU detected"):
        Hardware.from_params({**PARAMS_SELECT["hardware"], "gpus": 2})
    with pytest.raises(ValueError, match="select.hardware.gpus"):
        Hardware.from_params({"gpus": "two"})


def test_hardware_detect_on_this_machine():
    hw = Hardware.detect()
    assert hw.host_ram_gb > 1 and hw.cpu_cores >= 1
    assert hw.device_memory_gb == (hw.host_ram_gb if hw.is_cpu else hw.gpu_memory_gb)


def test_planner_imports_without_torch():
    code = "import sys, tuneops.planner; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


# --- CLI -----------------------------------------------------------------------------------

CPU_FLAGS = ["--gpus", "0", "--host-ram-gb", "24", "--nodes", "1"]


def test_main_json_prints_the_plan(capsys):
    rc = main(["--json", "--seq-len", "256", *CPU_FLAGS],
              {**PARAMS_SELECT, "seq_len": 128, "model_path": str(CONFIGS / "gemma3-270m.json")})
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and PLAN_KEYS <= set(out)
    assert (out["method"], out["launcher"], out["seq_len"], out["fits"]) == ("lora", "python", 256, True)
    assert set(out["breakdown"]) == {"weights", "gradients", "optimizer_states", "activations", "overhead"}
    assert sum(out["breakdown"].values()) == pytest.approx(out["predicted_peak_gb_per_device"], abs=0.01)
    assert all(set(r) == {"rule", "text"} for r in out["reasons"])


def test_main_human_summary(capsys):
    rc = main(["--model", str(CONFIGS / "phi-3-medium.json"), "--gpus", "2", "--gpu-memory-gb", "40",
               "--host-ram-gb", "256", "--method", "full"])
    out = capsys.readouterr().out
    assert rc == 0
    for text in ("method        full", "ZeRO          stage 3", "launcher      deepspeed", "optimizer_states",
                 "fits", "[R10-zero-stage]"):
        assert text in out


def test_main_forced_infeasible_method_is_one_line_error(capsys):
    rc = main(["--model", str(CONFIGS / "llama-2-7b.json"), "--gpus", "1", "--gpu-memory-gb", "24",
               "--host-ram-gb", "32", "--method", "full"], PARAMS_SELECT)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith("tuneops plan: error: full fine-tuning of llama-2-7b does not fit") and "qlora" in err


GEMMA = str(CONFIGS / "gemma3-270m.json")


@pytest.mark.parametrize("argv", [["--model", GEMMA, "--minimize", "fast"], ["--model", "/nonexistent"],
                                  ["--model", GEMMA, "--seq-len", "0"], ["--model", GEMMA, "--scenario", "poetry"], []])
def test_main_invalid_input_is_one_line_error(argv, capsys):
    rc = main([*argv, *CPU_FLAGS])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("tuneops plan: error: ") and err.count("\n") == 1


def test_main_explain(capsys):
    assert main(["--explain"]) == 0
    assert "R10-zero-stage" in capsys.readouterr().out


# --- forced ZeRO stage / offload, CPU processes ----------------------------------------------

def test_forced_zero_stage_and_cpu_processes():
    """select.zero_stage / select.offload / hardware.cpu_processes: what the train stage's
    multi-process CPU runs (gloo) are planned from."""
    m = spec("gemma3-270m")
    hw = Hardware(host_ram_gb=24, cpu_processes=2)
    assert hw.world_size == 2 and hw.device_memory_gb == 12
    p = make_plan(m, hw, 256, Goals(method="full", zero_stage=3))
    assert (p.method, p.zero_stage, p.launcher, p.nproc_per_node) == ("full", 3, "deepspeed", 2)
    assert p.micro_batch_size * p.grad_accum * p.world_size == p.global_batch_size
    assert any("forced by select.zero_stage=3" in r["text"] for r in p.reasons)
    p = make_plan(m, hw, 256, Goals(method="full", zero_stage=2, offload="optimizer"))
    assert (p.zero_stage, p.offload) == (2, {"optimizer": True, "params": False})
    # on a CPU node the offloaded states share the same RAM: they count against the device
    assert p.predicted_peak_gb_per_device + p.estimate.host_gb <= p.usable_gb_per_device
    assert make_plan(m, hw, 256, Goals()).zero_stage == 0   # auto on CPU: plain DDP (torchrun)
    assert make_plan(m, hw, 256, Goals()).launcher == "torchrun"
    with pytest.raises(ValueError, match="select.offload: parameter offload needs select.zero_stage 3"):
        Goals(zero_stage=2, offload="optimizer+params")
    with pytest.raises(ValueError, match="select.zero_stage"):
        Goals(zero_stage=4)
    with pytest.raises(PlanError, match="does not fit"):
        make_plan(m, Hardware(host_ram_gb=4, cpu_processes=2), 256, Goals(method="full", zero_stage=1))
