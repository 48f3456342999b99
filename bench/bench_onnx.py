"""ONNX Runtime vs PyTorch on CPU, one run, side by side (issue 6).

Same prompt set for every engine; medians over prompts of first-token latency (prefill
+ first token) and decode tokens/s (the next ``--new-tokens`` tokens, greedy, KV cache,
stop tokens ignored so every engine decodes the same count); file sizes; perplexity on
held-out chat rows (assistant tokens) and its change vs PyTorch fp32.

Engines: PyTorch fp32 (HF model, DynamicCache loop), ORT fp32 (our torch.onnx export with
KV cache + ORT transformer fusions), ORT INT8 and ORT INT4 (the optimize stage's recipes
with params.yaml's settings: weight-only MatMulNBits, int8 embedding rows), and onnxruntime-genai INT4 (Microsoft's
model builder from the same local folder) when ``--genai``.

    python bench/bench_onnx.py --model models/base --data artifacts/data/eval.jsonl

Writes ``bench/results/onnx-cpu.md`` (+ ``.json``).
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompts_and_ppl_set(data: Path, tokenizer, n_prompts: int, n_ppl: int, max_len: int):
    from tuneops.chat import render
    from tuneops.io import read_jsonl
    from tuneops.lm import encode

    rows = read_jsonl(data)
    prompts = []
    for r in rows[:n_prompts]:
        text = render(r["messages"][:1], add_generation_prompt=True, bos="")
        prompts.append([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts, encode(rows[:n_ppl], tokenizer, max_len)


def time_decode(first_step, next_step, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(first-token latency s, decode tokens/s over the following ``new_tokens``)."""
    t0 = time.perf_counter()
    state, token = first_step(prompt)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        state, token = next_step(state, token)
    t2 = time.perf_counter()
    return t1 - t0, new_tokens / (t2 - t1)


def torch_engine(model):
    import torch

    def first(prompt):
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        return (out.past_key_values if hasattr(out, "past_key_values") else out.cache, len(prompt)), int(
            out.logits[0, -1].argmax())

    def nxt(state, token):
        cache, n = state
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True,
                        attention_mask=torch.ones(1, n + 1, dtype=torch.long))
        return (out.cache if hasattr(out, "cache") else out.past_key_values, n + 1), int(out.logits[0, -1].argmax())
    return first, nxt


def ort_engine(lm):
    def first(prompt):
        ids = np.array([prompt], np.int64)
        logits, cache = lm.step(ids, np.ones_like(ids), lm.empty_cache(1))
        return (cache, len(prompt)), int(logits[0, -1].argmax())

    def nxt(state, token):
        cache, n = state
        logits, cache = lm.step(np.array([[token]], np.int64), np.ones((1, n + 1), np.int64), cache)
        return (cache, n + 1), int(logits[0, -1].argmax())
    return first, nxt


def genai_engine(model):
    import onnxruntime_genai as og

    def first(prompt):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 1024, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        gen.generate_next_token()
        return gen, int(gen.get_next_tokens()[0])

    def nxt(gen, token):
        gen.generate_next_token()
        return gen, int(gen.get_next_tokens()[0])
    return first, nxt


