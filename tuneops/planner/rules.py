"""Decision rules: method, then ZeRO stage/offload, then micro-batch, accumulation, checkpointing.

Every decision appends a reason ``{"rule": id, "text": ...}``; ``RULES`` documents each id and
``explain()`` renders them with the scenario table.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import InvalidInput

from .goals import METHODS, Goals
from .hardware import Hardware
from .memory import Estimate, MemoryModelConstants, Setup, estimate, trainable_params
from .model import ModelSpec
from ..training.methods import spec
from ..training import heads
from .table import ScenarioTable, load_table

RULES: dict[str, str] = {
    "R0-objective": "A pair objective (train.objective dpo, ...) needs preference data; memory counts chosen + rejected "
                    "per example and the reference model (a weights copy for full fine-tuning unless precomputed).",
    "R1-candidates": "Candidates are select.allowed_methods, or only the forced select.method.",
    "R2-fit": "A method fits if some ZeRO/offload rung fits at micro-batch 1, within memory_headroom x device "
              "memory (offloaded states within host RAM). Except for quality=best, methods that fit without "
              "offload are preferred over methods that need it.",
    "R3-forced": "A forced method is used if it fits; otherwise planning fails and names the least-memory method that fits.",
    "R4-quality-best": "quality=best: the first fitting method marked best_quality (full), else quality (DoRA).",
    "R5-minimize-memory": "minimize=memory: the fitting method with the least predicted memory (QLoRA on GPU).",
    "R6-minimize-cost-time": "minimize=cost/time: the first fitting method marked cheaper, in table order (LoRA, then QLoRA).",
    "R7-cpu-prefers-lora": "CPU-only: LoRA over QLoRA when LoRA fits (4-bit weights are dequantized every step on CPU).",
    "R8-fallback": "No preferred method fits: the fitting candidate with the least predicted memory.",
    "R9-precision": "GPU: bf16 (fp16 without bf16 support), QLoRA nf4 weights + that compute dtype; CPU: fp32.",
    "R10-zero-stage": "The lowest rung that fits: ZeRO 0, 1, 2, 3 (stages above 0 only with >1 device), "
                      "then optimizer offload, then parameter offload (stage 3; not with QLoRA). "
                      "1 GPU: stage 0, then stage 2 + optimizer offload (ZeRO-Offload). "
                      "select.zero_stage / select.offload force a stage / offload (only matching rungs).",
    "R11-launcher": "1 device and no DeepSpeed: python; ZeRO stage > 0 or offload: deepspeed; "
                    "several devices at stage 0: torchrun (DDP). nproc = GPUs per node "
                    "(CPU: select.hardware.cpu_processes, gloo).",
    "R12-checkpointing": "Gradient checkpointing only when needed to fit at micro-batch 1 (tried before any "
                         "offload), or when minimize=memory.",
    "R13-micro-batch": "Largest power of two <= max_micro_batch_size and <= global_batch/world that fits.",
    "R14-grad-accum": "grad_accum = ceil(global_batch / (micro x world)); the effective global batch is reported.",
    "R15-peft-config": "LoRA/DoRA/QLoRA use select.lora (targets mapped to the model's module names).",
}


class PlanError(InvalidInput):
    """The request cannot be planned (e.g. a forced method does not fit); str() is one line."""


@dataclass
class Plan:
    method: str
    peft: dict[str, Any] | None
    precision: str
    zero_stage: int
    offload: dict[str, bool]
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int
    requested_global_batch_size: int
    gradient_checkpointing: bool
    launcher: str
    nproc_per_node: int
    nodes: int
    world_size: int
    seq_len: int
    scenario: str
    task_head: str
    trainable_params: int
    usable_gb_per_device: float
    estimate: Estimate
    model: ModelSpec
    hardware: Hardware
    reasons: list[dict[str, str]] = field(default_factory=list)
    steps_per_epoch: int | None = None
    objective: str = "sft"                 # tuneops/training/objectives.py (train.objective)
    reference: str | None = None           # pair objectives: train.reference (start | base | precomputed)
    step_compute_vs_sft: float = 1.0      # predicted compute of one step relative to SFT on the same examples

    @property
    def predicted_peak_gb_per_device(self) -> float:
        return round(self.estimate.total, 3)

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.usable_gb_per_device

    def to_dict(self) -> dict[str, Any]:
        skip = {"estimate", "model", "hardware", "reasons"}
        out = {k: v for k, v in self.__dict__.items() if k not in skip}
        return {**out, "predicted_peak_gb_per_device": self.predicted_peak_gb_per_device,
                "breakdown": self.estimate.breakdown(), "host_offload_gb_per_process": round(self.estimate.host_gb, 3),
                "fits": self.fits, "reasons": list(self.reasons), "model": self.model.to_dict(),
                "hardware": self.hardware.to_dict()}


@dataclass(frozen=True)
class _Fit:
    """Search result for one method. ``setup``: the first fitting setup (None if none fits);
    ``need_gb``: its need with checkpointing at micro-batch 1 (if none fits: the least need of any
    rung); ``intrinsic_gb``: the need at ZeRO 0 without offload, used to rank methods by memory."""

    setup: Setup | None
    need_gb: float
    intrinsic_gb: float


def make_plan(model: ModelSpec, hw: Hardware, seq_len: int, goals: Goals, scenario: str = "chat",
              tokens: int | None = None, *, constants: MemoryModelConstants | None = None,
              task_head: str | None = None, objective: str = "sft", reference: str = "start") -> Plan:
    """Plan a fine-tuning run. Raises ``PlanError`` when nothing (or the forced method) fits or the
    request is invalid, ``ValueError`` when select.lora.target_modules names a module the model lacks.
    ``task_head`` overrides the scenario table's head (e.g. ``causal_lm``: classification as chat prompts)."""
    c, table = constants or MemoryModelConstants(), load_table()
    head = _check_inputs(model, seq_len, scenario, tokens, table, task_head)
    obj = _check_objective(objective, reference, scenario, head)
    usable = goals.memory_headroom * hw.device_memory_gb
    reasons: list[dict[str, str]] = []

    def say(rule: str, text: str) -> None:
        reasons.append({"rule": rule, "text": text})

    candidates = (goals.method,) if goals.method != "auto" else goals.allowed_methods
    say("R1-candidates", f"candidates: {', '.join(candidates)}"
        + (" (forced by select.method)" if goals.method != "auto" else " (select.allowed_methods)"))
    if obj.pairs:
        say("R0-objective", f"objective {obj.name} (TRL loss_type {obj.loss_type}): chosen + rejected of each pair in "
            f"one batch ({obj.sequences_per_example} sequences per example); reference {reference}: "
            + ("log-probs precomputed once, no reference model in memory" if reference == "precomputed" else
               "the adapter disabled for PEFT methods, a frozen copy of the weights for full fine-tuning")
            + f"; a step costs ~{obj.step_compute(reference):.2f}x an SFT step on the same examples")
    fits = {m: _search(model, hw, m, goals, seq_len, head, usable, c, obj.name, reference) for m in METHODS}
    say("R2-fit", f"need per device at micro-batch 1 with checkpointing (GiB; {usable:.1f} usable = {goals.memory_headroom:g} x "
        f"{hw.device_memory_gb:g}): " + ", ".join(
            f"{m} {fits[m].need_gb:.1f} {'fits' if fits[m].setup else 'does not fit'}" for m in candidates))
    method = _choose_method(model, hw, goals, table, candidates, fits, usable, say)
    setup = fits[method].setup
    assert setup is not None
    precision = _precision(method, hw)
    say("R9-precision", f"precision {precision}: "
        + ("CPU training in fp32" if hw.is_cpu else "mixed precision on GPU"))
    _say_rung(setup, hw, model, goals, c, say)
    micro = _micro_batch(model, setup, goals, hw, usable, c, say)
    setup = replace(setup, micro_batch=micro)
    accum = math.ceil(goals.global_batch_size / (micro * hw.world_size))
    effective = micro * accum * hw.world_size
    say("R14-grad-accum", f"grad_accum {accum} = ceil({goals.global_batch_size} / ({micro} x {hw.world_size})); "
        f"effective global batch {effective}" + ("" if effective == goals.global_batch_size
                                                 else f" (requested {goals.global_batch_size})"))
    launcher = _launcher(setup, hw, say)
    est = estimate(model, setup, c)
    return Plan(
        method=method, peft=_peft_config(model, setup, goals, c, say), precision=precision,
        zero_stage=setup.zero_stage, offload={"optimizer": setup.offload_optimizer, "params": setup.offload_params},
        micro_batch_size=micro, grad_accum=accum, global_batch_size=effective,
        requested_global_batch_size=goals.global_batch_size, gradient_checkpointing=setup.checkpointing,
        launcher=launcher, nproc_per_node=hw.nproc_per_node, nodes=hw.nodes, world_size=hw.world_size,
        seq_len=seq_len, scenario=scenario, task_head=head, trainable_params=trainable_params(model, setup, c),
        usable_gb_per_device=round(usable, 3), estimate=est, model=model, hardware=hw, reasons=reasons,
        steps_per_epoch=math.ceil(tokens / (effective * seq_len)) if tokens else None,
        objective=obj.name, reference=reference if obj.pairs else None,
        step_compute_vs_sft=round(obj.step_compute(reference), 3))


