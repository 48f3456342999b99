"""Predicted peak memory per training device: explicit arithmetic, every constant named.

Notation: Ψ total parameters, Φ trainable (PEFT) parameters, N data-parallel devices, L layers,
h hidden size, a attention heads, q = a*head_dim, kv = kv_heads*head_dim, I intermediate size,
V vocabulary, b micro-batch, s sequence length, w bytes per compute-precision value (2 for
bf16/fp16, 4 for fp32).

Model states (Rajbhandari et al. 2020, "ZeRO", section 3.1 and 5):
  full fine-tuning, mixed precision Adam: weights 2Ψ + gradients 2Ψ + optimizer KΨ, K = 12
  (fp32 master weights, momentum, variance); fp32 training: 4Ψ + 4Ψ + 8Ψ.
  ZeRO stage 1 divides the optimizer states by N, stage 2 also the gradients, stage 3 also the
  weights (plus a gathered working set of ``zero3_live_layers`` layers). Optimizer offload moves the
  optimizer states to host RAM, parameter offload (stage 3) the weight shards.
PEFT (LoRA, QLoRA, DoRA, IA3, prompt tuning): the base is frozen (weights only, no gradients or
  optimizer states), stored in compute precision, or for QLoRA (Dettmers et al. 2023) its linear
  layers in NF4 with double quantization: 4 bits + one 8-bit absmax per 64 weights + one fp32
  constant per 256 absmax values = 4 + 8/64 + 32/(64*256) = 4.127 bits/param; embeddings,
  lm_head and norms stay in compute precision. Trainable parameters Φ are fp32: 4Φ weights,
  4Φ gradients, 8Φ Adam moments.
  LoRA Φ = L * Σ_modules r*(d_in + d_out); DoRA adds the magnitude vector, L * Σ d_out.
Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 1 without
  tensor/sequence parallelism) per token per layer in 16-bit: 34h + 5as. Written per term so
  grouped-query attention, gated MLPs and extra norms are counted:
    attention 3h + 4q + 4kv            (11h when q = kv = h)
    scores    e*a*s                    (e = 5 for eager attention; 0 for SDPA/flash kernels, which
                                        keep no s x s tensor: the transformers default)
    MLP       3h + m*I                 (m = 4 for a GeLU MLP: 19h at I = 4h; m = 8 for SwiGLU/GeGLU,
                                        which also keeps the gate, up and product tensors)
    norms     n*(4h) (+ 4(q + kv) for q/k norms)   (Megatron's fused LayerNorm keeps 2h; the unfused
                                        HF RMSNorm keeps its input and normalized output)
  With e = 5, m = 4, two norms at 2h each this is exactly 34h + 5as. Scaled by w/2 for fp32. LoRA adds
  w*(d_in + r) per target module (dropout output and lora_A output); DoRA also w*d_out (base output
  kept for the magnitude scaling) and, transiently, ``dora_weight_copies`` fp32 d_out x d_in matrices
  of its largest module for the weight norm.
  Gradient checkpointing keeps each layer's input (2h per token in 16-bit) plus one layer's full
  activations during recompute.
  Logits (causal LM head): b*s*V values at 12 bytes each: fp32 log-softmax output saved by the loss,
  the dense fp32 gradient of the NLL and the fp32 gradient of the logits are alive together when
  backward starts (measured 11.9 bytes/value for Gemma 3 270M on CPU; the 16-bit logits and their
  fp32 upcast are freed before backward). Gemma 3's 262,144-token vocabulary makes this dominant.
Overhead: CUDA context and allocator on a GPU; on CPU the baseline RSS of torch + transformers.
The terms are summed: a conservative peak (gradients and activations do not all peak together).

Check against measurement (peak RSS of 2 training steps, randomly initialised Gemma 3 270M shape,
LoRA r=8 on q/k/v/o, fp32, SDPA, seq 256, 2-core CPU, 2026-11-28): micro-batch 4 predicted 6.21 GiB,
measured 6.27; with the vocabulary cut to 1,024: micro 1 1.39 vs 1.30, micro 4 2.60 vs 2.68.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .model import ModelSpec

GIB = 2**30


@dataclass(frozen=True)
class MemoryModelConstants:
    """Every constant of the memory model; override any of them to calibrate against measurements."""

    adam_k_mixed: float = 12.0          # ZeRO K: fp32 master copy + momentum + variance, bytes/param
    adam_k_fp32: float = 8.0            # fp32 training: momentum + variance (weights are the master)
    adapter_bytes: float = 4.0          # trainable PEFT parameters are kept in fp32
    adapter_grad_bytes: float = 4.0
    adapter_adam_bytes: float = 8.0
    nf4_bits_per_param: float = 4 + 8 / 64 + 32 / (64 * 256)   # = 4.127 (NF4 + double quantization)
    attention_score_bytes: float = 0.0  # Korthikanti's 5as for eager attention; SDPA/flash keep none
    mlp_factor_gated: float = 8.0       # SwiGLU: gate, up, act(gate), product: 2 bytes each per I
    mlp_factor_plain: float = 4.0       # GeLU MLP: GeLU input + fc2 input: 2 bytes each per I
    norm_bytes: float = 4.0             # per normalized value: input + output in 16-bit (fused LN: 2)
    checkpoint_bytes_per_hidden: float = 2.0   # 16-bit layer input kept per layer when recomputing
    logits_bytes: float = 12.0          # fp32 log-softmax output + NLL gradient + logits gradient
    zero3_live_layers: int = 2          # gathered layer working set at stage 3 (current + prefetch)
    dora_weight_copies: int = 2         # transient B@A and W + B@A (fp32) of the largest DoRA module
    prompt_virtual_tokens: int = 20     # prompt tuning: learned tokens prepended to every sequence
    cuda_context_gb: float = 0.8        # CUDA context + cuBLAS workspace + allocator slack (0.5-1 GB)
    cpu_baseline_gb: float = 0.6        # RSS of a process that imported torch + transformers


@dataclass(frozen=True)
class Setup:
    """One training configuration to price. ``targets`` are resolved module names (LoRA/DoRA)."""

    method: str
    compute_bytes: int
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    micro_batch: int = 1
    checkpointing: bool = False
    world_size: int = 1
    seq_len: int = 512
    task_head: str = "causal_lm"
    lora_r: int = 8
    targets: tuple[str, ...] = ()
    on_gpu: bool = True


@dataclass(frozen=True)
class Estimate:
    """Per-device GiB by category; ``host_gb`` is what offload puts in host RAM per process."""

    weights: float
    gradients: float
    optimizer_states: float
    activations: float
    overhead: float
    logits: float
    host_gb: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.overhead

    def breakdown(self) -> dict[str, float]:
        d = asdict(self)
        return {k: round(d[k], 3) for k in ("weights", "gradients", "optimizer_states", "activations", "overhead")}


def trainable_params(model: ModelSpec, setup: Setup, c: MemoryModelConstants) -> int:
    """Φ: full = Ψ; LoRA/QLoRA = L·Σ r(d_in+d_out); DoRA adds L·Σ d_out; IA3 = L·(2kv + I)
    (rescaling vectors for keys, values and the FFN input, Liu et al. 2022); prompt tuning =
    virtual tokens × h."""
    if setup.method == "full":
        return model.params
    if setup.method == "ia3":
        return model.layers * (2 * model.kv_heads * model.head_dim + model.intermediate)
    if setup.method == "prompt_tuning":
        return c.prompt_virtual_tokens * model.hidden
    dims = [model.modules[t] for t in setup.targets]
    lora = model.layers * sum(setup.lora_r * (i + o) for i, o in dims)
    return lora + (model.layers * sum(o for _, o in dims) if setup.method == "dora" else 0)


def model_state_bytes(model: ModelSpec, setup: Setup, c: MemoryModelConstants) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes for one replica, before ZeRO partitioning."""
    w, psi = setup.compute_bytes, model.params
    if setup.method == "full":
        k = c.adam_k_mixed if w == 2 else c.adam_k_fp32
        return w * psi, w * psi, k * psi
    phi = trainable_params(model, setup, c)
    linear_bytes = c.nf4_bits_per_param / 8 if setup.method == "qlora" else w
    frozen = model.linear_params * linear_bytes + (psi - model.linear_params) * w
    return frozen + c.adapter_bytes * phi, c.adapter_grad_bytes * phi, c.adapter_adam_bytes * phi


