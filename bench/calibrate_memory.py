"""Calibrate the memory planner (``tuneops.planner``) against real training steps.

For every case (model x method x ZeRO stage x processes x micro-batch x seq_len x checkpointing x
offload) this script

1. prices the case with the planner's public API: ``estimate(ModelSpec, Setup(...))`` with a
   ``Setup`` written out explicitly (the rules do not pick anything), and
2. runs ``--steps`` real optimizer steps (default 2: the first allocates the Adam states) of that
   configuration in a fresh subprocess, with random weights (``AutoModelForCausalLM.from_config``),
   fused AdamW (the HF Trainer default with torch >= 2.8) and random token ids as labels:
   ``python`` for one process at ZeRO 0; ``torchrun --nproc_per_node N`` with
   ``deepspeed.initialize`` (gloo on CPU) for ZeRO 1-3, offload, and ZeRO 0 with N > 1 (data
   parallel); ZeRO-3 models are built through Hugging Face's ZeRO-3 path (an ``HfDeepSpeedConfig``
   alive, so ``from_config`` runs under ``deepspeed.zero.Init``); train batch = micro x 1 x N,
3. measures the peak and prints predicted vs measured GiB, the relative error
   ``(predicted - measured) / measured``, the worst error and how many rows are within +-15%.

What "per-device peak" means here
---------------------------------
CPU (``--device cpu``): a training process is a device. The measurement is the peak resident set
size of each rank over the training window (``VmHWM`` from ``/proc/self/status``, after the peak
was reset with ``echo 5 > /proc/self/clear_refs`` once the model, the PEFT wrapper, the optimizer
and the DeepSpeed engine exist and ``malloc_trim(0)`` gave back what building them freed). Nothing
is subtracted: the window peak includes the interpreter, torch, transformers, peft, deepspeed
and every tensor. The window excludes construction only: building a random fp32 model and then
quantizing it (QLoRA) or flattening it (ZeRO 1/2) has a transient that a real ``from_pretrained``
load does not have. The lifetime peak (construction included) is reported as well, and each rank's
JSON splits every step into forward+backward and optimizer-step peaks. The per-device value
is the largest rank. Shared pages (libraries) count in every rank's RSS, as ``cpu_baseline_gb``
assumes. On CPU the "host" is the same RAM, so offloaded states stay in the process RSS: the
compared prediction is ``estimate.total + estimate.host_gb``.

GPU (``--device cuda``): ``torch.cuda.max_memory_allocated`` over the same window (reset with
``torch.cuda.reset_peak_memory_stats``). The allocator statistics do not include the CUDA context
or cuBLAS workspaces, so the compared prediction is ``estimate.total - estimate.overhead``
(``cuda_context_gb`` is not part of the allocator's count); ``max_memory_reserved`` is also
reported. Precision follows the planner's GPU rule: bf16 compute (compute_bytes 2); full
fine-tuning at ZeRO 0 runs torch AMP (fp32 weights 4 + fp32 grads 4 + Adam 8 = the same 16 bytes
per parameter as the planner's 2 + 2 + 12), DeepSpeed rows run ``bf16.enabled``.

DeepSpeed settings: a client ``torch.optim.AdamW(fused=True)`` (no FusedAdam/CPUAdam JIT build; with
optimizer offload ``zero_force_ds_cpu_optimizer: false``), bucket sizes as the Hugging Face
integration's ``"auto"`` values (``reduce_bucket_size = hidden^2``,
``stage3_prefetch_bucket_size = 0.9 hidden^2``, ``stage3_param_persistence_threshold = 10 hidden``),
since DeepSpeed's own defaults (5e8 elements) would add a 2 GB fp32 bucket at ZeRO 2. On CPU
the shared-memory communication op (``deepspeed_shm_comm``) is switched off: training collectives
go through ``torch.distributed`` (gloo) anyway, and that op only serves inference all-reduce.

Usage::

    .venv/bin/python bench/calibrate_memory.py            # full CPU table (14-18 min on 2 cores)
    .venv/bin/python bench/calibrate_memory.py --quick    # 4-row subset (~2-3 min)
    .venv/bin/python bench/calibrate_memory.py --device cuda   # GPU table (bench/gpu_calibrate.sh)

Exit status: 0 when every row that ran is within the tolerance, 1 otherwise, 2 if a case failed
to run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tuneops.io import free_port  # noqa: E402
from tuneops.planner import Estimate, MemoryModelConstants, ModelSpec, Setup, estimate  # noqa: E402

GIB = 2**30
TOLERANCE = 0.15
SCRATCH = ROOT / ".tuneops" / "bench"
TORCH_EXTENSIONS = ROOT / ".tuneops" / "torch-extensions"
MODEL_CONFIGS = {
    "tiny": ROOT / "bench" / "configs" / "tiny-gemma3.json",
    "gemma3-270m": ROOT / "tests" / "fixtures" / "model_configs" / "gemma3-270m.json",
    "gemma3-1b": ROOT / "bench" / "configs" / "gemma3-1b.json",
    "smollm2-135m": ROOT / "bench" / "configs" / "smollm2-135m.json",   # the default model's config.json
}
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")}


@dataclass(frozen=True)
class Case:
    """One deliberate training configuration."""

    model: str
    method: str
    zero: int = 0
    nproc: int = 1
    micro: int = 1
    seq: int = 128
    ckpt: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    objective: str = "sft"        # tuneops/training/objectives.py; a pair objective (dpo) runs TRL's step
    reference: str = "start"      # pair objectives: start | precomputed (no reference forward in the step)

    @property
    def pairs(self) -> bool:
        from tuneops.training import objectives

        return objectives.get(self.objective).pairs

    @property
    def name(self) -> str:
        extra = ("+ckpt" if self.ckpt else "") + ("+offopt" if self.offload_optimizer else "") \
            + ("+offparam" if self.offload_params else "") \
            + (f"+{self.objective}" if self.objective != "sft" else "") \
            + ("+precomp" if self.pairs and self.reference == "precomputed" else "")
        return f"{self.model} {self.method} z{self.zero} n{self.nproc} b{self.micro} s{self.seq}{extra}"

    @property
    def uses_deepspeed(self) -> bool:
        return self.zero > 0 or self.nproc > 1 or self.offload_optimizer or self.offload_params


def _c(model: str, method: str, **kw: Any) -> Case:
    return Case(model=model, method=method, **kw)


# Pair objectives (issue 33), single process: TRL 1.16's DPO step (chosen + rejected in one batch of 2 x micro,
# its fused LM head, the reference forward after the policy's) for LoRA (reference = adapter disabled), full
# (a frozen copy) and precomputed log-probs (no reference forward), on the default SmolLM2 shape and Gemma 3 270M.
DPO_CASES = [
    _c("smollm2-135m", "lora", seq=512, micro=4),      # the SFT step on the same tokens as the b2 pair rows
    _c("smollm2-135m", "full", seq=512, micro=2),
    _c("tiny", "lora", objective="dpo"),
    _c("smollm2-135m", "lora", objective="dpo", seq=512, micro=2),
    _c("smollm2-135m", "full", objective="dpo", seq=512),
    _c("smollm2-135m", "lora", objective="dpo", seq=512, micro=2, reference="precomputed"),
    _c("gemma3-270m", "lora", objective="dpo", seq=256, micro=2),
    _c("gemma3-270m", "full", objective="dpo"),
    _c("gemma3-270m", "qlora", objective="dpo"),
]
# ~15 minutes on the 2-core CPU (+ ~5 for the DPO rows) (14-18 min measured, other jobs running): the 270M shape single-process for
# every method, the ZeRO ladder with 2 ranks for full fine-tuning on the tiny model, ZeRO 1-3 for
# full and ZeRO-3 for LoRA on 270M, optimizer offload at ZeRO 2 and 3.
CPU_CASES = [
    _c("tiny", "full"),
    _c("tiny", "lora"),
    _c("gemma3-270m", "full"),
    _c("gemma3-270m", "lora"),
    _c("gemma3-270m", "lora", micro=2, ckpt=True),
    _c("gemma3-270m", "dora"),
    _c("gemma3-270m", "qlora"),
    *[_c("tiny", "full", zero=z, nproc=2) for z in (0, 1, 2, 3)],
    _c("tiny", "lora", zero=3, nproc=2),
    *[_c("gemma3-270m", "full", zero=z, nproc=2) for z in (1, 2, 3)],
    _c("gemma3-270m", "lora", zero=3, nproc=2),
    _c("gemma3-270m", "full", zero=2, nproc=2, offload_optimizer=True),
    _c("gemma3-270m", "full", zero=3, nproc=2, offload_optimizer=True),
    *DPO_CASES,
]
QUICK_CASES = [
    _c("tiny", "full"),
    _c("tiny", "lora"),
    _c("tiny", "full", zero=2, nproc=2),
    _c("gemma3-270m", "lora"),
]
# One H100 (80 GB): a ~1B Gemma 3 shape with random weights; ZeRO rows run 1 rank (what the
# planner recommends on one GPU: stage 0, else ZeRO-Offload, else stage 3 + parameter offload).
GPU_CASES = [
    _c("gemma3-270m", "full", seq=512, micro=2),
    _c("gemma3-1b", "full", seq=512, micro=1),
    _c("gemma3-1b", "lora", seq=512, micro=2),
    _c("gemma3-1b", "lora", seq=512, micro=4),
    _c("gemma3-1b", "lora", seq=1024, micro=4, ckpt=True),
    _c("gemma3-1b", "dora", seq=512, micro=2),
    _c("gemma3-1b", "qlora", seq=512, micro=2),
    _c("gemma3-1b", "full", seq=512, micro=1, zero=2, offload_optimizer=True),
    _c("gemma3-1b", "full", seq=512, micro=1, zero=3),
]
GPU_QUICK_CASES = [GPU_CASES[1], GPU_CASES[2]]  # 1B full (AMP) and LoRA: need no deepspeed/bitsandbytes


# --- prediction ------------------------------------------------------------------------------

def model_spec(model: str) -> ModelSpec:
    return ModelSpec.from_path(MODEL_CONFIGS[model])


def setup_for(case: Case, device: str) -> Setup:
    """The planner's Setup for ``case``, written out field by field."""
    spec = model_spec(case.model)
    peft = case.method in ("lora", "qlora", "dora")
    return Setup(
        method=case.method, compute_bytes=4 if device == "cpu" else 2, zero_stage=case.zero,
        offload_optimizer=case.offload_optimizer, offload_params=case.offload_params,
        micro_batch=case.micro, checkpointing=case.ckpt, world_size=case.nproc, seq_len=case.seq,
        task_head="causal_lm", lora_r=LORA["r"], objective=case.objective, reference=case.reference,
        targets=tuple(spec.resolve_targets(LORA["target_modules"])) if peft else (),
        on_gpu=device != "cpu")


