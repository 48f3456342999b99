"""Predicted peak memory per training device: explicit arithmetic, every constant named.

Notation: Ψ total parameters, Φ trainable (PEFT) parameters, N data-parallel devices, L layers,
h hidden size, a attention heads, q = a*head_dim, kv = kv_heads*head_dim, I intermediate size,
V vocabulary, b micro-batch, s sequence length, w bytes per compute-precision value (2 for
bf16/fp16, 4 for fp32).

Model states (Rajbhandari et al. 2020, "ZeRO", section 3.1 and 5):
  full fine-tuning, mixed precision Adam: weights 2Ψ + gradients 2Ψ + optimizer KΨ, K = 12
  (fp32 master weights, momentum, variance); fp32 training: 4Ψ + 4Ψ + 8Ψ.
  ZeRO stage 1 divides the optimizer states by N, stage 2 also the gradients, stage 3 also the
  weights (plus a gathered working set: ``zero3_live_layers`` layers, or ``zero3_gather_copies``
  copies of the largest single parameter if that is more: DeepSpeed gathers a parameter into a flat
  all-gather buffer and then concatenates it into the parameter, ``AllGatherCoalescedHandle.wait``,
  so two full copies exist for a moment; for Gemma the largest parameter is the 262k x h
  embedding, far larger than a layer). Optimizer offload moves the optimizer states to host RAM,
  parameter offload (stage 3) the weight shards.
  DeepSpeed's ZeRO optimizers always keep their own fp32 master partition, also when the model
  itself is fp32 (CPU training): full fp32 fine-tuning at any ZeRO stage or with optimizer offload
  pays ``zero_fp32_master_bytes`` = 4 bytes/param on top of K_fp32 = 8 (partitioned like the
  optimizer states; measured: stage 1/2 clone the partition, and at stage 3 on CPU
  ``fp32_partitioned_groups_flat`` is a second 0.5 GiB buffer per rank for 270M over 2 ranks).
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
  Tied embeddings, full fine-tuning of a causal LM: the tied V x h weight gets two dense gradients
  (lm_head matmul, embedding backward) that autograd sums out of place: ``tied_embedding_grad_copies``
  = 3 full-size gradient buffers at the end of backward, at every ZeRO stage (partitioning comes
  after autograd). The activations are freed by then, so only the excess over the activations is
  added (to ``gradients``); see ``tied_embedding_grad_excess``.
  Logits (causal LM head): b*s*V values at 12 bytes each: fp32 log-softmax output saved by the loss,
  the dense fp32 gradient of the NLL and the fp32 gradient of the logits are alive together when
  backward starts (measured 11.9 bytes/value for Gemma 3 270M on CPU; the 16-bit logits and their
  fp32 upcast are freed before backward). Gemma 3's 262,144-token vocabulary makes this dominant.
Pair objectives (DPO and its kin, ``tuneops/training/objectives.py``): each example is a chosen and a
  rejected sequence in one batch, so layer activations are for 2b sequences; TRL's fused LM head
  scores them in (4096 x 32768) tiles, so the logits term is a tile and the temporaries made of it
  (~8 tile-sized fp32 arrays on CPU) plus the hidden states' gradient (and the head's fp32 gradient
  when it trains), not b*s*V values (``fused_head_bytes``);
  the reference is free for PEFT methods (the adapter disabled) and one frozen copy of the weights
  for full fine-tuning (``reference_bytes``), none when its log-probs are precomputed; its no-grad
  forward runs after the policy's and adds only a layer's transient; on CPU, importing TRL adds
  ``trl_import_gb`` to the process RSS.
On CPU the measured peak is the process RSS, with the training loop's ``train.cpu_mmap_threshold``
  applied (``tuneops/training/loop.py cap_heap_retention``): with glibc's dynamic threshold, freed
  activations stay resident and the peak is up to 1.6x the live tensors (SmolLM2 LoRA, 4 x 512).
Overhead: CUDA context and allocator on a GPU; on CPU the RSS of the training process before its
model (``cpu_baseline_gb``: torch + transformers + peft), plus ``cpu_distributed_gb`` for a
DeepSpeed/gloo rank (ZeRO stage > 0, offload or more than one process).
The terms are summed: a conservative peak (gradients and activations do not all peak together).

Calibration (``bench/calibrate_memory.py``; table in ``bench/results/calibration-cpu.md``): 18
configurations on the 2-core CPU, fp32, SDPA, seq 128, fused AdamW, 2 optimizer steps, peak RSS of
each rank over the training window: the tiny Gemma-3 (hidden 64, 2 layers, 262k vocabulary) and the
Gemma 3 270M shape, full/LoRA/DoRA/QLoRA at ZeRO 0, ZeRO 0-3 with 2 processes, offload at ZeRO 2 and 3.
What the measurements changed (2026-11-28):
  * cpu_baseline_gb 0.6 -> 0.45 and cpu_distributed_gb 0.12 (new): RSS before the model, measured
    0.38 GiB (torch + transformers), 0.44-0.45 (+ peft), +0.126 per rank for deepspeed + gloo. With
    0.6 the tiny single-process rows were +28% (full) and +16% (LoRA).
  * tied_embedding_grad_copies = 3 (new): 270M full fine-tuning was -11% (5.15 predicted, 5.80
    measured); the end-of-backward peak is 3 copies of the 0.625 GiB embedding gradient.
  * zero_fp32_master_bytes = 4 (new): 270M full at ZeRO 1 was -25%, stage 3 -46% before these fixes.
  * zero3_gather_copies = 2 (new): 270M LoRA at ZeRO 3 was -25% (2.28 vs 3.03): the gathered
    embedding exists twice during its all-gather.
  * offload buffers (new, ``offload_buffer_bytes``): ZeRO-2 + optimizer offload was -31%; with
    the fp32 gradient partition, the staging copy and the two largest-parameter gradient buffers
    priced it is -1.0%; ZeRO-3 + offload (new row) -11.2%.
Now all 18 rows are within 15%. Closest to the edge: 270M full at ZeRO 2, -14.9% (-7.7% in
an earlier run): DeepSpeed sizes a rank's gradient partition buffer by the parameters that overlap
its range, counted whole, so the rank whose range starts inside the 168M-parameter embedding
holds all 268M gradients instead of half (not priced here: the ZeRO-paper stage-2 formula is
pinned by tests); tiny full fine-tuning +12.5% (conservative: its gradients and logits do not
peak together); 270M DoRA -10%, QLoRA -8% (glibc keeps freed activation memory resident). Previous
check (LoRA r=8 q/k/v/o, seq 256, lifetime RSS): micro-batch 4 predicted 6.21 GiB, measured 6.27.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .model import ModelSpec
from ..training import heads, objectives
from ..training.heads import CAUSAL_LM
from ..training.methods import spec

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
    fused_head_token_tile: int = 4096   # TRL's fused LM head (pair objectives): tokens x vocab entries per tile
    fused_head_vocab_tile: int = 32768  # (trl/kernels/chunked_logprob.py TOKEN_CHUNK_SIZE, trainer/utils.py
    #                                     _CHUNKED_LOGPROB_CHUNK_SIZE, TRL 1.16)
    fused_head_tile_copies_cpu: int = 8  # tile-sized fp32 arrays alive in its torch-ops fold (no Triton: CPU);
    #                                     fitted on SmolLM2 / tiny Gemma LoRA and full DPO rows (+-10%)
    fused_head_tile_copies_gpu: int = 1  # the Triton kernels fold the tile in place (not measured here)
    zero3_live_layers: int = 2          # gathered layer working set at stage 3 (current + prefetch)
    zero3_gather_copies: int = 2        # a stage-3 gather holds the flat all-gather buffer + the parameter
    tied_embedding_grad_copies: int = 3  # full FT, tied embedding: lm_head grad + embedding grad + their sum
    zero_fp32_master_bytes: float = 4.0  # DeepSpeed ZeRO (stages 1-3, offload) keeps its own fp32 master copy
    #                                     even when the model is fp32 (K_fp32 = 8 assumes the weights are it)
    offload_grad_bytes: float = 4.0     # ZeRO-Offload: the fp32 gradient partition lives in host RAM
    offload_staging_copies: int = 1     # stage 1/2 offload: a compute-precision copy of the weight partition
    #                                     on the host (updated weights are staged there before the copy back)
    offload_temp_grad_buffers: int = 1  # stage 1/2 offload: a largest-parameter-sized gradient buffer on
    #                                     the host AND one on the device (compute precision)
    dora_weight_copies: int = 2         # transient B@A and W + B@A (fp32) of the largest DoRA module
    prompt_virtual_tokens: int = 20     # prompt tuning: learned tokens prepended to every sequence
    cuda_context_gb: float = 0.8        # CUDA context + cuBLAS workspace + allocator slack (0.5-1 GB)
    cpu_baseline_gb: float = 0.45       # RSS of a training process before its model: torch + transformers
    #                                     (0.38 GiB measured) + peft (0.44-0.45); was 0.6 (see module doc)
    cpu_distributed_gb: float = 0.12    # + deepspeed and a gloo process group (measured +0.126 GiB per rank)
    trl_import_gb: float = 0.09         # pair objectives: + TRL's DPOTrainer and datasets (measured +0.087 GiB)


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
    task_head: str = CAUSAL_LM
    lora_r: int = 8
    targets: tuple[str, ...] = ()
    on_gpu: bool = True
    objective: str = "sft"      # tuneops/training/objectives.py: pair objectives put 2 sequences per example through
    reference: str = "start"    # pair objectives: start | base | precomputed (no reference model in memory)


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
    m = spec(setup.method)
    if m.trains == "all":
        return model.params
    if m.trains == "ia3":
        return model.layers * (2 * model.kv_heads * model.head_dim + model.intermediate)
    if m.trains == "prompt":
        return c.prompt_virtual_tokens * model.hidden
    dims = [model.modules[t] for t in setup.targets]
    lora = model.layers * sum(setup.lora_r * (i + o) for i, o in dims)
    return lora + (model.layers * sum(o for _, o in dims) if m.dora else 0)


def model_state_bytes(model: ModelSpec, setup: Setup, c: MemoryModelConstants) -> tuple[float, float, float]:
    """(weights, gradients, optimizer states) in bytes for one replica, before ZeRO partitioning."""
    w, psi = setup.compute_bytes, model.params
    if spec(setup.method).trains == "all":
        k = c.adam_k_mixed if w == 2 else c.adam_k_fp32
        return w * psi, w * psi, k * psi
    phi = trainable_params(model, setup, c)
    linear_bytes = c.nf4_bits_per_param / 8 if spec(setup.method).nf4_base else w
    frozen = model.linear_params * linear_bytes + (psi - model.linear_params) * w
    return frozen + c.adapter_bytes * phi, c.adapter_grad_bytes * phi, c.adapter_adam_bytes * phi


def activation_bytes(model: ModelSpec, setup: Setup, c: MemoryModelConstants) -> tuple[float, float]:
    """(activations incl. logits, logits) in bytes for one micro-batch; see the module docstring."""
    h, q, kv = model.hidden, model.heads * model.head_dim, model.kv_heads * model.head_dim
    m = spec(setup.method)
    s = setup.seq_len + (c.prompt_virtual_tokens if m.virtual_tokens else 0)
    # a pair objective runs chosen and rejected of each example in one batch: twice the sequences
    tokens, scale = setup.micro_batch * s * objectives.get(setup.objective).sequences_per_example, setup.compute_bytes / 2
    mlp_factor = c.mlp_factor_plain if model.is_encoder else c.mlp_factor_gated
    norms = c.norm_bytes * (model.norms_per_layer * h + (q + kv if model.qk_norm else 0))
    per_token_layer = scale * ((3 * h + 4 * q + 4 * kv) + c.attention_score_bytes * model.heads * s
                               + (3 * h + mlp_factor * model.intermediate) + norms)
    dims = [model.modules[t] for t in setup.targets]
    # LoRA keeps dropout(x) for lora_A and lora_A's r outputs; DoRA also keeps the base output.
    per_token_layer += setup.compute_bytes * sum(i + setup.lora_r for i, _ in dims)
    if m.dora:
        per_token_layer += setup.compute_bytes * sum(o for _, o in dims)
    if setup.checkpointing:
        layers = model.layers * scale * c.checkpoint_bytes_per_hidden * h * tokens + per_token_layer * tokens
    else:
        layers = model.layers * per_token_layer * tokens
    if m.dora and dims:
        layers += c.dora_weight_copies * 4 * max(i * o for i, o in dims)
    head = heads.get(setup.task_head)      # logits per token or per sequence, over the vocabulary or the labels
    if objectives.get(setup.objective).fused_lm_head and head.generative:
        logits = fused_head_bytes(model, setup, c, tokens)
        return layers + logits, logits
    outputs = (tokens if head.per_token else setup.micro_batch) * (model.vocab if head.generative else model.num_labels)
    logits = c.logits_bytes * outputs
    return layers + logits, logits


def fused_head_bytes(model: ModelSpec, setup: Setup, c: MemoryModelConstants, tokens: int) -> float:
    """TRL's fused LM head (pair objectives): a (token tile x vocab tile) buffer of logits, alive in
    forward and again in backward, with the fp32 temporaries its fold makes of it (on CPU, without
    Triton, torch ops: ~8 tile-sized arrays), the fp32 gradient of the final hidden states,
    and, when the LM head trains (full fine-tuning), its fp32 gradient accumulator. Measured on this
    CPU with bench/calibrate_memory.py: Gemma 3 270M LoRA DPO, 2 pairs x 256 tokens: 4.73 GiB peak, which
    the full-logits term (3.0 GiB of logits) overpriced by 28%."""
    copies = c.fused_head_tile_copies_gpu if setup.on_gpu else c.fused_head_tile_copies_cpu
    tile = copies * min(tokens, c.fused_head_token_tile) * min(model.vocab, c.fused_head_vocab_tile) * 4
    grad_hidden = 4 * tokens * model.hidden
    head_grad = 4 * model.vocab * model.hidden if spec(setup.method).trains == "all" else 0
    return tile + grad_hidden + head_grad


def reference_bytes(model: ModelSpec, setup: Setup) -> float:
    """The reference model of a pair objective (``tuneops/training/preference.py build_models``).
    PEFT methods: none (the policy with its adapter disabled, or the frozen copy of the start
    adapter, is the reference); full fine-tuning: a frozen copy of the start model's weights in
    compute precision; ``precomputed``: none (log-probs computed once before training). Its
    no-grad forward keeps no activations for backward and runs before the policy's forward, so its
    transient logits do not add to the policy's peak."""
    o = objectives.get(setup.objective)
    if not o.pairs or setup.reference == "precomputed" or spec(setup.method).trains != "all":
        return 0.0
    return setup.compute_bytes * model.params


