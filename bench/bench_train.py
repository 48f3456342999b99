"""Training throughput, measured side by side in one run (issue 5):

1. tuneops' train stage vs a hand-written minimal peft + Trainer script (bench/minimal_train.py):
   same model, same validated data, same LoRA config, micro-batch and accumulation; goal: ratio
   of tokens/s >= 0.95.
2. Packing vs padding in tuneops' train stage on the bundled chat data: goal >= 1.5x tokens/s.

Each configuration runs ``--rounds`` times, alternating, in fresh processes; tokens/s = real
(non-pad) tokens / wall time of ``trainer.train()``; the table shows medians and the ratios of
medians. Uses a project folder under .tuneops/bench/train (the pipeline's model, ingest and
validate stages run there first, or reuse ``--project``).

    .venv/bin/python bench/bench_train.py                 # Gemma 3 270M, ~25 min on 2 cores
    .venv/bin/python bench/bench_train.py --quick         # tiny model, ~3 min
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sh(argv: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}\n{p.stderr[-4000:]}")
    return p.stdout


def make_project(root: Path, quick: bool, steps: int) -> Path:
    import yaml

    from tuneops.config import apply_overrides

    root.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    sets = [f"train.max_steps={steps}", "train.save_steps=0", "train.logging_steps=1",
            "select.method=lora", "register.model_name=bench-train"]
    if quick:
        sets += ["model.source=tiny", "ingest.max_conversations=200", "validate.min_rows=5"]
    raw = apply_overrides(raw, sets)
    raw["paths"]["state_dir"] = str(REPO / ".tuneops")        # shared caches, MLflow db
    if not quick and (REPO / "models" / "base" / "config.json").is_file():
        raw["paths"]["base_model_dir"] = str(REPO / "models" / "base")   # reuse the pipeline's model
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    py = [sys.executable, "-m", "tuneops"]
    for stage in ("model", "ingest", "validate", "select"):
        if stage == "model" and "base_model_dir" in raw["paths"] and Path(raw["paths"]["base_model_dir"]).is_absolute():
            continue
        sh(py + [stage], root)
    return root


def tuneops_run(root: Path, packing: bool) -> dict:
    sh([sys.executable, "-m", "tuneops", "train", "--set", f"train.packing={str(packing).lower()}"], root)
    return json.loads((root / "artifacts" / "train" / "metrics.json").read_text())


def minimal_run(root: Path, plan: dict, steps: int, model_dir: Path, seq: int) -> dict:
    out = sh([sys.executable, str(REPO / "bench" / "minimal_train.py"), "--model", str(model_dir),
              "--data", str(root / "artifacts" / "data" / "train.jsonl"), "--micro", str(plan["micro_batch_size"]),
              "--accum", str(plan["grad_accum"]), "--steps", str(steps), "--seq", str(seq),
              "--out", str(root / "minimal-out")], root)
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model (CI-sized), not the bundled Gemma 270M")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 6, quick 10)")
    ap.add_argument("--project", type=Path, default=None)
    ap.add_argument("--report", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--no-packing", action="store_true", help="only the engine comparison (minimal vs tuneops)")
    a = ap.parse_args()
    steps = a.steps or (10 if a.quick else 6)
    root = make_project(a.project or REPO / ".tuneops" / "bench" / ("train-quick" if a.quick else "train"), a.quick, steps)
    from tuneops.config import load_config

    cfg = load_config(root / "params.yaml")
    plan = json.loads(cfg.path("plan").read_text())
    seq = cfg.model.max_seq_len
    runs: dict[str, list[float]] = {"minimal peft + Trainer": [], "tuneops (padding)": [], "tuneops (packing)": []}
    t0 = time.time()
    for r in range(a.rounds):
        runs["minimal peft + Trainer"].append(minimal_run(root, plan, steps, cfg.path("base_model_dir"), seq)["tokens_per_s"])
        runs["tuneops (padding)"].append(tuneops_run(root, False)["tokens_per_s"])
        if not a.no_packing:
            runs["tuneops (packing)"].append(tuneops_run(root, True)["tokens_per_s"])
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items() if v), flush=True)
    runs = {k: v for k, v in runs.items() if v}
    med = {k: statistics.median(v) for k, v in runs.items()}
    engine = med["tuneops (padding)"] / med["minimal peft + Trainer"]
    packing = med["tuneops (packing)"] / med["tuneops (padding)"] if "tuneops (packing)" in med else None
    model = "tiny random Gemma-3" if a.quick else "Gemma 3 270M"
    lines = [
        f"# Training throughput ({model}, LoRA r=8 q/k/v/o, micro {plan['micro_batch_size']} x accum "
        f"{plan['grad_accum']}, seq <= {seq}, {steps} steps, {a.rounds} rounds, medians)",
        "", f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}, wall {time.time() - t0:.0f} s, "
        f"command: `python bench/bench_train.py {' '.join(sys.argv[1:])}`", "",
        "| run | tokens/s (median) | all rounds |", "|---|---|---|",
        *[f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} |" for k, v in runs.items()], "",
        f"- tuneops / minimal script: **{engine:.3f}x** (goal >= 0.95): {'PASS' if engine >= 0.95 else 'FAIL'}",
    ]
    if packing is not None:
        lines.append(f"- packing / padding: **{packing:.2f}x** (goal >= 1.5): {'PASS' if packing >= 1.5 else 'FAIL'}")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.report:
        a.report.parent.mkdir(parents=True, exist_ok=True)
        a.report.write_text(text)
    return 0 if engine >= 0.95 and (packing is None or packing >= 1.5) else 1


if __name__ == "__main__":
    sys.exit(main())
