"""Load benchmark of `tuneops serve` (and, for comparison, `mlflow models serve`).

    python bench/bench_serve.py [MODEL] [--mlflow-model models:/NAME@champion]
        [--concurrency 1 4 16] [--requests 32] [--max-tokens 32] [--out bench/results/serve-cpu]

MODEL: what `tuneops serve` takes (default: models:/<register.model_name>@champion). For each
concurrency level, a bounded number of requests (``--requests``, same prompts, greedy, ``max_tokens``
fixed) is sent by that many concurrent clients; reported: requests/s, output tokens/s, p50 / p95
time to first token (streamed: the first content chunk) and total latency. ``mlflow models serve``
(``--env-manager local``) of the registered pyfunc gets the same load on ``/invocations``; it does
not stream, so its TTFT is its total latency, and its output tokens are counted with the model's
tokenizer. Results: a Markdown table and JSON next to each other (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tuneops.io import free_port  # noqa: E402

PROMPTS = ["Hello! How are you today?", "What is your favourite book?", "Tell me something about the sea.",
           "Do you like music?", "What did you do yesterday?", "Can you recommend a film?",
           "What is the weather like?", "Who are you?"]


def wait_up(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not up after {timeout:.0f} s: {log.read_text()[-3000:]}")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def run_load(one, concurrency: int, requests: int) -> dict:
    """``one(i) -> (ttft_s, total_s, output_tokens)``, ``requests`` of them, ``concurrency`` at a time."""
    one(0)                                                          # warm-up (not counted)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ttft, total, tokens = [r[0] for r in rows], [r[1] for r in rows], sum(r[2] for r in rows)
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
            "output_tokens_per_s": tokens / wall, "output_tokens": tokens,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "latency_p50_s": pct(total, 0.5), "latency_p95_s": pct(total, 0.95)}


def tuneops_client(base: str, model: str, max_tokens: int):
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

    def one(i: int) -> tuple[float, float, int]:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        ttft, tokens = None, 0
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        total = time.perf_counter() - t0
        return (ttft if ttft is not None else total), total, tokens
    return one


def mlflow_client(base: str, tokenizer, max_tokens: int):
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

    def one(i: int) -> tuple[float, float, int]:
        body = {"dataframe_records": [{"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}],
                "params": {"max_tokens": max_tokens}}
        t0 = time.perf_counter()
        r = client.post(f"{base}/invocations", json=body)
        r.raise_for_status()
        total = time.perf_counter() - t0
        reply = r.json()["predictions"][0]
        return total, total, len(tokenizer(reply, add_special_tokens=False)["input_ids"])
    return one


def table(rows: list[dict]) -> str:
    head = ("| server | concurrency | requests | req/s | output tok/s | TTFT p50 (s) | TTFT p95 (s) "
            "| latency p50 (s) | latency p95 (s) |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
        f"{r['output_tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} | "
        f"{r['latency_p50_s']:.3f} | {r['latency_p95_s']:.3f} |\n" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--mlflow-model", default=None, help="also load `mlflow models serve -m THIS` the same way")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override for the server")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu"))
    args = ap.parse_args()

    from tuneops.registry import tracking
    from tuneops.config import load_config

    cfg = load_config(args.params, args.overrides)
    model = args.model or f"models:/{cfg.register.model_name}@champion"
    logs = Path(cfg.state_dir) / "bench-serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    port = free_port()
    log = logs / "serve-tuneops.log"
    sets = [x for o in [*args.overrides, f"serve.max_queue={max(args.concurrency) * 2}"] for x in ("--set", o)]
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneops", "--params", args.params, *sets, "serve", model,
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_up(f"http://127.0.0.1:{port}/health", proc, 600, log)
        model_id = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"]
        for c in args.concurrency:
            r = run_load(tuneops_client(f"http://127.0.0.1:{port}", model_id, args.max_tokens), c, args.requests)
            rows.append({"server": "tuneops serve", **r})
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    if args.mlflow_model:
        from tuneops.inference.resolve import resolve

        files = resolve(args.mlflow_model, tracking.tracking_uri(cfg))
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(files.tokenizer_dir))
        port = free_port()
        log = logs / "serve-mlflow.log"
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg)}
        with log.open("w") as out:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                                     args.mlflow_model, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_up(f"http://127.0.0.1:{port}/ping", proc, 600, log)
            for c in args.concurrency:
                r = run_load(mlflow_client(f"http://127.0.0.1:{port}", tok, args.max_tokens), c, args.requests)
                rows.append({"server": "mlflow models serve", **r})
                print(table(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    meta = {"model": model, "mlflow_model": args.mlflow_model, "max_tokens": args.max_tokens,
            "requests_per_level": args.requests, "cpus": os.cpu_count(),
            "serve": {"max_concurrent": cfg.serve.max_concurrent, "threads": cfg.serve.threads}}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = (f"# `tuneops serve` load benchmark\n\nmodel `{model}`; {args.requests} requests per level, greedy, "
          f"max_tokens {args.max_tokens}, {os.cpu_count()} CPUs; mlflow: `{args.mlflow_model}` "
          f"(no streaming: TTFT = latency)\n\n" + table(rows))
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