def activation_bytes(model: ModelSpec, setup: Setup, c: MemoryModelConstants) -> tuple[float, float]:
    """(activations incl. logits, logits) in bytes for one micro-batch; see the module docstring."""
    h, q, kv = model.hidden, model.heads * model.head_dim, model.kv_heads * model.head_dim
    s = setup.seq_len + (c.prompt_virtual_tokens if setup.method == "prompt_tuning" else 0)
    tokens, scale = setup.micro_batch * s, setup.compute_bytes / 2
    mlp_factor = c.mlp_factor_plain if model.is_encoder else c.mlp_factor_gated
    norms = c.norm_bytes * (model.norms_per_layer * h + (q + kv if model.qk_norm else 0))
    per_token_layer = scale * ((3 * h + 4 * q + 4 * kv) + c.attention_score_bytes * model.heads * s
                               + (3 * h + mlp_factor * model.intermediate) + norms)
    dims = [model.modules[t] for t in setup.targets]
    # LoRA keeps dropout(x) for lora_A and lora_A's r outputs; DoRA also keeps the base output.
    per_token_layer += setup.compute_bytes * sum(i + setup.lora_r for i, _ in dims)
    if setup.method == "dora":
        per_token_layer += setup.compute_bytes * sum(o for _, o in dims)
    if setup.checkpointing:
        layers = model.layers * scale * c.checkpoint_bytes_per_hidden * h * tokens + per_token_layer * tokens
    else:
        layers = model.layers * per_token_layer * tokens
    if setup.method == "dora" and dims:
        layers += c.dora_weight_copies * 4 * max(i * o for i, o in dims)
    outputs = {"causal_lm": tokens * model.vocab, "token_classification": tokens * model.num_labels,
               "sequence_classification": setup.micro_batch * model.num_labels}[setup.task_head]
    logits = c.logits_bytes * outputs
    return layers + logits, logits


def estimate(model: ModelSpec, setup: Setup, c: MemoryModelConstants | None = None) -> Estimate:
    """Per-device peak: ZeRO partitioning and offload applied to the model states, plus
    activations and overhead."""
    c = c or MemoryModelConstants()
    weights, grads, optim = model_state_bytes(model, setup, c)
    n = setup.world_size
    host = 0.0
    if setup.zero_stage >= 1:
        optim /= n
    if setup.zero_stage >= 2:
        grads /= n
    if setup.zero_stage == 3:
        live = c.zero3_live_layers * model.layer_params * setup.compute_bytes
        weights = weights / n
        if setup.offload_params:
            host, weights = host + weights, 0.0
        weights += live
    if setup.offload_optimizer:
        host, optim = host + optim, 0.0
    acts, logits = activation_bytes(model, setup, c)
    overhead = c.cuda_context_gb if setup.on_gpu else c.cpu_baseline_gb
    return Estimate(weights / GIB, grads / GIB, optim / GIB, acts / GIB, overhead, logits / GIB, host / GIB)
