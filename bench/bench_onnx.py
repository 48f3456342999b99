"""ONNX Runtime vs PyTorch on CPU on the pipeline's fine-tuned model, one run, side by side.

Reads a finished optimize stage (``paths.optimize_dir`` of ``--params``, plus ``--set`` overrides):
PyTorch fp32 is the merged fine-tuned model (base + the train stage's adapter); every dynamic-shape
variant the stage built (accepted or not) is an ORT engine, from the stage's files, built by the
export package (``tuneops/export``) and gated by the stage: onnxruntime-genai's own INT4 and INT8
are the stage variants ``genai_int4`` / ``genai_int8`` (fused ``GroupQueryAttention`` + rotary,
like the stage's fp32 graph with ``optimize.exporter: builder``). Same prompts (the first user turn of held-out rows,
through the model's own chat template) and the same perplexity rows as the stage's gate
(``optimize.ppl_samples``) for every engine; medians over prompts of first-token latency and
decode tokens/s (``--new-tokens`` greedy tokens with the KV cache, stop tokens ignored, through the
pipeline's own decode loop, ``tuneops.inference.decode``); engines interleaved per prompt so load
changes hit all alike. The stage's per-layer sensitivity report
(calibrated ``int4``, opt-in: run the stage with ``--set 'optimize.extra_variants=[int4]'``) is
copied into the results.

    tuneops run --set 'optimize.extra_variants=[genai_int4,genai_int8]'      # the stage builds and gates them
    python bench/bench_onnx.py                                                # then the benchmark reads them
    python bench/bench_onnx.py --set model.source=gemma3-270m                # after such a run on Gemma

Writes ``bench/results/onnx-cpu.md`` (+ ``.json``; ``--out`` to choose).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts_and_ppl_set(rows, tokenizer, n_prompts: int, n_ppl: int, max_len: int):
    from tuneops.inference.chat import prompt_ids
    from tuneops.inference.scoring import encode

    prompts = [prompt_ids(tokenizer, r["messages"][:1]) for r in rows[:n_prompts]]
    return prompts, encode(rows[:n_ppl], tokenizer, max_len)


def time_decode(runtime, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(first-token latency s, decode tokens/s over the following ``new_tokens``): the pipeline's own
    decode loop (``tuneops.inference.decode``, greedy, KV cache, stop tokens ignored)."""
    from tuneops.inference.decode import decode

    steps = decode(runtime, [prompt], new_tokens + 1)
    t0 = time.perf_counter()
    next(steps)                       # the prefill and the first token
    t1 = time.perf_counter()
    for _ in steps:                   # one step per token
        pass
    t2 = time.perf_counter()
    return t1 - t0, new_tokens / (t2 - t1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE (as tuneops --set)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx-cpu.md"))
    args = ap.parse_args()

    import torch

    from tuneops.inference import finetuned
    from tuneops.config import load_config
    from tuneops.export.exporter import graph_size
    from tuneops.io import read_json, read_jsonl
    from tuneops.models import load_tokenizer
    from tuneops.inference.runtimes import OnnxCausalLM, TorchCausalLM
    from tuneops.inference.scoring import perplexity, torch_forward

    cfg = load_config(args.params, args.overrides)
    o = cfg.optimize
    torch.set_num_threads(args.threads)
    base, stage = cfg.path("base_model_dir"), cfg.path("optimize_dir")
    metrics = read_json(stage / "metrics.json")
    tok = load_tokenizer(base)
    rows = read_jsonl(cfg.path("clean_eval_data"))
    prompts, ppl_set = prompts_and_ppl_set(rows, tok, args.prompts, o.ppl_samples, cfg.model.max_seq_len)
    model = finetuned.load(base, cfg.path("train_dir"), merge=True).eval()

    build: dict[str, float] = {k: v for k, v in metrics.get("timings", {}).items()}
    engines = {"PyTorch fp32": TorchCausalLM(model)}
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in model.state_dict().values()}   # tied: once
    sizes = {"PyTorch fp32": sum(unique.values())}
    ppls = {"PyTorch fp32": perplexity(torch_forward(model), ppl_set, o.batch_size, tok.pad_token_id)["perplexity"]}
    gates = {}
    for name, v in metrics["variants"].items():
        if v.get("fixed_shape"):
            continue
        label = f"ORT {name}"
        lm = OnnxCausalLM(stage / v["path"], threads=args.threads)
        engines[label] = lm
        sizes[label] = graph_size(stage / v["path"])
        ppls[label] = perplexity(lm, ppl_set, o.batch_size, tok.pad_token_id)["perplexity"]
        gates[label] = "accepted" if v["accepted"] else "rejected"
        print(label, "ppl", ppls[label], flush=True)
    # warm-up, then engines interleaved per prompt so load changes hit all of them alike
    for runtime in engines.values():
        time_decode(runtime, prompts[0], 4)
    results: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "tps": []} for n in engines}
    for prompt in prompts:
        for name, runtime in engines.items():
            ttft, tps = time_decode(runtime, prompt, args.new_tokens)
            results[name]["ttft"].append(ttft)
            results[name]["tps"].append(tps)
    ref = "PyTorch fp32"
    med = {n: {"ttft_ms": 1000 * statistics.median(r["ttft"]), "tok_s": statistics.median(r["tps"])}
           for n, r in results.items()}
    rows_out = []
    for n in engines:
        rows_out.append({"engine": n, "decode_tok_s": med[n]["tok_s"], "speedup": med[n]["tok_s"] / med[ref]["tok_s"],
                         "first_token_ms": med[n]["ttft_ms"], "size_mb": sizes[n] / 2**20,
                         "size_ratio": sizes[n] / sizes[ref], "perplexity": ppls[n],
                         "ppl_change_pct": 100 * (ppls[n] / ppls[ref] - 1), "gate": gates.get(n, "")})
    goal = [r["engine"] for r in rows_out if r["engine"] != ref and r["speedup"] >= 8
            and r["ppl_change_pct"] <= 3 and r["size_ratio"] <= 0.2]
    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
           "model": cfg.model.source, "prompts": len(prompts), "new_tokens": args.new_tokens,
           "ppl_samples": len(ppl_set), "median_prompt_tokens": statistics.median(len(p) for p in prompts)}
    lines = ["# ONNX Runtime vs PyTorch on CPU (bench/bench_onnx.py)", "",
             f"Fine-tuned `{cfg.model.source}` (merged adapter); {env['prompts']} prompts (median "
             f"{env['median_prompt_tokens']} tokens), {args.new_tokens} greedy tokens each, {args.threads} threads "
             f"on {env['cores']} cores; perplexity on the gate's {env['ppl_samples']} held-out chat rows. One run, "
             "engines interleaved per prompt, medians over prompts.", "",
             "| engine | decode tok/s | × PyTorch | first token ms | size MB | size × | perplexity | ppl change | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows_out:
        lines.append(f"| {r['engine']} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f} | {r['first_token_ms']:.0f} | "
                     f"{r['size_mb']:.0f} | {r['size_ratio']:.2f} | {r['perplexity']:.3f} | "
                     f"{r['ppl_change_pct']:+.2f}% | {r['gate']} |")
    lines += ["", f"Goal (≥ 8× PyTorch fp32 decode tok/s, perplexity ≤ +3%, size ≤ 0.2×): "
              f"{', '.join(goal) if goal else 'not met by any engine'}.", "",
              f"Build times (s): {json.dumps({k: round(v, 1) for k, v in build.items()})}", ""]
    int4 = metrics["variants"].get("int4", {})
    if int4.get("sensitivity"):
        lines += ["## Per-layer sensitivity (calibrated int4, optimize stage)", "",
                  f"Each unit alone in 4-bit (GPTQ), the rest fp32, on held-out rows ({int4.get('sensitivity_rows')}): "
                  f"KL from the fp32 model per scored token, the perplexity change it implies (exp(KL) - 1: "
                  f"what ranks the units), and the measured perplexity change. Kept in 8-bit: "
                  f"{', '.join(int4.get('units_8bit') or []) or 'none'}; LM-head rows in 8-bit: "
                  f"{int4.get('lm_head_rows_8bit', 0):,}; weights {int4.get('weights_size_ratio', 0):.3f}x their fp32 "
                  f"bytes. PyTorch perplexity on those rows: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in int4.get("calibration_perplexity", {}).items()) + ".", "",
                  "| unit | params | KL alone in 4-bit | implied ppl change | measured ppl change | bits (8-bit params) |",
                  "|---|---:|---:|---:|---:|---:|"]

        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:+.2f}%"
        for unit, r in int4["sensitivity"].items():
            kl = r.get("kl_alone_4bit")
            lines.append(f"| {unit} | {r['params']:,} | {'n/a' if kl is None else f'{kl:.4f}'} | "
                         f"{pct(r.get('contribution_pct'))} | {pct(r['ppl_change_pct_alone_4bit'])} | "
                         f"{r['bits']} ({r.get('params_8bit', 0):,}) |")
        lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows_out, "build": build, "raw": results,
                                                    "int4": {k: int4.get(k) for k in ("sensitivity", "units_8bit",
                                                                                         "calibration_perplexity",
                                                                                         "lm_head_rows_8bit",
                                                                                         "weights_size_ratio")}},
                                                   indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