def largest_param(model: ModelSpec) -> int:
    """The largest single parameter tensor: the token embedding (or an untied lm_head) or the
    largest per-layer linear weight. ZeRO-3 gathers a parameter whole before using it."""
    return max(model.embedding_params, model.lm_head_params, *(i * o for i, o in model.modules.values()))


def tied_embedding_grad_excess(model: ModelSpec, setup: Setup, c: MemoryModelConstants, acts: float) -> float:
    """Bytes the end of backward needs beyond what ``gradients`` + ``activations`` already count,
    for full fine-tuning of a causal LM whose lm_head is tied to the input embedding.

    The tied weight receives two dense V x h gradients, one from the lm_head matmul (at the start
    of backward) and one from the embedding's dense backward (at the end), and autograd sums them
    out of place: ``tied_embedding_grad_copies`` = 3 gradient-sized buffers are alive together
    (measured on this CPU: an isolated tied 262,144 x 640 fp32 embedding + lm_head peaks at
    +1.886 GiB in backward = 3.02 x its 0.625 GiB; untied, +0.751 = 1 gradient + the logits
    gradient). They are full-size at every ZeRO stage: partitioning happens after autograd has
    produced the gradient. By then the activations are freed, so only the part of the transient
    that exceeds the activations adds to the peak."""
    if spec(setup.method).trains != "all" or not model.tied_embeddings or model.is_encoder \
            or not heads.get(setup.task_head).generative:
        return 0.0
    g = setup.compute_bytes * model.embedding_params
    counted = g / setup.world_size if setup.zero_stage >= 2 else g
    return max(0.0, c.tied_embedding_grad_copies * g - counted - acts)