def _check_objective(objective: str, reference: str, scenario: str, head: str) -> Any:
    """The objective's spec; a pair objective needs preference data and the causal LM."""
    from ..training import objectives

    try:
        obj = objectives.get(objective)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if reference not in objectives.REFERENCES:
        raise PlanError(f"train.reference: {reference!r} is not one of {', '.join(objectives.REFERENCES)}")
    if obj.data_format is not None and scenario != obj.data_format:
        raise PlanError(f"train.objective {obj.name}: trains on {obj.data_format} data (chosen / rejected pairs); the "
                        f"data is {scenario} (use data.scenario preference or data.format preference)")
    if obj.pairs and not heads.get(head).generative:
        raise PlanError(f"train.objective {obj.name}: trains the causal LM, not a {head} head")
    return obj


def _check_inputs(model: ModelSpec, seq_len: int, scenario: str, tokens: int | None, table: ScenarioTable,
                  task_head: str | None = None) -> str:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise PlanError(f"seq_len must be a positive integer (got {seq_len!r})")
    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise PlanError(f"tokens must be a positive integer (got {tokens!r})")
    if scenario not in table.scenarios:
        raise PlanError(f"unknown scenario {scenario!r} (known: {', '.join(table.scenarios)})")
    if task_head is not None and task_head not in heads.HEADS:
        raise PlanError(f"unknown task head {task_head!r} (known: {', '.join(heads.HEADS)})")
    head = task_head or table.scenarios[scenario].task_head
    if model.is_encoder and heads.get(head).generative:
        raise PlanError(f"scenario {scenario!r} needs a causal LM; {model.name} is an encoder "
                        "(use classification or ner data"
                        + (", with select.task_head auto)" if head != table.scenarios[scenario].task_head else ")"))
    if model.max_positions and seq_len > model.max_positions:
        raise PlanError(f"seq_len {seq_len} exceeds {model.name}'s max_position_embeddings {model.max_positions}")
    return head


