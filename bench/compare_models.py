"""Run the whole pipeline on each bundled model and compare them side by side: per-stage wall
time, train tokens/s, eval perplexity of base vs fine-tuned, ONNX variants accepted.

    python bench/compare_models.py smollm2 gemma3-270m          # runs `tuneops run` for each (minutes)
    python bench/compare_models.py --parse smollm2=run.log:artifacts-copy/   # a finished run's log + artifacts

Each run registers under its own model name (``bench-<source>``): perplexities of models with
different tokenizers are not comparable, so they never compete for one champion. Writes
``bench/results/models-cpu.json`` and ``.md``. Wrap in ``flock`` on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("model", "ingest", "validate", "select", "train", "evaluate", "optimize", "register")
_FINISHED = re.compile(r"(\d\d:\d\d:\d\d)\.\d+ \| INFO\s+\| Task run '(\w+)' - Finished in state (\w+)")
_FLOW = re.compile(r"(\d\d:\d\d:\d\d)\.\d+ \| INFO\s+\| Flow run '[^']+' - Beginning flow run")


def _t(hms: str) -> datetime:
    return datetime.strptime(hms, "%H:%M:%S")


def stage_times(log: str) -> dict[str, float]:
    """Seconds per stage: from the previous task's end (the flow's start for the first) to its end."""
    start = _FLOW.search(log)
    prev = _t(start.group(1)) if start else None
    out: dict[str, float] = {}
    for hms, name, _state in _FINISHED.findall(log):
        now = _t(hms)
        if prev is not None:
            out[name] = (now - prev).total_seconds() % 86400
        prev = now
    return out


def collect(artifacts: Path) -> dict[str, object]:
    def read(stage: str) -> dict:
        p = artifacts / stage / "metrics.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    train, ev, opt = read("train"), read("evaluate"), read("optimize")
    variants = opt.get("variants", {})
    return {
        "train_steps": train.get("steps"), "train_tokens": train.get("tokens"),
        "train_tokens_per_s": train.get("tokens_per_s"), "train_runtime_s": train.get("runtime_s"),
        "total_params": train.get("total_params"),
        "base_perplexity": ev.get("base_perplexity"), "finetuned_perplexity": ev.get("finetuned_perplexity"),
        "perplexity_change_pct": ev.get("perplexity_change_pct"),
        "variants": {n: {"accepted": v.get("accepted"), "perplexity_change_pct": v.get("perplexity_change_pct"),
                         "size_mb": round(v.get("size_bytes", 0) / 2**20, 1)} for n, v in variants.items()},
        "default_variant": opt.get("default_variant"),
    }


def run(source: str) -> dict[str, object]:
    cmd = [sys.executable, "-m", "tuneops.cli", "run", "--set", f"model.source={source}",
           "--set", f"register.model_name=bench-{source}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    (ROOT / "bench" / "results" / f"models-cpu-{source}.log").write_text(log)
    if proc.returncode:
        raise SystemExit(f"{source}: tuneops run failed (rc={proc.returncode}); see the log")
    return {"source": source, "wall_s": round(wall, 1), "stage_s": stage_times(log), **collect(ROOT / "artifacts")}


def markdown(results: list[dict]) -> str:
    names = [r["source"] for r in results]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for s in STAGES:
        lines.append(f"| {s} (s) | " + " | ".join(f"{r['stage_s'].get(s, float('nan')):.0f}" for r in results) + " |")
    rows = [("whole run (s)", lambda r: f"{r.get('wall_s') or sum(r['stage_s'].values()):.0f}"),
            ("parameters", lambda r: f"{(r['total_params'] or 0) / 1e6:.1f}M"),
            ("train tokens/s", lambda r: f"{r['train_tokens_per_s']:.0f}"),
            ("eval perplexity base -> fine-tuned", lambda r: f"{r['base_perplexity']:.2f} -> {r['finetuned_perplexity']:.2f}"),
            ("perplexity change", lambda r: f"{r['perplexity_change_pct']:+.1f}%"),
            ("ONNX variants accepted", lambda r: ", ".join(n for n, v in r["variants"].items() if v["accepted"]) or "none")]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(r) for r in results) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="*", help="model.source values to run")
    ap.add_argument("--parse", action="append", default=[], metavar="SOURCE=LOG:ARTIFACTS",
                    help="read a finished run instead of running it")
    args = ap.parse_args()
    results = []
    for item in args.parse:
        source, rest = item.split("=", 1)
        log, artifacts = rest.split(":", 1)
        results.append({"source": source, "wall_s": None, "stage_s": stage_times(Path(log).read_text()),
                        **collect(Path(artifacts))})
    results += [run(s) for s in args.sources]
    out = ROOT / "bench" / "results"
    (out / "models-cpu.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "models-cpu.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