def offload_buffer_bytes(model: ModelSpec, setup: Setup, c: MemoryModelConstants) -> tuple[float, float]:
    """DeepSpeed's ZeRO-Offload buffers beyond the optimizer states: (host bytes, device bytes).

    Stages 1/2 (``stage_1_and_2.py``): the fp32 gradient partition is on the host
    (``offload_grad_bytes`` x Φ/N), next to a compute-precision staging copy of the weight
    partition (``param_buffer_of_bit16_for_cpu_offload``, w x Φ/N), and two gradient buffers of the
    largest trainable parameter's size, one on the host and one on the device
    (``temp_grad_buffer_for_cpu/gpu_offload``). The device's partitioned gradients stay (they
    are reduced there before the copy). Stage 3 (``stage3.py``): the flat gradient partition
    buffer is on the host in fp32 and replaces the device's partitioned gradients.
    Measured: 270M full ZeRO-2 + optimizer offload, 2 ranks: RSS at the first step 4.30 GiB vs
    2.06 without offload (+2.24); these buffers price +2.25."""
    n, w = setup.world_size, setup.compute_bytes
    phi = trainable_params(model, setup, c)
    grad_partition = c.offload_grad_bytes * phi / n
    if setup.zero_stage == 3:
        return grad_partition, 0.0
    largest = largest_param(model) if spec(setup.method).trains == "all" else largest_trainable(model, setup)
    temp = c.offload_temp_grad_buffers * w * largest
    return grad_partition + c.offload_staging_copies * w * phi / n + temp, temp