def genai_perplexity(model, features) -> float:
    """Perplexity from onnxruntime-genai's full-prompt logits (one sequence at a time)."""
    import onnxruntime_genai as og

    from tuneops.lm import nll

    total, count = 0.0, 0
    for f in features:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(f["input_ids"]) + 1024)
        gen = og.Generator(model, params)
        gen.append_tokens(f["input_ids"])
        logits = gen.get_output("logits")
        s, n = nll(logits, np.array([f["labels"]]))
        total, count = total + s, count + n
    return float(np.exp(total / max(count, 1)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "base"), help="HF causal-LM folder (fp32)")
    ap.add_argument("--data", default=str(ROOT / "artifacts" / "data" / "eval.jsonl"), help="chat JSONL")
    ap.add_argument("--work", default=str(ROOT / ".tuneops" / "bench-onnx"), help="exports go here")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--ppl-samples", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genai", action="store_true", help="also onnxruntime-genai INT4 (model builder)")
    ap.add_argument("--reuse", action="store_true", help="reuse exports already in --work (else rebuild them)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx-cpu.md"))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.optimize import export_causal_lm, optimize_graph, quantize_nbits
    from tuneops.io import dir_size
    from tuneops.lm import perplexity, torch_forward
    from tuneops.onnx_lm import OnnxCausalLM

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts, ppl_set = prompts_and_ppl_set(Path(args.data), tok, args.prompts, args.ppl_samples, args.max_len)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()

    build: dict[str, float] = {}
    paths = {"ORT fp32": work / "fp32" / "model.onnx", "ORT INT8": work / "int8" / "model.onnx",
             "ORT INT4": work / "int4" / "model.onnx"}
    if not (args.reuse and paths["ORT fp32"].is_file()):
        t = time.perf_counter()
        raw = export_causal_lm(model, work / "export" / "model.onnx", 20)
        build["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        fused = optimize_graph(raw, paths["ORT fp32"], model)
        build["graph_optimization_s"] = time.perf_counter() - t
        print("fused", fused["fused_ops"], flush=True)
    # the stage's recipes with the params.yaml defaults (optimize.block_size, nbits_accuracy_level)
    from tuneops.config import load_config

    o = load_config(ROOT / "params.yaml").optimize
    for name, bits in (("ORT INT8", 8), ("ORT INT4", 4)):
        if not (args.reuse and paths[name].is_file()):
            t = time.perf_counter()
            quantize_nbits(paths["ORT fp32"], paths[name], bits, o.block_size, o.nbits_accuracy_level)
            build[f"{name.split()[-1].lower()}_s"] = time.perf_counter() - t
    genai_dir = work / "genai-int4"
    if args.genai and not (args.reuse and (genai_dir / "genai_config.json").is_file()):
        from tuneops.genai import build as genai_build

        t = time.perf_counter()
        genai_build(Path(args.model), genai_dir, "int4", work / "genai-cache")
        build["genai_int4_s"] = time.perf_counter() - t

    engines = {"PyTorch fp32": torch_engine(model)}
    sizes = {"PyTorch fp32": sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))}
    ppls = {"PyTorch fp32": perplexity(torch_forward(model), ppl_set, 2, tok.pad_token_id)["perplexity"]}
    for name, path in paths.items():
        lm = OnnxCausalLM(path, threads=args.threads)
        engines[name] = ort_engine(lm)
        sizes[name] = dir_size(path.parent)
        ppls[name] = perplexity(lm, ppl_set, 2, tok.pad_token_id)["perplexity"]
        print(name, "ppl", ppls[name], flush=True)
    if args.genai:
        import onnxruntime_genai as og

        cfg = og.Config(str(genai_dir))
        cfg.clear_providers()
        gm = og.Model(cfg)
        engines["ORT-GenAI INT4"] = genai_engine(gm)
        sizes["ORT-GenAI INT4"] = sum(p.stat().st_size for p in genai_dir.glob("model.onnx*"))
        ppls["ORT-GenAI INT4"] = genai_perplexity(gm, ppl_set)

    # warm-up, then engines interleaved per prompt so load changes hit all of them alike
    for first, nxt in engines.values():
        time_decode(first, nxt, prompts[0], 4)
    results: dict[str, dict[str, list[float]]] = {n: {"ttft": [], "tps": []} for n in engines}
    for prompt in prompts:
        for name, (first, nxt) in engines.items():
            ttft, tps = time_decode(first, nxt, prompt, args.new_tokens)
            results[name]["ttft"].append(ttft)
            results[name]["tps"].append(tps)
    base = "PyTorch fp32"
    med = {n: {"ttft_ms": 1000 * statistics.median(r["ttft"]), "tok_s": statistics.median(r["tps"])}
           for n, r in results.items()}
    rows = []
    for n in engines:
        rows.append({"engine": n, "decode_tok_s": med[n]["tok_s"], "speedup": med[n]["tok_s"] / med[base]["tok_s"],
                     "first_token_ms": med[n]["ttft_ms"], "size_mb": sizes[n] / 2**20,
                     "size_ratio": sizes[n] / sizes[base], "perplexity": ppls[n],
                     "ppl_change_pct": 100 * (ppls[n] / ppls[base] - 1)})
    goal = [r["engine"] for r in rows if r["engine"] != base and r["speedup"] >= 2.5
            and r["ppl_change_pct"] <= 3 and r["size_ratio"] <= 0.3]
    env = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": args.threads,
           "model": args.model, "prompts": len(prompts), "new_tokens": args.new_tokens,
           "ppl_samples": len(ppl_set), "median_prompt_tokens": statistics.median(len(p) for p in prompts)}
    lines = ["# ONNX Runtime vs PyTorch on CPU (bench/bench_onnx.py)", "",
             f"Model `{args.model}`; {env['prompts']} prompts (median {env['median_prompt_tokens']} tokens), "
             f"{args.new_tokens} greedy tokens each, {args.threads} threads on {env['cores']} shared cores; "
             f"perplexity on {env['ppl_samples']} held-out chat rows. One run, medians over prompts.", "",
             "| engine | decode tok/s | × PyTorch | first token ms | size MB | size × | perplexity | ppl change |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f} | {r['first_token_ms']:.0f} | "
                     f"{r['size_mb']:.0f} | {r['size_ratio']:.2f} | {r['perplexity']:.3f} | {r['ppl_change_pct']:+.2f}% |")
    lines += ["", f"Goal (≥ 2.5× PyTorch decode tok/s, perplexity +≤3%, size ≤ 0.3×): "
              f"{', '.join(goal) if goal else 'not met by any variant'}.", "",
              f"Build times (s): {json.dumps({k: round(v, 1) for k, v in build.items()})}", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows, "build": build,
                                                    "raw": results}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
