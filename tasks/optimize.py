"""Stage `optimize`: merge the adapter, build the fp32 ONNX causal LM with a KV cache once
(``optimize.exporter``: onnxruntime-genai's model builder, fused attention, seconds; or
``torch.onnx`` + ONNX Runtime's fusions, minutes), check ONNX Runtime parity with PyTorch (full
sequence and incremental decoding), build the variants the target profiles (and
``optimize.extra_variants``) ask for from that one graph (or, for ``genai_*``, from the merged
folder), gate each variant and write a coverage report per variant and target.

The work is in ``tuneops/export`` (exporter, graph passes, quantizers, the calibrated 4-bit recipe,
the variant registry, the gates); this stage wires it over paths and params.

Outputs in ``paths.optimize_dir``: ``<variant>/model.onnx`` (+ ``.data``),
``<variant>/coverage-<target>.json``, ``metrics.json`` (per variant: size, perplexity,
change vs PyTorch, gate, coverage, build time; ``default_variant`` = the first accepted variant of
``optimize.default_order``, never a rejected one).

Classification / NER head models are not exported (yet): ``metrics.json`` records
``variants: {}`` and the reason under ``skipped``; register then registers the PyTorch model.
"""
from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any

from tuneops import families, log, targets
from tuneops.config import Config
from tuneops.export import exporter, gate, passes
from tuneops.export.variants import Context, get
from tuneops.export.variants import wanted as variants_wanted
from tuneops.inference import finetuned
from tuneops.inference.runtimes import OnnxCausalLM
from tuneops.inference.scoring import encode, perplexity, torch_distortion, torch_forward, torch_perplexity
from tuneops.io import fresh_dir, read_jsonl, write_json
from tuneops.models import load_tokenizer, provenance

HEAD_SKIP = ("ONNX export of {head} models is not implemented in this stage yet: no ONNX variants; "
             "register registers the PyTorch model")


def _coverage(path: Path, profiles: dict[str, dict[str, Any]], context: int) -> dict[str, Any]:
    reports = {}
    for name, profile in profiles.items():
        report = targets.coverage(path, profile, context)
        write_json(path.parent / f"coverage-{name}.json", report)
        reports[name] = {k: report[k] for k in ("node_share", "matmul_flops_share", "cpu_fallback_ops")}
    return reports


def _unmerged(cfg: Config, info: dict[str, Any], out: Path, how: str, reference: Any, parity_rows: list[Any],
              ppl_rows: list[Any], pad: int) -> dict[str, Any] | None:
    """The adapter exported unmerged over its shared base graph (``optimize.adapter_base``), gated."""
    from tuneops.export import adapters
    from tuneops.training.methods import spec

    o = cfg.optimize
    quant = adapters.unmerged_quant(spec(info["method"]) if info.get("artifact") == "adapter" else None,
                                    o.adapter_base, o.lora_adapter_base)
    if quant is None:
        return None
    # its folder's name is its artifact name in the registered version, beside training's "adapter"
    with log.step(f"optimize: the adapter unmerged over the shared {quant.name} base graph"):
        return adapters.export_unmerged(
            cfg.path("base_model_dir"), cfg.path("train_dir"), out / "unmerged_adapter", cfg.path("state_dir") / "adapter-bases",
            quant, how, o.opset, reference, parity_rows, ppl_rows, o.batch_size, pad, o.parity_atol,
            o.kv_parity_tokens, str(provenance(cfg.path("base_model_dir")).get("source", "")),
            o.nbits_accuracy_level, o.max_ppl_change_pct.get(quant.name, 0.0))