def _precision(method: str, hw: Hardware) -> str:
    compute = "fp32" if hw.is_cpu else ("bf16" if hw.bf16 else "fp16")
    if spec(method).base_quant:      # quantization-aware LoRA: the deployment base's weights, held dequantized
        return f"{spec(method).base_quant}+{compute}"
    return f"nf4+{compute}" if spec(method).nf4_base else compute


def _rungs(hw: Hardware, method: str, goals: Goals | None = None) -> list[tuple[int, bool, bool]]:
    """(zero_stage, offload_optimizer, offload_params) from cheapest in speed to least memory.
    With one GPU ZeRO stages shard nothing, so the rungs are stage 0, ZeRO-Offload (stage 2 +
    optimizer offload) and stage 3 + parameter offload. CPU training has one rung. A stage or
    offload forced in params (``select.zero_stage`` / ``select.offload``) keeps only the rungs
    that match it, in stage order."""
    forced = goals is not None and (goals.zero_stage != "auto" or goals.offload != "auto")
    if forced:
        every = [(s, oo, op) for s in range(4) for oo, op in ((False, False), (True, False), (True, True))
                 if (s > 0 or not oo) and (s == 3 or not op) and (spec(method).param_offload or not op)]
        want = {"none": (False, False), "optimizer": (True, False), "optimizer+params": (True, True)}.get(goals.offload)
        return [r for r in every if (goals.zero_stage == "auto" or r[0] == goals.zero_stage)
                and (want is None or r[1:] == want)]
    if hw.is_cpu:
        return [(0, False, False)]
    rungs = [(0, False, False), (1, False, False), (2, False, False), (3, False, False), (3, True, False)]
    if hw.world_size == 1:
        rungs = [(0, False, False), (2, True, False)]
    return rungs + ([(3, True, True)] if spec(method).param_offload else [])


