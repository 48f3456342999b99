"""Quantization-aware int4 LoRA served unmerged vs today's path (fp32 LoRA -> merge -> int4), one run.

On the default model (SmolLM2-135M-Instruct, bundled data), in a bench project of its own
(``--root``, default ``.tuneops/bench-qat``), in phases (each cached, each a few minutes on 2 cores;
``--phase all`` runs them in order):

- ``setup``: the model, ingest and validate stages;
- ``train-lora``: select + train with ``select.method=lora`` (fp32 base): the fp32 fine-tune;
- ``train-qat``: the same run with ``select.method=qat_int4`` (the adapter trains against the int4
  base graph's own weights, ``tuneops.export.adapters.fake_quantize``);
- ``optimize``: the optimize stage on the fp32 fine-tune with ``extra_variants=[int4]``: today's
  path, merged then quantized (``int8`` and the calibrated GPTQ ``int4``), gated as usual;
- ``adapter``: the int4 base graph (exported once, cached) + the QAT adapter file, its parity with the
  PyTorch model (fake-quant base + adapter) and perplexities;
- ``report``: perplexity on the same eval rows as the stage's gate (``optimize.ppl_samples``) of the
  fp32 fine-tune (PyTorch), the merged int4 / int8 (ONNX), the QAT adapter served unmerged over the
  int4 base (ONNX); sizes vs the fp32 graph; decode tokens/s of the three ONNX engines (the
  pipeline's own decode loop, greedy, KV cache; engines interleaved per prompt).

Goal (issue 35): the QAT adapter within +1% eval perplexity of the fp32 fine-tune at <= 0.25x the
fp32 size. Writes ``bench/results/qat-int4-cpu.md`` (+ ``.json``).

    nice -n 5 timeout 900 python bench/bench_qat_int4.py --phase setup
    ... --phase train-lora; --phase train-qat; --phase optimize; --phase adapter; --phase report
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def project(root: Path, overrides: list[str]) -> Path:
    import yaml

    from tuneops.config import apply_overrides

    root.mkdir(parents=True, exist_ok=True)
    params, saved = root / "params.yaml", root / "overrides.json"
    if overrides:                  # the project's own overrides, kept: later phases rebuild params.yaml from
        saved.write_text(json.dumps(overrides))          # the current params.yaml + them (new keys included)
    elif saved.is_file():
        overrides = json.loads(saved.read_text())
    raw = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), tuple(overrides))
    raw["register"]["model_name"] = "bench-qat"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    return params


def cfg_for(params: Path, tag: str | None, *extra: str):
    from tuneops.config import load_config

    sets = [f"paths.plan=artifacts/select/plan-{tag}.json", f"paths.train_dir=artifacts/train-{tag}"] if tag else []
    return load_config(params, [*sets, *extra])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase", default="all",
                    choices=["all", "setup", "train-lora", "train-qat", "bases", "optimize", "adapter", "report",
                             "pool", "pool-one"])
    ap.add_argument("--n", type=int, default=1, help="pool-one: adapters served (0: the merged int4 model alone)")
    ap.add_argument("--root", default=str(ROOT / ".tuneops" / "bench-qat"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE for the bench project")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-variants", nargs="*", default=["int4"],
                    help="optimize: built besides int8 (default: the calibrated int4, today's path)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "qat-int4-cpu.md"))
    args = ap.parse_args()
    root = Path(args.root).resolve()
    params = project(root, args.overrides)
    phases = ["setup", "train-lora", "train-qat", "bases", "optimize", "adapter", "report", "pool"] if args.phase == "all" else [args.phase]
    for phase in phases:
        t = time.perf_counter()
        globals()["phase_" + phase.replace("-", "_")](params, args)
        print(f"phase {phase}: {time.perf_counter() - t:.0f} s", flush=True)
    return 0


def phase_setup(params: Path, args) -> None:
    from tuneops import stages

    cfg = cfg_for(params, None)
    for name in ("model", "ingest", "validate"):
        stages.get(name).load()(cfg)


def _train(params: Path, method: str) -> None:
    from tasks import select, train

    cfg = cfg_for(params, method, f"select.method={method}", f"select.allowed_methods=[{method}]")
    select.run(cfg)
    m = train.run(cfg)
    print(json.dumps({k: m.get(k) for k in ("method", "steps", "first_loss", "final_loss", "runtime_s")}))


def phase_train_lora(params: Path, args) -> None:
    _train(params, "lora")


def phase_train_qat(params: Path, args) -> None:
    _train(params, "qat_int4")


def phase_optimize(params: Path, args) -> None:
    from tasks import optimize

    cfg = cfg_for(params, "lora", "paths.optimize_dir=artifacts/optimize-lora",
                  f"optimize.extra_variants=[{','.join(args.extra_variants)}]")
    optimize.run(cfg)


def _eval_rows(cfg):
    from tuneops.inference.scoring import encode
    from tuneops.io import read_jsonl
    from tuneops.models import load_tokenizer

    tok = load_tokenizer(cfg.path("base_model_dir"))
    rows = read_jsonl(cfg.path("clean_eval_data"))
    return tok, rows, encode(rows, tok, cfg.model.max_seq_len)[: cfg.optimize.ppl_samples]


def _bases(cfg) -> dict:
    """The int4 base graphs (exported once, cached): fp32 activations (acc 0, the parity-gated one)
    and int8 activations (acc 4, as the merged int4/int8 variants run)."""
    from tuneops.export import adapters

    facts = {}
    for acc in (0, 4):
        t = time.perf_counter()
        base, info = adapters.cached_base(cfg.path("state_dir") / "adapter-bases", cfg.path("base_model_dir"),
                                          adapters.base_quant("int4"), "builder", cfg.optimize.opset, acc,
                                          cfg.model.source)
        facts[f"base_acc{acc}"] = {"path": str(base), "md5": info["md5"], "size_bytes": info["size_bytes"],
                                   "build_s": time.perf_counter() - t}
    return facts


def phase_bases(params: Path, args) -> None:
    print(json.dumps(_bases(cfg_for(params, "qat_int4")), indent=1))


def phase_adapter(params: Path, args) -> None:
    import torch

    from tuneops.export import adapters, gate
    from tuneops.inference import finetuned
    from tuneops.inference.runtimes import OnnxCausalLM
    from tuneops.inference.scoring import torch_forward
    from tuneops.io import write_json

    torch.set_num_threads(args.threads)
    cfg = cfg_for(params, "qat_int4")
    o = cfg.optimize
    tok, rows, feats = _eval_rows(cfg)
    out = cfg.path("state_dir").parent / "artifacts" / "adapter-qat"
    facts: dict = _bases(cfg)
    model = finetuned.load(cfg.path("base_model_dir"), cfg.path("train_dir")).eval()
    base0 = Path(facts["base_acc0"]["path"])
    facts["adapter"] = adapters.export_adapter(model, base0, out / "acc0", "qat_int4")
    adapters.export_adapter(model, Path(facts["base_acc4"]["path"]), out / "acc4", "qat_int4")
    ref = torch_forward(model)
    lm = OnnxCausalLM(base0, adapter=out / "acc0")
    facts["parity_max_abs_logits_diff"] = gate.max_logits_diff(ref, lm, feats[: o.parity_samples])
    facts["incremental_max_abs_diff"] = gate.incremental_diff(lm, feats[: o.parity_samples], o.kv_parity_tokens)
    facts["torch_fake_quant_ppl"] = gate.score(ref, feats, o.batch_size, tok.pad_token_id)["perplexity"]
    for acc in (0, 4):
        lm = OnnxCausalLM(Path(facts[f"base_acc{acc}"]["path"]), adapter=out / f"acc{acc}")
        facts[f"onnx_ppl_acc{acc}"] = gate.score(lm, feats, o.batch_size, tok.pad_token_id)["perplexity"]
    write_json(out / "facts.json", facts)
    print(json.dumps(facts, indent=1, default=str))


def phase_report(params: Path, args) -> None:
    import torch

    from bench_onnx import time_decode
    from tuneops.export import gate
    from tuneops.inference import finetuned
    from tuneops.inference.chat import prompt_ids
    from tuneops.inference.runtimes import OnnxCausalLM
    from tuneops.inference.scoring import torch_forward
    from tuneops.io import read_json, write_json

    torch.set_num_threads(args.threads)
    cfg = cfg_for(params, "lora")
    o = cfg.optimize
    tok, rows, feats = _eval_rows(cfg)
    art = cfg.path("state_dir").parent / "artifacts"
    stage = read_json(art / "optimize-lora" / "metrics.json")
    facts = read_json(art / "adapter-qat" / "facts.json")
    from tuneops.models import load_causal_lm

    base_model = load_causal_lm(cfg.path("base_model_dir")).eval()
    base_ppl = gate.score(torch_forward(base_model), feats, o.batch_size, tok.pad_token_id)["perplexity"]
    del base_model
    fp32_model = finetuned.load(cfg.path("base_model_dir"), cfg.path("train_dir"), merge=True).eval()
    fp32_ppl = gate.score(torch_forward(fp32_model), feats, o.batch_size, tok.pad_token_id)["perplexity"]
    del fp32_model
    fp32_bytes = stage["variants"]["fp32"]["size_bytes"]
    train = {m: read_json(art / f"train-{m}" / "metrics.json") for m in ("lora", "qat_int4")}
    merged = {f"merged {v}" + (" (GPTQ, today's path)" if v == "int4" else ""): v
              for v in ("int4", "int8") if v in stage["variants"]}      # a bench run may build int8 only
    engines = {name: OnnxCausalLM(art / "optimize-lora" / stage["variants"][v]["path"], threads=args.threads)
               for name, v in merged.items()}
    engines.update({
        "QAT int4 adapter, unmerged (acc 0)": OnnxCausalLM(Path(facts["base_acc0"]["path"]), threads=args.threads,
                                                           adapter=art / "adapter-qat" / "acc0"),
        "QAT int4 adapter, unmerged (acc 4)": OnnxCausalLM(Path(facts["base_acc4"]["path"]), threads=args.threads,
                                                           adapter=art / "adapter-qat" / "acc4"),
    })
    prompts = [prompt_ids(tok, r["messages"][:1]) for r in rows[: args.prompts]]
    speed: dict[str, list[float]] = {k: [] for k in engines}
    for p in prompts:
        for name, lm in engines.items():
            speed[name].append(time_decode(lm, p, args.new_tokens)[1])
    adapter_bytes = facts["adapter"]["size_bytes"]
    table = [
        ("fp32 LoRA fine-tune (PyTorch)", fp32_ppl, fp32_bytes, None, ""),
        *[(name, stage["variants"][v]["perplexity"], stage["variants"][v]["size_bytes"], name,
           "accepted" if stage["variants"][v]["accepted"] else "rejected") for name, v in merged.items()],
        ("QAT int4 adapter, unmerged (acc 0)", facts["onnx_ppl_acc0"], facts["base_acc0"]["size_bytes"] + adapter_bytes,
         "QAT int4 adapter, unmerged (acc 0)",
         f"parity {facts['parity_max_abs_logits_diff']:.2e} (gate <= {o.parity_atol})"),
        ("QAT int4 adapter, unmerged (acc 4)", facts["onnx_ppl_acc4"], facts["base_acc4"]["size_bytes"] + adapter_bytes,
         "QAT int4 adapter, unmerged (acc 4)", "int8 activations"),
    ]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "ppl_rows": len(feats), "fp32_ppl": fp32_ppl, "fp32_bytes": fp32_bytes,
              "base_ppl": base_ppl,
              "train": {m: {k: t.get(k) for k in ("steps", "first_loss", "final_loss", "runtime_s", "tokens_per_s")}
                        for m, t in train.items()},
              "torch_fake_quant_ppl": facts["torch_fake_quant_ppl"], "adapter_bytes": adapter_bytes,
              "rows": [{"engine": n, "perplexity": p, "ppl_vs_fp32_pct": 100 * (p / fp32_ppl - 1), "size_bytes": b,
                        "size_ratio": b / fp32_bytes,
                        "decode_tok_s": statistics.median(speed[e]) if e else None, "note": note}
                       for n, p, b, e, note in table]}
    qat = next(r for r in result["rows"] if r["engine"] == "QAT int4 adapter, unmerged (acc 0)")
    result["goal"] = {"ppl_within_1pct": qat["ppl_vs_fp32_pct"] <= 1.0, "size_le_0.25x": qat["size_ratio"] <= 0.25}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    lines = [f"# QAT int4 LoRA served unmerged vs fp32 LoRA -> merge -> int4 ({cfg.model.source}, CPU)", "",
             f"- date: {result['date']}, {args.threads} threads, perplexity on {len(feats)} held-out rows (the optimize "
             f"gate's), decode: median tokens/s over {len(prompts)} prompts x {args.new_tokens} greedy tokens",
             f"- command: `python bench/bench_qat_int4.py --phase all` (phases: setup, train-lora, train-qat, "
             f"optimize, adapter, report)",
             "- training: " + ", ".join(f"{m}: {t['steps']} steps, loss {t['first_loss']:.3f} -> {t['final_loss']:.3f}, "
                                         f"{t['runtime_s']:.0f} s" for m, t in result["train"].items()),
             f"- the base model before fine-tuning (PyTorch): perplexity {base_ppl:.4f} on the same rows",
             f"- QAT adapter's PyTorch reference (fake-quant base + adapter): perplexity {facts['torch_fake_quant_ppl']:.4f}; "
             f"ONNX parity {facts['parity_max_abs_logits_diff']:.2e}, KV-cache decoding vs full {facts['incremental_max_abs_diff']:.2e}",
             f"- sizes: fp32 graph {fp32_bytes / 1e6:.1f} MB; adapter file {adapter_bytes / 1e6:.2f} MB "
             f"(the int4 base graph is shared by every adapter of the base)", "",
             "| engine | perplexity | vs fp32 fine-tune | size MB | size vs fp32 | decode tok/s | note |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        tps = f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-"
        lines.append(f"| {r['engine']} | {r['perplexity']:.4f} | {r['ppl_vs_fp32_pct']:+.2f}% | {r['size_bytes'] / 1e6:.1f} | "
                     f"{r['size_ratio']:.3f}x | {tps} | {r['note']} |")
    lines += ["", f"- goal (QAT acc 0 within +1% of the fp32 fine-tune, <= 0.25x): "
                  f"perplexity {'PASS' if result['goal']['ppl_within_1pct'] else 'FAIL'}, "
                  f"size {'PASS' if result['goal']['size_le_0.25x'] else 'FAIL'}", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phase_pool_one(params: Path, args) -> None:
    """One process: ``--n`` fine-tunes (the QAT adapter and n-1 others, its B matrices perturbed) served
    through the model pool over one int4 base (or, n=0, the merged int4 model alone); RSS after
    loading, then decode tokens/s over requests that go round-robin to the n models."""
    import numpy as np
    import onnxruntime as ort

    from bench_onnx import time_decode
    from tuneops.export.basequant import ADAPTER_FILE, ADAPTER_JSON
    from tuneops.inference.chat import prompt_ids
    from tuneops.inference.pool import ModelPool
    from tuneops.inference.resolve import files_of_adapter, resolve
    from tuneops.io import read_json

    cfg = cfg_for(params, "qat_int4")
    art = cfg.path("state_dir").parent / "artifacts"
    tok, rows, _ = _eval_rows(cfg)
    prompts = [prompt_ids(tok, r["messages"][:1]) for r in rows[:8]]
    rss0 = _rss_mb()
    pool = ModelPool(limit=max(args.n, 1) + 1, threads=args.threads)
    if args.n == 0:
        stage = read_json(art / "optimize-lora" / "metrics.json")
        engines = [pool.get("merged", resolve(str(art / "optimize-lora" / stage["variants"]["int4"]["path"])))]
    else:
        src = art / "adapter-qat" / "acc4"
        fmt = ort.AdapterFormat.read_adapter(str(src / ADAPTER_FILE))
        base = {k: v.numpy() for k, v in fmt.get_parameters().items()}
        rng = np.random.default_rng(0)
        folders = []
        for i in range(args.n):
            folder = art / "adapter-pool" / f"a{i}"
            folder.mkdir(parents=True, exist_ok=True)
            params_i = {k: (v + rng.normal(0, 1e-3, v.shape).astype(np.float32) if i and k.endswith("lora_B") else v)
                        for k, v in base.items()}
            out = ort.AdapterFormat()
            out.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params_i.items()})
            out.export_adapter(str(folder / ADAPTER_FILE))
            (folder / ADAPTER_JSON).write_text((src / ADAPTER_JSON).read_text())
            folders.append(folder)
        rss0 = _rss_mb()
        engines = [pool.get(f"m{i}", files_of_adapter(f, f"m{i}")) for i, f in enumerate(folders)]
    rss = _rss_mb()
    t, tokens = time.perf_counter(), 0
    for i, p in enumerate(prompts):
        time_decode(engines[i % len(engines)].lm, p, args.new_tokens)
        tokens += args.new_tokens + 1
    result = {"n": args.n, "rss_mb": rss, "rss_before_load_mb": rss0, "bases_loaded": len(pool.bases.loaded()),
              "tok_s": tokens / (time.perf_counter() - t), "date": time.strftime("%H:%M UTC", time.gmtime())}
    (art / f"pool-n{args.n}.json").write_text(json.dumps(result))
    print("POOL " + json.dumps(result), flush=True)


def phase_pool(params: Path, args) -> None:
    import subprocess

    results = []
    art = cfg_for(params, "qat_int4").path("state_dir").parent / "artifacts"
    for n in (0, 1, 8, 32):
        if (art / f"pool-n{n}.json").is_file():          # measured by an earlier `--phase pool-one --n N`
            results.append(json.loads((art / f"pool-n{n}.json").read_text()))
            continue
        out = subprocess.run([sys.executable, __file__, "--phase", "pool-one", "--n", str(n), "--root", args.root,
                              "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)],
                             capture_output=True, text=True, timeout=900)
        line = next((x for x in out.stdout.splitlines() if x.startswith("POOL ")), None)
        if line is None:
            raise RuntimeError(f"pool-one --n {n} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(line[5:]))
        print(results[-1], flush=True)
    one = next(r for r in results if r["n"] == 1)
    lines = ["", "## Many fine-tunes, one base: memory and throughput (model pool, one process each)", "",
             f"- {args.threads} threads; decode: 8 requests x {args.new_tokens} greedy tokens, round-robin over the "
             f"models; the models are the QAT adapter and copies with perturbed B matrices, int4 base with "
             f"int8 activations (acc 4); RSS after loading (the process's own imports included)", "",
             "| models | RSS MB | vs 1 adapter | base sessions | decode tok/s |", "|---|---|---|---|---|"]
    for r in results:
        name = "merged int4 model alone" if r["n"] == 0 else f"{r['n']} adapter(s) over one int4 base"
        lines.append(f"| {name} | {r['rss_mb']:.0f} | {r['rss_mb'] / one['rss_mb']:.2f}x | "
                     f"{r['bases_loaded'] if r['n'] else '-'} | {r['tok_s']:.1f} |")
    out = Path(args.out)
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    data = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    data["pool"] = results
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