def predict(case: Case, device: str, constants: MemoryModelConstants | None = None) -> tuple[float, Estimate]:
    """(compared prediction in GiB, the planner's Estimate); see the module docstring."""
    est = estimate(model_spec(case.model), setup_for(case, device), constants)
    if device == "cpu":
        return est.total + est.host_gb, est
    return est.total - est.overhead, est


# --- the worker: runs inside the subprocess (one per rank) ------------------------------------

def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(device: str) -> None:
    import ctypes
    import gc

    import torch

    gc.collect()
    if device == "cpu":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    else:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _current(device: str) -> float:
    """Resident (CPU) or allocated (CUDA) GiB now."""
    import torch

    return _status_kb("VmRSS") * 1024 / GIB if device == "cpu" else torch.cuda.memory_allocated() / GIB


def _segment_peak(device: str) -> float:
    """Peak GiB since the last reset, then reset the peak to the current value."""
    import torch

    if device == "cpu":
        peak = _status_kb("VmHWM") * 1024 / GIB
        Path("/proc/self/clear_refs").write_text("5")
    else:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GIB
        torch.cuda.reset_peak_memory_stats()
    return peak


def _hf_config(model: str, dtype: Any) -> Any:
    from transformers import AutoConfig

    raw = json.loads(MODEL_CONFIGS[model].read_text())
    kw = {k: v for k, v in raw.items() if not k.startswith("_") and k not in ("architectures", "model_type",
                                                                                "torch_dtype")}
    cfg = AutoConfig.for_model(raw["model_type"], **kw)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    cfg.dtype = dtype
    return cfg


