"""DPO training throughput, side by side in one run (issue 33): a bare TRL ``DPOTrainer`` script
vs the same training through ``tuneops.training.preference`` (row checks, chat-layer features,
explicit reference, TRL's trainer). Same model, same pairs, same LoRA config, batch and steps.

Each arm runs ``--rounds`` times, alternating, each in a fresh process (so peak RSS is per arm).
tokens/s = real (non-pad) tokens of the chosen + rejected sequences that TRL counts
(``num_tokens``) / wall time of the steps after ``--skip`` warm-up steps; setup_s is everything
before ``trainer.train()`` (loading, checks, tokenization, reference construction). The table
shows medians and the ratio of medians (goal in the issue: >= 0.95x of bare TRL).

Data: pairs built offline from chatterbot-corpus (``tuneops.data.chatterbot.preference_pairs``).

    .venv/bin/python bench/bench_dpo.py                       # tiny random Gemma-3, ~3 min on 2 cores
    .venv/bin/python bench/bench_dpo.py --model smollm2       # SmolLM2-135M-Instruct (GGUF converted once)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STATE = REPO / ".tuneops"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def model_dir(name: str) -> Path:
    """The model folder, built once under .tuneops/bench/dpo (tiny) or the shared cache (smollm2)."""
    from tuneops import env

    paths = env.configure(STATE)
    if name == "smollm2":
        from tuneops.models import _smollm2_folder

        return _smollm2_folder(paths["cache"])
    d = STATE / "bench" / "dpo" / "tiny"
    if not (d / "config.json").is_file():
        from tuneops.config import load_config
        from tuneops.models import _tiny, gemma_tokenizer

        model, _ = _tiny(paths["cache"], load_config(REPO / "params.yaml").model.tiny)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(d)
        gemma_tokenizer(paths["cache"]).save_pretrained(d)
    return d


def rows(n: int) -> list[dict]:
    from tuneops.data.chatterbot import preference_pairs

    return preference_pairs(seed=0)[0][:n]


def arm(which: str, mdir: Path, data: Path, a: argparse.Namespace) -> dict:
    """One measured training run (in this process)."""
    import torch

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    opts = dict(output_dir=str(STATE / "bench" / "dpo" / f"out-{which}"), beta=0.1, max_steps=a.steps,
                per_device_train_batch_size=a.batch, learning_rate=5e-4, report_to="none", use_cpu=True,
                bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=1,
                dataloader_pin_memory=False, disable_tqdm=True, seed=0, max_length=a.max_len)
    marks: dict[int, tuple[float, int]] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = (time.perf_counter(), trainer._total_train_tokens)

    records = [json.loads(x) for x in data.read_text().splitlines()]
    if which == "trl":
        # what a TRL user writes: conversational rows, DPOConfig, a LoRA config, ref_model=None
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer

        ds = Dataset.from_list([{"prompt": r["input"]["messages"], "chosen": r["preferred_output"],
                                 "rejected": r["non_preferred_output"]} for r in records])
        tok = AutoTokenizer.from_pretrained(str(mdir))
        model = AutoModelForCausalLM.from_pretrained(str(mdir), dtype=torch.float32)
        trainer = DPOTrainer(model=model, args=DPOConfig(**opts), train_dataset=ds, processing_class=tok,
                             peft_config=lora, callbacks=[Clock()])
        reference = "TRL default: adapter disabled (= base)"
    else:
        from tuneops.models import load_causal_lm, load_tokenizer
        from tuneops.training import preference as pref

        tok = load_tokenizer(mdir)
        pairs, problems = pref.check(enumerate(records, 1), str(data), tok, a.max_len)
        if problems:
            raise SystemExit(f"{len(problems)} problems, first: {problems[0]}")
        feats = pref.features(pairs, tok, a.max_len)
        models = pref.build_models(lambda: load_causal_lm(mdir), peft_config=lora, reference="start")
        beta, opts = opts.pop("beta"), {k: v for k, v in opts.items() if k != "output_dir"}
        trainer = pref.trainer(models, feats, tok, pref.dpo_config(STATE / "bench" / "dpo" / "out-tuneops",
                                                                   beta=beta, **opts), callbacks=[Clock()])
        reference = models.record["reference_model"]
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t1
    (ts, ks), (te, ke) = marks[a.skip], marks[max(marks)]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"arm": which, "tokens_per_s": (ke - ks) / (te - ts), "tokens": trainer._total_train_tokens,
            "train_s": wall, "setup_s": setup, "first_loss": logs[0]["loss"], "last_loss": logs[-1]["loss"],
            "last_margin": logs[-1]["rewards/margins"], "reference": reference,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of tokens/s")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", type=Path, default=None, help="markdown file to append the table to")
    ap.add_argument("--arm", choices=("trl", "tuneops"), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    mdir = model_dir(a.model)
    if a.arm:
        print("RESULT " + json.dumps(arm(a.arm, mdir, a.data, a)))
        return
    data = STATE / "bench" / "dpo" / "pairs.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(a.pairs)))
    t0 = time.time()
    results: dict[str, list[dict]] = {"trl": [], "tuneops": []}
    base = [sys.executable, __file__, "--model", a.model, "--data", str(data), "--steps", str(a.steps),
            "--skip", str(a.skip), "--batch", str(a.batch), "--max-len", str(a.max_len), "--threads", str(a.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(a.threads), "TRL_EXPERIMENTAL_SILENCE": "1"}
    for r in range(a.rounds):
        for which in (("trl", "tuneops") if r % 2 == 0 else ("tuneops", "trl")):
            p = subprocess.run(base + ["--arm", which], capture_output=True, text=True, env=env)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode or line is None:
                raise SystemExit(f"{which} failed:\n{p.stderr[-4000:]}")
            res = json.loads(line[7:])
            results[which].append(res)
            print(f"round {r + 1} {which}: {res['tokens_per_s']:.1f} tok/s, rss {res['peak_rss_mb']:.0f} MB, "
                  f"setup {res['setup_s']:.1f} s, loss {res['first_loss']:.4f} -> {res['last_loss']:.4f}", flush=True)
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in results.items()}
    rss = {k: statistics.median(x["peak_rss_mb"] for x in v) for k, v in results.items()}
    setup = {k: statistics.median(x["setup_s"] for x in v) for k, v in results.items()}
    ratio = med["tuneops"] / med["trl"]
    cmd = "python bench/bench_dpo.py " + " ".join(sys.argv[1:])
    md = [f"## DPO throughput: {a.model}, LoRA r=8 q/k/v/o, batch {a.batch} pairs, {a.steps} steps "
          f"(first {a.skip} left out), {a.pairs} chatterbot pairs, {a.threads} threads, {a.rounds} rounds, medians",
          "", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, wall {time.time() - t0:.0f} s, "
          f"command: `{cmd}`", "",
          "| arm | tokens/s (median) | all rounds | peak RSS MB (median) | setup s (median) | loss first -> last |",
          "|---|---|---|---|---|---|"]
    names = {"trl": "bare TRL DPOTrainer", "tuneops": "tuneops preference (TRL inside)"}
    for k, v in results.items():
        md.append(f"| {names[k]} | {med[k]:.1f} | {', '.join('%.1f' % x['tokens_per_s'] for x in v)} | "
                  f"{rss[k]:.0f} | {setup[k]:.1f} | {v[0]['first_loss']:.4f} -> {v[0]['last_loss']:.4f} |")
    md += ["", f"- tuneops / bare TRL tokens/s: **{ratio:.3f}x** (goal >= 0.95): {'PASS' if ratio >= 0.95 else 'FAIL'}",
           f"- peak RSS tuneops / bare TRL: {rss['tuneops'] / rss['trl']:.3f}x",
           f"- reference: bare TRL = {results['trl'][0]['reference']}; tuneops = {results['tuneops'][0]['reference']}",
           ""]
    text = "\n".join(md)
    print(text)
    if a.report:
        with a.report.open("a") as f:
            f.write(text + "\n")
    (STATE / "bench" / "dpo" / f"result-{a.model}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
