"""Fine-tuning methods: one small strategy per method; variants are flags, not copies.

A strategy knows how to load the base model for its method (QLoRA: 4-bit NF4 with double
quantization through bitsandbytes) and how to wrap it (peft config). ``plan`` is the select
stage's plan.json: ``method``, ``peft`` (r/alpha/dropout/target_modules/...), ``precision``,
``gradient_checkpointing``, and ``task_head`` (``causal_lm`` or a classification head, loaded
with the plan's ``labels``: ``tuneops/training/heads.py``; PEFT methods then keep the new head
trainable through the head's peft task type (``Head.peft_task``), which saves it as ``modules_to_save``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import heads


def compute_precision(plan: dict[str, Any]) -> str:
    """The compute precision of a plan's ``precision`` (``WEIGHTS+COMPUTE`` or ``COMPUTE``, as the
    planner writes it: ``nf4+bf16`` -> ``bf16``, ``fp32`` -> ``fp32``)."""
    return plan.get("precision", "fp32").split("+")[-1]


def compute_dtype(plan: dict[str, Any]) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(compute_precision(plan), torch.float32)


def _auto(plan: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The auto class for the plan's task head and its label keyword arguments."""
    return heads.of(plan).auto(), heads.label_kwargs(plan)


def _load_plain(base_dir: Path, plan: dict[str, Any]) -> Any:
    # Weights stay fp32 on CPU; on GPU the frozen base of a PEFT method is loaded in the compute
    # dtype (full fine-tuning keeps fp32 master weights and trains under autocast).
    import torch

    dtype = torch.float32 if plan["method"] == "full" else compute_dtype(plan)
    auto, labels = _auto(plan)
    return auto.from_pretrained(str(base_dir), dtype=dtype, **labels)


def _load_4bit(base_dir: Path, plan: dict[str, Any]) -> Any:
    """QLoRA's base: every linear layer of the blocks NF4 4-bit with double quantization
    (embeddings, norms and the lm_head stay in full precision), on CPU and on CUDA."""
    import torch
    from transformers import BitsAndBytesConfig

    # a classification head (new, trained in full precision through modules_to_save) stays unquantized
    new = heads.of(plan).head_modules
    skip = {"llm_int8_skip_modules": list(new)} if new else {}
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute_dtype(plan), **skip)
    kw: dict[str, Any] = {"quantization_config": q, "dtype": compute_dtype(plan)}
    if torch.cuda.is_available():
        kw["device_map"] = {"": int(__import__("os").environ.get("LOCAL_RANK", "0"))}
    auto, labels = _auto(plan)
    return auto.from_pretrained(str(base_dir), **kw, **labels)


def _load_quantized_base(base_dir: Path, plan: dict[str, Any]) -> Any:
    """Quantization-aware LoRA's base: the plain base with every weight the deployment base graph
    stores quantized replaced by its dequantized value, computed by the export's own quantizer
    (``tuneops.export.basequant.fake_quantize``: the same codes, blocks, scales and zero points the
    ``MatMulNBits`` graph stores). The base is frozen, so quantizing once at load is the same as
    quantizing in every forward. Loaded in fp32 and quantized there (the graph's values), then cast
    to the compute dtype (bf16/fp16 on GPU round them once more)."""
    import torch

    from tuneops.export.basequant import base_quant, fake_quantize

    auto, labels = _auto(plan)
    model = auto.from_pretrained(str(base_dir), dtype=torch.float32, **labels)
    fake_quantize(model, base_quant(spec(plan["method"]).base_quant))
    dtype = compute_dtype(plan)
    return model if dtype == torch.float32 else model.to(dtype)


