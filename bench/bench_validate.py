"""Benchmark: the data gate on 100k chat records (target: <= 15 s on the 2-core machine).

Records are synthetic but realistic and deterministic: record i joins the first exchange
of bundled chatterbot conversation ``i % n`` with that of ``i // n``, a third of them with
a system prompt: every record is distinct. The timed part is what the validate stage runs
on one split: read + record checks + token lengths with the model's tokenizer + near-
duplicate keys + the Great Expectations suite. Imports and tokenizer loading are done
once before timing (reported separately).

    python bench/bench_validate.py [--records 100000] [--runs 3] [--params params.yaml]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEM = ("You are a helpful assistant.", "Answer briefly.", "You are a friendly chatbot.")


def make_records(n: int, language: str = "english") -> list[dict]:
    from tuneops.data import chatterbot

    convs, _ = chatterbot.clean(chatterbot.conversations(language), 800)
    first = [c["messages"][:2] for c in convs]
    k = len(first)
    out = []
    for i in range(n):
        msgs = first[i % k] + first[(i // k) % k]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": SYSTEM[(i // 3) % len(SYSTEM)]}] + msgs
        out.append({"messages": msgs, "id": i})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--target-s", type=float, default=15.0)
    args = ap.parse_args()

    from tuneops.config import load_config
    from tuneops.env import configure

    cfg = load_config(args.params)
    configure(cfg.state_dir)
    out_dir = cfg.state_dir / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"chat-{args.records}.jsonl"
    t0 = time.perf_counter()
    with path.open("w", encoding="utf-8") as f:
        for r in make_records(args.records):
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    gen_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    import great_expectations  # noqa: F401

    from tuneops.data.cli import resolve_tokenizer
    from tuneops.data.gate import Settings, validate_dataset

    tokenizer = resolve_tokenizer(cfg)
    setup_s = time.perf_counter() - t0
    settings = Settings.from_config(cfg, fmt="chat")

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    times, cpus, result = [], [], None
    load = os.getloadavg()[0]
    for _ in range(args.runs):
        t0, c0 = time.perf_counter(), cpu()
        result = validate_dataset({"train": path}, tokenizer, settings)
        times.append(time.perf_counter() - t0)
        cpus.append(cpu() - c0)
    med = statistics.median(times)
    counts = result.counts()["train"]
    print(f"file: {path} ({path.stat().st_size / 2**20:.1f} MiB, {args.records} records; generated in {gen_s:.1f}s)")
    print(f"setup (imports + tokenizer load, once): {setup_s:.1f}s")
    print(f"runs (wall): {', '.join(f'{t:.2f}s' for t in times)}; process CPU (all threads): "
          f"{', '.join(f'{c:.2f}s' for c in cpus)}; {os.cpu_count()} cores, load average before: {load:.2f}")
    print(f"median: {med:.2f}s = {args.records / med:,.0f} records/s; "
          f"accepted {counts['accepted']}, rejected {counts['rejected']} {counts['rejected_by_rule']}, "
          f"{result.splits['train'].tokens:,} tokens")
    ok = med <= args.target_s
    print(f"target <= {args.target_s:.0f}s for {args.records} records: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