def _base_setup(model: ModelSpec, hw: Hardware, method: str, goals: Goals, seq_len: int, head: str,
                objective: str = "sft", reference: str = "start") -> Setup:
    peft_targets = spec(method).uses_lora_targets
    return Setup(method=method, compute_bytes=4 if hw.is_cpu else 2, world_size=hw.world_size,
                 seq_len=seq_len, task_head=head, lora_r=goals.lora.r, on_gpu=not hw.is_cpu,
                 objective=objective, reference=reference,
                 targets=tuple(model.resolve_targets(goals.lora.target_modules)) if peft_targets else ())


def _fits(model: ModelSpec, setup: Setup, hw: Hardware, usable: float, headroom: float,
          c: MemoryModelConstants) -> bool:
    est = estimate(model, setup, c)
    return _device_gb(est, hw) <= usable and est.host_gb * hw.nproc_per_node <= headroom * hw.host_ram_gb


def _device_gb(est: Any, hw: Hardware) -> float:
    """What one device must hold; on a CPU-only node the offloaded states share the same RAM."""
    return est.total + (est.host_gb if hw.is_cpu else 0.0)


def _search(model: ModelSpec, hw: Hardware, method: str, goals: Goals, seq_len: int, head: str,
            usable: float, c: MemoryModelConstants, objective: str = "sft", reference: str = "start") -> _Fit:
    """First setup that fits at micro-batch 1, trying in order: ZeRO stages without offload, the
    same with checkpointing (skipped: minimize=memory always checkpoints), then offload rungs
    without and with checkpointing. Offloaded states must fit in host RAM."""
    base = _base_setup(model, hw, method, goals, seq_len, head, objective, reference)
    intrinsic = estimate(model, replace(base, checkpointing=True), c).total
    rungs = _rungs(hw, method, goals)
    ckpts = (True,) if goals.minimize == "memory" else (False, True)
    order = [(r, ck) for tier in ([r for r in rungs if not r[1]], [r for r in rungs if r[1]])
             for ck in ckpts for r in tier]
    least = math.inf
    for (stage, off_opt, off_par), ckpt in order:
        s = replace(base, zero_stage=stage, offload_optimizer=off_opt, offload_params=off_par, checkpointing=ckpt)
        est = estimate(model, s, c)
        if est.host_gb * hw.nproc_per_node > goals.memory_headroom * hw.host_ram_gb:
            continue
        least = min(least, _device_gb(est, hw))
        if _device_gb(est, hw) <= usable:
            return _Fit(s, estimate(model, replace(s, checkpointing=True), c).total, intrinsic)
    return _Fit(None, least, intrinsic)