def disable_cpu_bf16_repack(model: Any) -> int:
    """bitsandbytes on AVX512-BF16 CPUs repacks 4-bit weights at the first no-grad forward and then
    uses a kernel without autograd: LoRA stops learning silently (seen with bitsandbytes 0.50).
    Turn that path off on every Linear4bit; returns how many."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _lora_config(model: Any, plan: dict[str, Any]) -> Any:
    from peft import LoraConfig

    from tuneops.families import check_targets

    p = plan["peft"]
    check_targets(model, list(p["target_modules"]))
    return LoraConfig(
        r=p["r"], lora_alpha=p["alpha"], lora_dropout=p["dropout"], target_modules=list(p["target_modules"]),
        use_dora=spec(plan["method"]).dora, task_type=heads.of(plan).peft_task)


def _lora(model: Any, plan: dict[str, Any]) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(model, plan))


def _kbit_prepare(model: Any, plan: dict[str, Any]) -> Any:
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=bool(plan.get("gradient_checkpointing")),
        gradient_checkpointing_kwargs={"use_reentrant": False})


def _qlora(model: Any, plan: dict[str, Any]) -> Any:
    model = _lora(_kbit_prepare(model, plan), plan)
    disable_cpu_bf16_repack(model)
    return model


def _ia3_config(model: Any, plan: dict[str, Any]) -> Any:
    from peft import IA3Config

    p = plan["peft"]
    return IA3Config(target_modules=list(p["target_modules"]), feedforward_modules=list(p.get("feedforward_modules") or []),
                     task_type=heads.of(plan).peft_task)


def _ia3(model: Any, plan: dict[str, Any]) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, _ia3_config(model, plan))


def _prompt_tuning_config(model: Any, plan: dict[str, Any]) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    p = plan["peft"]
    return PromptTuningConfig(num_virtual_tokens=int(p["num_virtual_tokens"]), prompt_tuning_init=PromptTuningInit.RANDOM,
                              task_type=heads.of(plan).peft_task)


def _prompt_tuning(model: Any, plan: dict[str, Any]) -> Any:
    from peft import get_peft_model

    return get_peft_model(model, _prompt_tuning_config(model, plan))


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: how the trainer loads and wraps the base, and the facts the planner
    (memory terms, precision, ZeRO rungs, peft config), the trainer and the exporter (merge) read
    instead of comparing method names."""

    name: str
    load: Callable[[Path, dict[str, Any]], Any]
    wrap: Callable[[Any, dict[str, Any]], Any] | None   # None: full fine-tuning (no adapter)
    trains: str = "lora"          # what is trained: all (every weight) | lora | ia3 (vectors) | prompt (virtual tokens)
    dora: bool = False            # LoRA + a magnitude vector per output (memory: + L*sum(d_out), base output kept)
    nf4_base: bool = False        # the frozen base is 4-bit NF4 (QLoRA): precision nf4+<compute>, no param offload
    # the frozen base is the deployment base graph's quantization (tuneops/export/adapters.py BASE_QUANTS),
    # applied with the export's quantizer (quantization-aware LoRA); the adapter is served unmerged over it
    base_quant: str = ""
    label: str = ""
    # the planner's method table (Microsoft's Phi-3 fine-tuning guide): its wording and the properties
    # its rules read (declared in tuneops/planner/scenario_table.yaml)
    guide: str = ""
    properties: tuple[str, ...] = ()
    # the adapter's peft config alone, and what runs on the loaded base before it (QLoRA's kbit
    # preparation): for trainers that add the adapter themselves (TRL's DPOTrainer, preference.py)
    config: Callable[[Any, dict[str, Any]], Any] | None = None
    prepare: Callable[[Any, dict[str, Any]], Any] | None = None

    @property
    def artifact(self) -> str:
        return "model" if self.wrap is None else "adapter"

    @property
    def uses_lora_targets(self) -> bool:
        """Trains LoRA matrices on ``select.lora.target_modules``."""
        return self.trains == "lora"

    @property
    def mergeable(self) -> bool:
        """Its weights fold into the base for export (prompt tuning has none)."""
        return self.trains != "prompt"

    @property
    def virtual_tokens(self) -> bool:
        """Prepends learned tokens to every row (longer sequences; no packing; token labels shift)."""
        return self.trains == "prompt"

    @property
    def param_offload(self) -> bool:
        """ZeRO-3 may offload its parameters (bitsandbytes 4-bit weights cannot be)."""
        return not self.nf4_base

    @property
    def trainer_checkpointing(self) -> bool:
        """The Trainer turns on activation checkpointing (QLoRA's kbit preparation does it itself)."""
        return not self.nf4_base


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", _load_plain, None, trains="all", label="full fine-tuning",
           guide="Full fine-tuning: best quality, most memory", properties=("best_quality", "quality", "most_memory")),
    Method("lora", _load_plain, _lora, guide="LoRA: cheaper", properties=("cheaper", "fewer_parameters"),
           config=_lora_config),
    Method("dora", _load_plain, _lora, dora=True,        # LoRA + use_dora: a flag, not a copy
           guide="DoRA: less memory, fewer parameters, quality",
           properties=("less_memory", "fewer_parameters", "quality"), config=_lora_config),
    Method("qlora", _load_4bit, _qlora, nf4_base=True,
           guide="QLoRA: cheaper, much less memory, fewer trainable parameters",
           properties=("cheaper", "less_memory", "much_less_memory", "fewer_parameters"),
           config=_lora_config, prepare=_kbit_prepare),
    Method("qat_int4", _load_quantized_base, _lora, base_quant="int4",
           label="LoRA against the int4 deployment base (quantization-aware)",
           guide="QAT int4 + LoRA: trained against the int4 base it is served with, unmerged",
           properties=("fewer_parameters",), config=_lora_config),
    Method("ia3", _load_plain, _ia3, trains="ia3", guide="PEFT (IA3): fewer parameters",
           properties=("fewer_parameters",), config=_ia3_config),
    Method("prompt_tuning", _load_plain, _prompt_tuning, trains="prompt",
           guide="PEFT (prompt tuning): fewer parameters", properties=("fewer_parameters",),
           config=_prompt_tuning_config),
)}


def spec(name: str) -> Method:
    """The method spec by name (``ValueError`` naming the supported ones)."""
    return method_for({"method": name})


def method_for(plan: dict[str, Any]) -> Method:
    try:
        return METHODS[plan["method"]]
    except KeyError:
        raise ValueError(f"train: method {plan['method']!r} is not supported "
                         f"(supported: {', '.join(METHODS)})") from None


def label_prefix(plan: dict[str, Any]) -> int:
    """Positions peft prepends to the sequence (prompt tuning's virtual tokens): per-token labels
    need as many -100s in front, or logits and labels do not line up."""
    head = heads.of(plan)
    if head.per_token and not head.generative and plan.get("method") and spec(plan["method"]).virtual_tokens:
        return int((plan.get("peft") or {}).get("num_virtual_tokens") or 0)
    return 0


def build(base_dir: Path, plan: dict[str, Any]) -> Any:
    """Load the base for the plan's method and wrap it; full fine-tuning returns the base."""
    m = method_for(plan)
    model = m.load(base_dir, plan)
    model.config.use_cache = False
    return model if m.wrap is None else m.wrap(model, plan)


def wrap(model: Any, plan: dict[str, Any]) -> Any:
    """Wrap an already-loaded base (e.g. built under DeepSpeed ZeRO-3 init) for the plan's method."""
    m = method_for(plan)
    return model if m.wrap is None else m.wrap(model, plan)