def run(cfg: Config) -> dict[str, Any]:
    from tuneops.io import read_json
    from tuneops.training.heads import is_head

    info = read_json(cfg.path("train_dir") / "metrics.json")
    if is_head(finetuned.head_plan(info)):
        out = fresh_dir(cfg.path("optimize_dir"))
        metrics = {"task_head": info["task_head"], "variants": {}, "default_variant": None,
                   "skipped": HEAD_SKIP.format(head=info["task_head"])}
        write_json(out / "metrics.json", metrics)
        write_json(out / "variants.json", [])
        return {"optimize_dir": str(out), **metrics}
    o = cfg.optimize
    profiles = {t: targets.load(t) for t in o.targets}
    wanted = variants_wanted(o, profiles)     # the CLI / flow checked it before the first stage too
    fixed_shapes = {tuple(p["fixed_shape"].values()) for p in profiles.values()
                    if p.get("fixed_shape") and any(get(v).fixed_shape for v in p["variants"])}
    if len(fixed_shapes) > 1:
        raise ValueError(f"targets building fixed-shape variants need one fixed shape, got {sorted(fixed_shapes)}")
    base_dir, out = cfg.path("base_model_dir"), fresh_dir(cfg.path("optimize_dir"))

    tokenizer = load_tokenizer(base_dir)
    features = encode(read_jsonl(cfg.path("clean_eval_data")), tokenizer, cfg.model.max_seq_len)
    ppl_set, pad = features[: o.ppl_samples], tokenizer.pad_token_id
    # training sequences, tokenized on first use (only calibrated variants read them)
    calibration = functools.cache(
        lambda: encode(read_jsonl(cfg.path("clean_train_data")), tokenizer, cfg.model.max_seq_len))

    model = finetuned.load(base_dir, cfg.path("train_dir"), merge=True).eval()
    family = families.for_config(model.config)
    export_facts = family.export_facts(model.config)
    specs = [get(n) for n in wanted[1:]]
    how = exporter.choose(o.exporter, family, specs)
    reference = torch_forward(model)
    torch_score = gate.score(reference, ppl_set, o.batch_size, pad)
    timings: dict[str, float] = {}
    merged = None
    if how == "builder" or any(v.builder for v in specs):
        t = time.perf_counter()          # the builder reads a Hugging Face folder
        merged = exporter.save_merged(model, tokenizer, out / "merged")
        timings["merged_folder_s"] = time.perf_counter() - t
    t = time.perf_counter()
    fp32 = out / "fp32" / "model.onnx"
    graph: dict[str, Any] = {"optimizer": None}
    if how == "builder":
        with log.step("optimize: fp32 ONNX graph with KV cache (onnxruntime-genai's builder: fused attention)"):
            exporter.export_builder(merged, fp32)
        timings["export_s"] = time.perf_counter() - t
        graph = {"optimizer": "onnxruntime-genai model builder", "fused_ops": exporter.fused_ops(fp32)}
    else:
        with log.step("optimize: ONNX export with KV cache (torch.onnx)"):
            raw = exporter.export_causal_lm(model, out / "export" / "model.onnx" if o.graph_optimization else fp32,
                                            o.opset)
        timings["export_s"] = time.perf_counter() - t
        if o.graph_optimization:
            t = time.perf_counter()
            graph = {"optimizer": "onnxruntime.transformers (gpt2 fusions)", **passes.optimize_graph(raw, fp32, model)}
            shutil.rmtree(raw.parent, ignore_errors=True)
            timings["graph_optimization_s"] = time.perf_counter() - t
    lm = OnnxCausalLM(fp32)
    parity = gate.max_logits_diff(reference, lm, features[: o.parity_samples])
    incremental = gate.incremental_diff(lm, features[: o.parity_samples], o.kv_parity_tokens)
    fp32_ppl = perplexity(lm, ppl_set, o.batch_size, pad)["perplexity"]
    del lm
    unmerged = _unmerged(cfg, info, out, how, reference, features[: o.parity_samples], ppl_set, pad)
    fixed, shape, fixed_set, torch_fixed = None, (1, 1), ppl_set, torch_score
    if fixed_shapes:
        shape = fixed_shapes.pop()
        fixed = exporter.export_logits(model, out / "fp32_fixed" / "model.onnx", o.opset, shape)
        # fixed-shape variants score the same sequences cut to the fixed length, against
        # PyTorch on the same cut sequences
        fixed_set = [{k: v[: shape[1]] for k, v in f.items()} for f in ppl_set]
        torch_fixed = gate.score(reference, fixed_set, o.batch_size, pad)
    ctx = Context(fp32=fp32, fixed=fixed, shape=shape, params=o, calibration=calibration, pad_id=pad, merged=merged,
                  gate_score=lambda: torch_perplexity(model, ppl_set, o.batch_size, pad)["perplexity"])
    # calibration decisions (which layers stay 8-bit) are scored on held-out rows the gate does not
    # score, so the gate's verdict is not measured on the rows the plan was fitted to
    tune_set, tune_rows = features[o.ppl_samples: 2 * o.ppl_samples], "eval rows after the gate's"
    if not tune_set:
        tune_set, tune_rows = ppl_set, "the gate's rows (the eval split has no others)"
    scorer = None
    for name in wanted[1:]:                        # torch-side steps (calibration) while the model is loaded
        variant = get(name)
        if variant.prepare is not None:
            t = time.perf_counter()
            with log.step(f"optimize: {name}: calibrate on the PyTorch model"):
                scorer = scorer or torch_distortion(model, tune_set, o.batch_size, pad)
                ctx.prepared[name] = variant.prepare(model, ctx, scorer)
            ctx.info.setdefault(name, {})["sensitivity_rows"] = f"{len(tune_set)} {tune_rows}"
            timings[f"{name}_prepare_s"] = time.perf_counter() - t
    ctx.gate_score = None
    del model, reference                           # variants build from the ONNX export alone

    variants: dict[str, dict[str, Any]] = {}
    fp32_size = exporter.graph_size(fp32)
    variants["fp32"] = {
        "path": str(fp32.relative_to(out)), "exporter": how, "size_bytes": fp32_size, "perplexity": fp32_ppl,
        "max_abs_logits_diff": parity, "incremental_max_abs_diff": incremental,
        "accepted": parity <= o.parity_atol and incremental <= o.parity_atol,
        "gate": f"max abs logits diff <= {o.parity_atol} (full sequence vs PyTorch, and KV-cache decoding vs full)"}
    for i, name in enumerate(wanted[1:], 1):
        variant = get(name)
        log.log.info(f"optimize: variant {name} ({i}/{len(wanted) - 1}): build, score, gate ...")
        dst = out / name / "model.onnx"
        t = time.perf_counter()
        variant.build(ctx, dst)
        timings[f"{name}_s"] = time.perf_counter() - t
        if how == "builder" and not variant.builder and not variant.fixed_shape:
            exporter.copy_sidecar(fp32, dst)       # genai_config.json + tokenizer: onnxruntime_genai runs it too
        got = gate.score(OnnxCausalLM(dst), fixed_set if variant.fixed_shape else ppl_set, o.batch_size, pad)
        size = exporter.graph_size(dst)
        variants[name] = {"path": str(dst.relative_to(out)), "size_bytes": size, "size_ratio": size / fp32_size,
                          **gate.gate_quantized(name, got, torch_fixed if variant.fixed_shape else torch_score,
                                                o.max_ppl_change_pct, o.min_top1_agreement), **ctx.info.get(name, {})}
        if variant.fixed_shape:
            variants[name].update(fixed_shape=list(shape), torch_perplexity_at_fixed_shape=torch_fixed["perplexity"])
    for name, v in variants.items():
        v["coverage"] = _coverage(out / v["path"], profiles, o.coverage_context)
    for scratch in (fixed.parent if fixed is not None else None, merged):
        if scratch is not None:
            shutil.rmtree(scratch)
    metrics = {"torch_perplexity": torch_score["perplexity"], "ppl_samples": len(ppl_set),
               "parity_samples": o.parity_samples, "export": export_facts, "targets": list(o.targets),
               "graph_optimization": graph, "timings": timings, "variants": variants,
               "default_variant": gate.choose_default(variants, list(o.default_order)),
               **({"adapter": unmerged} if unmerged else {})}
    write_json(out / "metrics.json", metrics)
    write_json(out / "variants.json", [      # size vs perplexity per variant (the plot dvc.yaml declares)
        {"variant": n, "size_mb": v["size_bytes"] / 1e6, "perplexity": v["perplexity"], "accepted": v["accepted"]}
        for n, v in variants.items()])
    return {"optimize_dir": str(out), **metrics}