def largest_trainable(model: ModelSpec, setup: Setup) -> int:
    """Largest trainable tensor of a PEFT method (a LoRA A/B matrix, DoRA magnitude, IA3 vector)."""
    dims = [model.modules[t] for t in setup.targets] or [(model.hidden, model.hidden)]
    return max(max(setup.lora_r * i, setup.lora_r * o, o) for i, o in dims)


def estimate(model: ModelSpec, setup: Setup, c: MemoryModelConstants | None = None) -> Estimate:
    """Per-device peak: ZeRO partitioning and offload applied to the model states, plus
    activations and overhead."""
    c = c or MemoryModelConstants()
    weights, grads, optim = model_state_bytes(model, setup, c)
    weights += reference_bytes(model, setup)    # (TRL shards it like the policy at ZeRO 3, else keeps it whole)
    n, w = setup.world_size, setup.compute_bytes
    host = 0.0
    if spec(setup.method).trains == "all" and w == 4 and (setup.zero_stage >= 1 or setup.offload_optimizer):
        optim += c.zero_fp32_master_bytes * model.params   # DeepSpeed's own fp32 master copy
    if setup.zero_stage >= 1:
        optim /= n
    if setup.zero_stage >= 2:
        grads /= n
    if setup.zero_stage == 3:
        live = max(c.zero3_live_layers * model.layer_params, c.zero3_gather_copies * largest_param(model)) * w
        weights = weights / n
        if setup.offload_params:
            host, weights = host + weights, 0.0
        weights += live
    if setup.offload_optimizer:
        host, optim = host + optim, 0.0
        extra_host, extra_device = offload_buffer_bytes(model, setup, c)
        if setup.zero_stage == 3:
            grads = 0.0   # stage 3 reduces straight into the host's fp32 gradient partition
        host, grads = host + extra_host, grads + extra_device
    acts, logits = activation_bytes(model, setup, c)
    grads += tied_embedding_grad_excess(model, setup, c, acts)
    distributed = setup.world_size > 1 or setup.zero_stage > 0 or setup.offload_optimizer or setup.offload_params
    overhead = c.cuda_context_gb if setup.on_gpu else c.cpu_baseline_gb + (c.cpu_distributed_gb if distributed else 0.0)
    if objectives.get(setup.objective).pairs and not setup.on_gpu:
        overhead += c.trl_import_gb          # host RSS: not in a GPU's memory
    return Estimate(weights / GIB, grads / GIB, optim / GIB, acts / GIB, overhead, logits / GIB, host / GIB)
