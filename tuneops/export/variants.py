"""The ONNX variants the optimize stage can build: one registry, one entry per variant.

A target profile (``tuneops/targets/<name>.yaml``) names the variants it needs; params may add more
(``optimize.extra_variants``). Each variant builds from the one fp32 export of the stage run (or
the fixed-shape export, for fixed-shape targets) and passes the same gate
(``optimize.max_ppl_change_pct`` / ``min_top1_agreement``, keyed by the variant's name).

A new variant is one ``Variant(...)`` in ``VARIANTS``: its build function, whether it is scored at
the fixed shape, whether it needs the ``torch.onnx`` graph (``torch_graph``: it maps PyTorch module
names to graph nodes) or builds from the merged model's folder with onnxruntime-genai's builder
(``builder``), and, when it needs the PyTorch model (calibration), a ``prepare`` step that runs
while the merged model is still loaded (the stage frees it before any variant is built).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import calibrated, exporter, quantizers


@dataclass
class Context:
    """What a variant's build reads: the exports, the params, calibration data, prepared results."""
    fp32: Path                               # fp32 graph with KV cache (torch.onnx + fusions, or the builder's)
    fixed: Path | None                       # fixed-shape logits export (targets with a fixed shape)
    shape: tuple[int, int]                   # that fixed shape (batch, sequence)
    params: Any                              # OptimizeParams
    calibration: Callable[[], list[dict[str, list[int]]]]   # training sequences (tokenized lazily)
    pad_id: int
    merged: Path | None = None               # the merged model as a Hugging Face folder (builder variants)
    gate_score: Callable[[], float] | None = None   # PyTorch perplexity on the gate's rows (while loaded)
    prepared: dict[str, Any] = field(default_factory=dict)  # variant name -> its prepare() result
    info: dict[str, Any] = field(default_factory=dict)      # variant name -> facts for metrics.json


@dataclass(frozen=True)
class Variant:
    name: str
    help: str
    build: Callable[[Context, Path], Path]
    fixed_shape: bool = False                # scored on the fixed-shape export's sequences
    torch_graph: bool = False                # needs the torch.onnx graph (optimize.exporter: auto picks it)
    builder: bool = False                    # built by onnxruntime-genai's builder from ``Context.merged``
    # (model, ctx, scorer): scorer() -> {"perplexity", "kl"} of the PyTorch model as it is now on
    # held-out rows (lm.torch_distortion)
    prepare: Callable[[Any, Context, Callable[[], dict[str, float]]], Any] | None = None


def _nbits(bits: int) -> Callable[[Context, Path], Path]:
    def build(ctx: Context, dst: Path) -> Path:
        o = ctx.params
        return quantizers.quantize_nbits(ctx.fp32, dst, bits, o.block_size, o.nbits_accuracy_level)
    return build


def _hqq4(ctx: Context, dst: Path) -> Path:
    return quantizers.quantize_hqq4(ctx.fp32, dst, ctx.params.block_size, ctx.params.nbits_accuracy_level)


def _int8_dynamic(ctx: Context, dst: Path) -> Path:
    return quantizers.quantize_int8_dynamic(ctx.fp32, dst)


def _qdq(ctx: Context, dst: Path) -> Path:
    o = ctx.params
    if ctx.fixed is None:
        raise ValueError("qdq needs a target profile with a fixed shape (fpga, npu)")
    calibration = quantizers.Calibration(ctx.calibration()[: o.calibration_samples], ctx.shape, ctx.pad_id)
    ctx.info["qdq"] = {"calibration_samples": len(calibration.batches) * ctx.shape[0]}
    return quantizers.quantize_qdq(ctx.fixed, dst, calibration, quantizers.qdq_ops(o.qdq_op_types))


def _genai(precision: str) -> Callable[[Context, Path], Path]:
    def build(ctx: Context, dst: Path) -> Path:
        from tuneops.export import genai

        if ctx.merged is None:
            raise ValueError(f"genai_{precision}: the merged model folder was not written")
        g = ctx.params.genai
        options = {"accuracy_level": str(ctx.params.nbits_accuracy_level), "block_size": str(ctx.params.block_size)}
        if precision == "int4":
            import json

            if json.loads((ctx.merged / "config.json").read_text()).get("tie_word_embeddings"):
                options["shared_embeddings"] = "true"    # the embedding reads the 4-bit head (GatherBlockQuantized)
            options.update(algo_config=g.int4_algo, **({"matmul_mixed_precision": g.int4_mixed_precision}
                                                       if g.int4_mixed_precision else {}))
        genai.build(ctx.merged, dst.parent, precision, extra_options=options)
        ctx.info[f"genai_{precision}"] = {"builder_options": options}
        return dst
    return build