def _quantize_linears(model: Any, compute_dtype: Any, device: str) -> int:
    """QLoRA base: every per-layer nn.Linear becomes a bitsandbytes NF4 Linear4bit with double
    quantization (what ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))`` does; lm_head and embeddings
    stay). Returns the number of quantized modules."""
    import bitsandbytes as bnb
    import torch

    n = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if not isinstance(mod, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                      compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                      device="meta")
                q.weight = bnb.nn.Params4bit(mod.weight.data.detach().to(compute_dtype), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4").to(device)
                if mod.bias is not None:
                    q.bias = torch.nn.Parameter(mod.bias.data, requires_grad=False)
                # The CPU AVX512-BF16 repacking path has no autograd (stack-on-cpu.md): keep it off.
                q.support_avx512bf16_for_cpu = False
                setattr(parent, name, q)
                del mod
                n += 1
    return n


def _ds_config(case: Case, device: str, hidden: int) -> dict[str, Any]:
    zero: dict[str, Any] = {
        "stage": case.zero, "reduce_bucket_size": hidden * hidden, "allgather_bucket_size": hidden * hidden,
        "overlap_comm": False, "contiguous_gradients": True,
    }
    if case.zero == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                    stage3_param_persistence_threshold=10 * hidden, stage3_max_live_parameters=int(1e9))
    if case.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device != "cpu"}
    if case.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device != "cpu"}
    return {
        "train_micro_batch_size_per_gpu": case.micro, "gradient_accumulation_steps": 1,
        "train_batch_size": case.micro * case.nproc, "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False, "bf16": {"enabled": device != "cpu"},
        "gradient_clipping": 0.0, "steps_per_print": 10**9, "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def _pair_loss(model: Any, ref_model: Any, ids: Any, case: Case, on_cpu: bool) -> Any:
    """TRL 1.16 ``DPOTrainer._compute_loss`` in memory terms: the policy's fused forward on [chosen;
    rejected] (second half of each row is the completion), then the reference's under ``no_grad``
    (a PEFT policy with its adapter disabled, or the frozen copy) while the policy's activations
    are alive; precomputed: reference log-probs are inputs (zeros here)."""
    import torch
    import torch.nn.functional as F

    mask = torch.zeros_like(ids)
    mask[:, case.seq // 2:] = 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not on_cpu):
        out = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
        chosen, rejected = out.log_probs.sum(dim=1).chunk(2)
        if case.reference == "precomputed":
            ref_chosen = ref_rejected = torch.zeros_like(chosen)
        else:
            with torch.no_grad():
                if ref_model is None:
                    with model.disable_adapter():
                        ref = model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
                else:
                    ref = ref_model(input_ids=ids, labels=labels, fused_lm_head=True, use_cache=False)
            ref_chosen, ref_rejected = ref.log_probs.sum(dim=1).chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        return -F.logsigmoid(0.1 * margin).mean()


def params_mmap_threshold() -> int:
    """params.yaml's ``train.cpu_mmap_threshold``: what CPU training sets (loop.cap_heap_retention)."""
    import yaml

    return int(yaml.safe_load((ROOT / "params.yaml").read_text())["train"].get("cpu_mmap_threshold", 0))


def worker(case: Case, device: str, steps: int, out_dir: Path, mmap_threshold: int = 0) -> None:
    """Build the model for ``case``, run ``steps`` optimizer steps, write ``rank<r>.json``."""
    import resource

    import torch

    from tuneops.training.loop import cap_heap_retention

    if device == "cpu":        # as the training loop does on CPU
        cap_heap_retention(mmap_threshold)

    rank = int(os.environ.get("RANK", "0"))
    t0 = time.time()
    torch.manual_seed(1234 + rank)
    on_cpu = device == "cpu"
    dev = torch.device("cpu") if on_cpu else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not on_cpu:
        torch.cuda.set_device(dev)
    compute = torch.float32 if on_cpu else torch.bfloat16
    peft_method = case.method in ("lora", "qlora", "dora")
    # Parameter dtype: fp32 on CPU; on GPU bf16 for a frozen PEFT base and for DeepSpeed (it casts
    # to bf16 anyway), fp32 master weights for full fine-tuning under torch AMP at ZeRO 0.
    amp_full = not on_cpu and case.method == "full" and not case.uses_deepspeed
    param_dtype = torch.float32 if on_cpu or amp_full else torch.bfloat16
    cfg = _hf_config(case.model, param_dtype)

    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(cfg)]  # import the modeling module now, not inside zero.Init
    if peft_method:
        import peft  # noqa: F401  (imports bitsandbytes and torch._dynamo: also not inside zero.Init)
    ds_cfg = None
    if case.uses_deepspeed:
        import deepspeed

        if on_cpu:
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
        ds_cfg = _ds_config(case, device, cfg.hidden_size)
    if case.zero == 3:
        # Hugging Face's ZeRO-3 path: with an HfDeepSpeedConfig alive, from_config builds the model
        # under deepspeed.zero.Init (partitioned as created) and initialises the weights with the
        # partitions gathered (a bare zero.Init around from_config fails in _init_weights).
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841  (must stay referenced)
        model = AutoModelForCausalLM.from_config(cfg, dtype=param_dtype)
    else:
        with dev:
            model = AutoModelForCausalLM.from_config(cfg, dtype=param_dtype)
    model.config.use_cache = False
    marks = {"built": _current(device)}
    ref_model = None
    if case.pairs:
        if case.uses_deepspeed:
            raise SystemExit("pair objectives are calibrated single-process at ZeRO 0 only")
        # What TRL 1.16's DPOTrainer does to the policy (before PEFT wraps it) and to a separate reference:
        # forward(..., fused_lm_head=True) returns per-token log-probs, the logits only ever exist in tiles.
        from trl.trainer.utils import add_fused_lm_head

        if case.method == "full" and case.reference != "precomputed":
            import copy

            ref_model = copy.deepcopy(model).eval().requires_grad_(False)   # preference.build_models' frozen copy
            add_fused_lm_head(ref_model)
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    n_quant = _quantize_linears(model, compute, str(dev)) if case.method == "qlora" else 0
    if case.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft_method:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
            target_modules=list(LORA["target_modules"]), use_dora=case.method == "dora", task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainable)
    n_total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    # The project trains with the HF Trainer, whose default optimizer with torch >= 2.8 is
    # "adamw_torch_fused": torch.optim.AdamW(fused=True), on CPU as well as on CUDA.
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    engine = None
    if case.uses_deepspeed:
        engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    marks["engine"] = _current(device)
    lifetime_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    gen = torch.Generator().manual_seed(7 + rank)
    rows = 2 * case.micro if case.pairs else case.micro      # a pair objective: chosen and rejected in one batch
    batches = [torch.randint(3, cfg.vocab_size, (rows, case.seq), generator=gen).to(dev) for _ in range(steps)]
    _reset_peak(device)
    start = _current(device)
    t1 = time.time()
    losses, grads_seen, phases = [], 0, []
    for ids in batches:
        # Two segments per step, each with its own peak (the window peak is their maximum):
        # forward + backward (DeepSpeed: incl. gradient reduction), then the optimizer step.
        if engine is not None:
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            if peft_method and engine.zero_optimization_stage() < 2:
                grads_seen = sum(p.grad is not None for p in trainable)
            fwd_bwd = _segment_peak(device)
            engine.step()
        elif case.pairs:
            loss = _pair_loss(model, ref_model, ids, case, on_cpu)
            loss.backward()
            grads_seen = sum(p.grad is not None for p in trainable)
            fwd_bwd = _segment_peak(device)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not on_cpu):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads_seen = sum(p.grad is not None for p in trainable)
            fwd_bwd = _segment_peak(device)
            opt.step()
            opt.zero_grad(set_to_none=True)
        phases.append({"fwd_bwd_gib": fwd_bwd, "step_gib": _segment_peak(device)})
        losses.append(float(loss.detach().float()))
    if not on_cpu:
        torch.cuda.synchronize()
    result = {
        "case": dataclasses.asdict(case), "rank": rank, "device": device,
        "peak_window_gib": max(max(ph.values()) for ph in phases), "phases": phases,
        "reserved_window_gib": None if on_cpu else torch.cuda.max_memory_reserved() / GIB,
        "start_gib": start, "marks_gib": marks,
        # ru_maxrss before the window (construction) or the window peak, whichever is larger
        "lifetime_rss_gib": max(lifetime_before_kb * 1024 / GIB, max(max(ph.values()) for ph in phases))
        if on_cpu else None,
        "losses": losses, "trainable_params": n_trainable, "total_params": n_total,
        "trainable_with_grad": grads_seen, "trainable_tensors": len(trainable), "quantized_modules": n_quant,
        "build_s": round(t1 - t0, 1), "step_s": round((time.time() - t1) / steps, 2),
        "threads": torch.get_num_threads(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    if case.uses_deepspeed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


# --- the driver ------------------------------------------------------------------------------

def _env(case: Case, device: str) -> dict[str, str]:
    env = dict(os.environ)
    tmp = SCRATCH / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    TORCH_EXTENSIONS.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    env.update({
        "OMP_NUM_THREADS": str(max(1, cores // case.nproc)) if device == "cpu" else env.get("OMP_NUM_THREADS", "4"),
        "TORCH_EXTENSIONS_DIR": str(TORCH_EXTENSIONS), "TMPDIR": str(tmp),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "true",
        "HF_HOME": str(SCRATCH / "hf"), "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])),
        "TRITON_CACHE_DIR": str(SCRATCH / "triton"),
    })
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def missing_packages(case: Case) -> list[str]:
    """Packages ``case`` needs that are not importable here (the GPU image may lack some)."""
    import importlib.util

    need = ["torch", "transformers"]
    need += ["peft"] if case.method in ("lora", "qlora", "dora") else []
    need += ["bitsandbytes"] if case.method == "qlora" else []
    need += ["deepspeed"] if case.uses_deepspeed else []
    need += ["trl"] if case.pairs else []
    return [n for n in need if importlib.util.find_spec(n) is None]


def run_case(case: Case, device: str, steps: int, timeout: float, runs: Path | None = None,
             mmap_threshold: int | None = None) -> dict[str, Any]:
    """Run ``case`` in a fresh subprocess; returns the per-rank results and the per-device peak.
    Per-rank JSON and the log go to ``runs`` (default ``.tuneops/bench/runs/<device>-<pid>``)."""
    runs = runs or SCRATCH / "runs" / f"{device}-{os.getpid()}"
    out_dir = runs / f"{case.name.replace(' ', '_')}"
    shutil.rmtree(out_dir, ignore_errors=True)
    args = ["--worker", json.dumps(dataclasses.asdict(case)), "--device", device, "--steps", str(steps),
            "--out", str(out_dir),
            "--mmap-threshold", str(params_mmap_threshold() if mmap_threshold is None else mmap_threshold)]
    script = str(Path(__file__).resolve())
    if case.uses_deepspeed:  # torchrun, from whichever interpreter runs this script
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(case.nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    else:
        cmd = [sys.executable, script, *args]
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(case, device), capture_output=True, text=True, timeout=timeout)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(case.nproc)
             if (out_dir / f"rank{r}.json").is_file()]
    log = out_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"$ {' '.join(cmd)}\nrc={proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if len(ranks) != case.nproc:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{case.name}: rc={proc.returncode}, {len(ranks)}/{case.nproc} ranks reported "
                           f"(log {log})\n{tail}")
    peak = max(r["peak_window_gib"] for r in ranks)
    return {"ranks": ranks, "measured_gib": peak, "wall_s": round(time.time() - t, 1), "rc": proc.returncode,
            "log": str(log)}


def calibrate(cases: list[Case], device: str, steps: int = 2, timeout: float = 900.0,
              constants: MemoryModelConstants | None = None, echo: bool = False,
              runs: Path | None = None, mmap_threshold: int | None = None) -> list[dict[str, Any]]:
    """Predict and measure every case; returns one row per case (``error`` set if it failed)."""
    rows = []
    for case in cases:
        pred, est = predict(case, device, constants)
        row: dict[str, Any] = {"case": case.name, "predicted_gib": pred, "breakdown": est.breakdown(),
                               "logits_gib": est.logits, "host_gib": est.host_gb}
        missing = missing_packages(case)
        if missing:
            row["skipped"] = f"not installed: {', '.join(missing)}"
            rows.append(row)
            if echo:
                print(format_row(row), flush=True)
            continue
        try:
            row.update(run_case(case, device, steps, timeout, runs, mmap_threshold))
            row["rel_error"] = (pred - row["measured_gib"]) / row["measured_gib"]
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            row["error"] = str(exc)
        rows.append(row)
        if echo:
            print(format_row(row), flush=True)
    return rows


HEADER = (f"| {'case':<46} | {'pred GiB':>8} | {'meas GiB':>8} | {'rel err':>7} | {'ok':>3} | {'start':>6} | "
          f"{'lifetime':>8} | {'s/step':>6} | {'wall s':>6} |")
RULE = "|" + "|".join("-" * (len(c) + 0) for c in HEADER.split("|")[1:-1]) + "|"


def format_row(row: dict[str, Any]) -> str:
    if "error" in row or "skipped" in row:
        what = "FAILED" if "error" in row else "skipped"
        return f"| {row['case']:<46} | {row['predicted_gib']:>8.3f} | {what:>8} | {'':>7} | {'':>3} | " \
               f"{'':>6} | {'':>8} | {'':>6} | {'':>6} |" + (f" {row['skipped']}" if "skipped" in row else "")
    r0 = max(row["ranks"], key=lambda r: r["peak_window_gib"])
    ok = "yes" if abs(row["rel_error"]) <= TOLERANCE else "NO"
    return (f"| {row['case']:<46} | {row['predicted_gib']:>8.3f} | {row['measured_gib']:>8.3f} | "
            f"{100 * row['rel_error']:>+6.1f}% | {ok:>3} | {r0['start_gib']:>6.2f} | "
            f"{max(r['lifetime_rss_gib'] or 0 for r in row['ranks']):>8.2f} | {r0['step_s']:>6.2f} | "
            f"{row['wall_s']:>6.1f} |")


def summary(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if "error" not in r and "skipped" not in r]
    lines = []
    if done:
        worst = max(done, key=lambda r: abs(r["rel_error"]))
        within = sum(abs(r["rel_error"]) <= TOLERANCE for r in done)
        lines.append(f"worst relative error: {100 * worst['rel_error']:+.1f}% ({worst['case']})")
        lines.append(f"within +-{100 * TOLERANCE:.0f}%: {within}/{len(done)} rows")
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines.append(f"skipped: {len(skipped)} row(s) ({'; '.join(sorted({r['skipped'] for r in skipped}))})")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines.append(f"failed to run: {len(failed)} row(s)")
        lines += [f"  {r['case']}: {r['error']}" for r in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="a 2-3 minute subset")
    p.add_argument("--only", action="append", default=[], help="run cases whose name contains this (repeatable)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per case")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--report", type=Path, help="write a markdown report (date, machine, command, table) here")
    p.add_argument("--list", action="store_true", help="list the cases with their predictions and exit")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="CPU: glibc M_MMAP_THRESHOLD in the training process (default: params.yaml "
                        "train.cpu_mmap_threshold, as training sets it; 0 = glibc's dynamic default)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(Case(**json.loads(args.worker)), args.device, args.steps, args.out, args.mmap_threshold or 0)
        return 0
    if args.device == "cuda":
        cases = GPU_QUICK_CASES if args.quick else GPU_CASES
    else:
        cases = QUICK_CASES if args.quick else CPU_CASES
    if args.only:
        pool = CPU_CASES if args.device == "cpu" else GPU_CASES
        cases = [c for c in pool if any(s in c.name for s in args.only)]
    if args.list:
        for c in cases:
            pred, est = predict(c, args.device)
            print(f"{c.name:<46} {pred:7.3f} GiB  {est.breakdown()}  logits {est.logits:.3f}  host {est.host_gb:.3f}")
        return 0
    intro = (f"memory calibration on {args.device}: {len(cases)} case(s), {args.steps} optimizer steps each; "
             f"M_MMAP_THRESHOLD {params_mmap_threshold() if args.mmap_threshold is None else args.mmap_threshold}; "
             f"prediction = {'total + host (offload stays in RAM)' if args.device == 'cpu' else 'total - overhead'}; "
             f"measured = max over ranks of "
             + ("peak RSS (VmHWM) in the training window" if args.device == "cpu"
                else "torch.cuda.max_memory_allocated"))
    print(intro)
    print(HEADER)
    print(RULE)
    t = time.time()
    rows = calibrate(cases, args.device, args.steps, args.timeout, echo=True, mmap_threshold=args.mmap_threshold)
    wall = time.time() - t
    print(summary(rows))
    print(f"total wall time {wall:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report(rows, intro, wall, argv if argv is not None else sys.argv[1:]))
    if any("error" in r for r in rows):
        return 2
    return 0 if all(abs(r["rel_error"]) <= TOLERANCE for r in rows if "rel_error" in r) else 1


def machine() -> str:
    """One line: CPU model, cores, RAM, GPU (if any), torch version."""
    import platform

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    ram = next((int(ln.split()[1]) / 2**20 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal:")), 0.0)
    out = f"{cpu}, {len(os.sched_getaffinity(0))} cores, {ram:.1f} GiB RAM, {platform.system()} {platform.release()}"
    try:
        import torch

        out += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory / GIB
            out += f", GPU {torch.cuda.get_device_name(0)} ({total:.0f} GiB)"
    except ImportError:
        pass
    return out


def report(rows: list[dict[str, Any]], intro: str, wall: float, argv: list[str]) -> str:
    """Markdown: date, machine, command, the table and the summary."""
    table = "\n".join([HEADER, RULE, *map(format_row, rows)])
    return (f"# Memory-planner calibration ({'GPU' if 'cuda' in intro.split(':')[0] else 'CPU'})\n\n"
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n- machine: {machine()}\n"
            f"- command: `python bench/calibrate_memory.py {' '.join(argv)}`\n- wall time: {wall:.0f} s\n\n"
            f"{intro}\n\n{table}\n\n```\n{summary(rows)}\n```\n")


if __name__ == "__main__":
    sys.exit(main())