def _choose_method(model: ModelSpec, hw: Hardware, goals: Goals, table: ScenarioTable, candidates: tuple[str, ...],
                   fits: dict[str, _Fit], usable: float, say) -> str:
    fitting = [m for m in candidates if fits[m].setup]
    if not fitting:
        others = sorted((m for m in METHODS if fits[m].setup and m not in candidates), key=lambda m: fits[m].intrinsic_gb)
        hint = f"; {others[0]} fits in ~{fits[others[0]].need_gb:.1f} GB" if others else "; no method fits"
        if goals.method == "auto" and not others:
            hint = "; no other method fits either"
        if goals.method != "auto":
            raise PlanError(f"{spec(goals.method).label or goals.method + ' fine-tuning'} of {model.name} does not fit: "
                            f"needs ~{fits[goals.method].need_gb:.1f} GB per device, have {usable:.1f} GB{hint}")
        least = min(candidates, key=lambda m: fits[m].need_gb)
        raise PlanError(f"no allowed method fits {model.name}: least is {least} at ~{fits[least].need_gb:.1f} GB "
                        f"per device, have {usable:.1f} GB{hint}")
    if goals.method != "auto":
        say("R3-forced", f"{goals.method} forced by select.method and fits")
        return goals.method
    on_device = [m for m in fitting if not fits[m].setup.offload_optimizer]
    if on_device != fitting:
        say("R2-fit", f"without host offload these fit: {', '.join(on_device) or 'none'} (offload is a last resort)")
    if goals.quality == "best":
        for m in table.methods_with("best_quality") + table.methods_with("quality"):
            if m in fitting:
                say("R4-quality-best", f"{m}: quality=best and the table marks {m} "
                    + ("best_quality" if table.has(m, "best_quality") else "quality"))
                return m
    fitting = on_device or fitting
    if goals.minimize == "memory":
        m = min(fitting, key=lambda m: fits[m].intrinsic_gb)
        say("R5-minimize-memory", f"{m}: least predicted memory without ZeRO ({fits[m].intrinsic_gb:.1f} GB) "
            "of the fitting candidates")
        return m
    for m in table.methods_with("cheaper"):
        if m in fitting:
            if hw.is_cpu and m == "lora":
                say("R7-cpu-prefers-lora", "lora: fits on this CPU-only machine; QLoRA would dequantize 4-bit weights every step")
            else:
                say("R6-minimize-cost-time", f"{m}: minimize={goals.minimize} and the table marks {m} cheaper")
            return m
    m = min(fitting, key=lambda m: fits[m].intrinsic_gb)
    say("R8-fallback", f"{m}: no cheaper method fits; least predicted memory of the fitting candidates")
    return m


def _say_rung(setup: Setup, hw: Hardware, model: ModelSpec, goals: Goals, c: MemoryModelConstants, say) -> None:
    rungs = _rungs(hw, setup.method, goals)
    below = rungs[:rungs.index((setup.zero_stage, setup.offload_optimizer, setup.offload_params))]
    if goals.zero_stage != "auto" or goals.offload != "auto":
        say("R10-zero-stage", f"ZeRO stage {setup.zero_stage} across {hw.world_size} device(s): forced by "
            + " and ".join(f"select.{k}={getattr(goals, k)}" for k in ("zero_stage", "offload")
                           if getattr(goals, k) != "auto"))
    elif hw.world_size == 1 and setup.zero_stage == 0:
        say("R10-zero-stage", "ZeRO stage 0: one device, nothing to partition")
    else:
        needs = ", ".join(
            f"stage {st}{' +offload' if oo else ''}: {estimate(model, replace(setup, zero_stage=st, offload_optimizer=oo, offload_params=op, checkpointing=True), c).total:.1f} GB"
            for st, oo, op in below)
        say("R10-zero-stage", f"ZeRO stage {setup.zero_stage} across {hw.world_size} devices: lowest rung that fits"
            + (f" (lower rungs need at least {needs})" if needs else ""))
    off = [k for k, v in (("optimizer", setup.offload_optimizer), ("params", setup.offload_params)) if v]
    if off:
        say("R10-zero-stage", f"offload {' and '.join(off)} to host RAM: "
            f"{estimate(model, setup, c).host_gb * hw.nproc_per_node:.1f} GB per node of {hw.host_ram_gb:g} GB")
    say("R12-checkpointing", "gradient checkpointing on: " + ("minimize=memory" if goals.minimize == "memory" else "needed to fit")
        if setup.checkpointing else "gradient checkpointing off: fits without recomputation")