def _prepare_int4(model: Any, ctx: Context, scorer: Callable[[], dict[str, float]]) -> calibrated.Plan:
    o, c = ctx.params, ctx.params.int4
    sequences = [f["input_ids"] for f in ctx.calibration()[: o.calibration_samples]]
    return calibrated.calibrate(model, sequences, scorer, o.block_size, c.percdamp, c.min_contribution_pct,
                                c.max_size_ratio, sensitivity=c.sensitivity, head_rows=c.head_rows,
                                head_positions=c.head_positions, block_size_8bit=c.block_size_8bit,
                                gate_score=ctx.gate_score,
                                # what quantization leaves as it is (the graph, norms, rotary caches),
                                # + the graph's own bytes again: the split head's and embedding's nodes
                                reserved_bytes=exporter.overhead_bytes(ctx.fp32) + ctx.fp32.stat().st_size)


def _int4(ctx: Context, dst: Path) -> Path:
    plan = ctx.prepared["int4"]
    facts = calibrated.write(ctx.fp32, dst, plan, ctx.params.nbits_accuracy_level)
    ctx.info["int4"] = {**ctx.info.get("int4", {}), **plan.report(), **facts,
                        "calibration_samples": ctx.params.calibration_samples}
    return dst


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("int8", "weight-only 8-bit MatMulNBits (round to nearest, symmetric, block scales)", _nbits(8)),
    Variant("int4", "calibrated 4-bit: GPTQ on training sequences, per-layer sensitivity, 8-bit where it pays",
            _int4, prepare=_prepare_int4),
    Variant("int4_rtn", "4-bit MatMulNBits, round to nearest (no calibration)", _nbits(4)),
    Variant("int4_hqq", "4-bit MatMulNBits, HQQ (optimised scale + zero point per block; no calibration)", _hqq4),
    Variant("int8_dynamic", "quantize_dynamic: int8 weights and int8 activations per call", _int8_dynamic),
    Variant("qdq", "static INT8 QDQ (MinMax calibration on training sequences) at the target's fixed shape",
            _qdq, fixed_shape=True),
    Variant("genai_int8", "onnxruntime-genai's builder, INT8 (its MatMulNBits recipe; embedding kept fp32)",
            _genai("int8"), builder=True),
    Variant("genai_int4", "onnxruntime-genai's builder, INT4 (optimize.genai: k-quant, mixed precision)",
            _genai("int4"), builder=True),
)}


def get(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown ONNX variant {name!r}; known: {['fp32', *VARIANTS]} (tuneops/export/variants.py)")
    return VARIANTS[name]


class VariantParamError(ValueError):
    """A variant named by params that the registry or the gate cannot serve; ``key`` is the params
    key at fault (``optimize.extra_variants``, ``optimize.max_ppl_change_pct``, ...)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


def wanted(params: Any, profiles: dict[str, dict[str, Any]]) -> list[str]:
    """The variants one optimize run builds, in order: fp32, each target profile's, then
    ``optimize.extra_variants``. Raises ``VariantParamError`` naming the params key when a name is not
    in ``VARIANTS`` or has no gate threshold: cheap (no model, no graph), so the CLI and the flow
    check it before the first stage (``tuneops.preflight``) and the stage again before its export."""
    names = list(dict.fromkeys(["fp32"] + [v for t in params.targets for v in profiles[t]["variants"]]
                               + list(params.extra_variants)))
    for name in names[1:]:
        try:
            get(name)
        except ValueError as exc:
            if name in params.extra_variants:
                raise VariantParamError("optimize.extra_variants", str(exc)) from None
            profile = next(t for t in params.targets if name in profiles[t]["variants"])
            raise VariantParamError("optimize.targets", f"target profile {profile!r} (tuneops/targets/"
                                                        f"{profile}.yaml): {exc}") from None
    torch_only = [v for v in names[1:] if get(v).torch_graph]
    if getattr(params, "exporter", "auto") == "builder" and torch_only:
        raise VariantParamError("optimize.exporter", f"builder: variant(s) {torch_only} need the torch.onnx graph "
                                                     f"(use auto, which picks torch for them, or torch)")
    for key in ("max_ppl_change_pct", "min_top1_agreement"):
        missing = [v for v in names[1:] if v not in getattr(params, key)]
        if missing:
            raise VariantParamError(f"optimize.{key}", f"no threshold for variant(s) {missing}: add "
                                                      f"{', '.join(f'{v}: <value>' for v in missing)}")
    return names