def _micro_batch(model: ModelSpec, setup: Setup, goals: Goals, hw: Hardware, usable: float,
                 c: MemoryModelConstants, say) -> int:
    cap = min(goals.max_micro_batch_size, max(1, goals.global_batch_size // hw.world_size))
    micro = 2 ** int(math.log2(cap))
    while micro > 1 and not _fits(model, replace(setup, micro_batch=micro), hw, usable, goals.memory_headroom, c):
        micro //= 2
    est = estimate(model, replace(setup, micro_batch=micro), c)
    say("R13-micro-batch", f"micro-batch {micro}: largest power of two <= {cap} that fits "
        f"({est.total:.2f} GB of {usable:.1f} GB; activations {est.activations:.2f} GB, of which logits {est.logits:.2f} GB)")
    return micro


def _launcher(setup: Setup, hw: Hardware, say) -> str:
    if setup.zero_stage > 0 or setup.offload_optimizer:
        launcher = "deepspeed"
    else:
        launcher = "torchrun" if hw.world_size > 1 else "python"
    say("R11-launcher", f"{launcher} with {hw.nproc_per_node} process(es) per node on {hw.nodes} node(s)")
    return launcher


def _peft_config(model: ModelSpec, setup: Setup, goals: Goals, c: MemoryModelConstants, say) -> dict[str, Any] | None:
    phi = trainable_params(model, setup, c)
    share = f"{phi:,} trainable parameters ({100 * phi / model.params:.2f}% of {model.params:,})"
    m = spec(setup.method)
    if m.trains == "all":
        say("R15-peft-config", f"{m.label}: {share}")
        return None
    if m.trains == "ia3":
        targets = model.resolve_targets(("k_proj", "v_proj", "down_proj"), strict=False)
        cfg = {"r": None, "alpha": None, "dropout": None, "target_modules": targets,
               "feedforward_modules": [t for t in targets if t == "down_proj"]}
    elif m.trains == "prompt":
        cfg = {"r": None, "alpha": None, "dropout": None, "target_modules": None,
               "num_virtual_tokens": c.prompt_virtual_tokens}
    else:
        cfg = {"r": goals.lora.r, "alpha": goals.lora.alpha, "dropout": goals.lora.dropout,
               "target_modules": list(setup.targets), "use_dora": m.dora}
    say("R15-peft-config", f"{setup.method} on {cfg['target_modules'] or 'input embeddings'}: {share}")
    return cfg


def explain() -> str:
    """The scenario table and the rules as plain text (``tuneops plan --explain``)."""
    t = load_table()
    lines = [f"Method table ({t.source}):"]
    width = max(map(len, t.methods))
    for m in t.methods.values():
        lines.append(f"  {m.name:<{width}}  [{m.kind}]  {m.guide}")
        lines.append(f"  {'':<{width}}  properties: {', '.join(m.properties)}")
    lines += ["", "Properties:"] + [f"  {k}: {v}" for k, v in t.properties.items()]
    lines += ["", "Scenarios (task head):"] + [f"  {s.name:<14} {s.task_head:<24} {s.guide}" for s in t.scenarios.values()]
    lines += ["", "Rules (applied in order: method, ZeRO/offload, micro-batch/accumulation/checkpointing):"]
    lines += [f"  {rid}: {text}" for rid, text in RULES.items()]
    return "\n".join(lines)
