"""Decode speed of `tuneops serve` with and without a ``json_schema`` response format (issue 32: goal
>= 0.8x), end to end over HTTP, and what the grammar cache saves on the time to first token.

    python bench/bench_structured_serve.py MODEL_FOLDER [--rounds 5] [--max-tokens 64] [--out bench/results/structured-serve-cpu]

MODEL_FOLDER: what `tuneops serve` takes (an exported folder with model.onnx + tokenizer). The server
runs in a subprocess (`python -m tuneops serve`, ``serve.max_concurrent=1``); the requests are sent one
at a time, streamed, greedy, every variant interleaved per prompt and round so that load drifts hit
all of them alike:

* **no schema**: the prompt alone;
* **json_schema (cached)**: ``response_format`` with the prompt's schema, the same schema every round
  (compiled once, then served from the grammar cache: ``serve.grammar_cache``);
* **json_schema (new)**: the same schema made distinct per request (a different ``description``, which
  changes the cache key and nothing the decoder allows): a compile in every request;
* **tools (none)**: ``tools`` with the prompt's schema as a function's parameters, ``tool_choice`` ``none``:
  the same (longer) prompt, the tools declared in it, decoded without a grammar: the baseline of
* **tools (required)**: the same with ``tool_choice`` ``required`` (the tool-call grammar: the format's
  markers around the call JSON), cached.

Per request: TTFT (first streamed chunk with content or a tool call), decode tok/s = (completion tokens
- 1) / (time of the last chunk - time of the first), from the usage the stream reports. Tool calls are
streamed only once complete (the text is held back until it parses), so for **tools** the decode time is
the request's time less the same request's with ``max_tokens=1`` (its prefill and first token). Reported:
medians per variant, the ratio to no schema, the machine (CPU, cores, load average before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_serve import wait_up  # noqa: E402
from tuneops.io import free_port  # noqa: E402

PROMPTS = [
    ("Describe a person called Ada who is 36 and lives in London, as JSON.",
     {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                       "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                       "city": {"type": "string", "maxLength": 20}},
      "required": ["name", "age", "city"], "additionalProperties": False}),
    ("What is the weather like in Paris today? Answer in JSON.",
     {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                       "unit": {"enum": ["celsius", "fahrenheit"]},
                                       "temperature": {"type": "number"}, "sunny": {"type": "boolean"}},
      "required": ["city", "unit", "temperature", "sunny"], "additionalProperties": False}),
    ("List three fruits with their colours, in JSON.",
     {"type": "object", "properties": {"fruits": {"type": "array", "maxItems": 3, "items": {
         "type": "object", "properties": {"name": {"type": "string", "maxLength": 15},
                                          "colour": {"type": "string", "maxLength": 10}},
         "required": ["name", "colour"], "additionalProperties": False}}},
      "required": ["fruits"], "additionalProperties": False}),
    ("Book a flight from Paris to Tokyo for two people. Give the booking as JSON.",
     {"type": "object", "properties": {"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                       "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                       "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                                       "notes": {"type": "string", "maxLength": 60}},
      "required": ["origin", "destination", "passengers", "notes"], "additionalProperties": False}),
]
VARIANTS = ("no schema", "json_schema (cached)", "json_schema (new)", "tools (none)", "tools (required)")


def body(model: str, variant: str, k: int, prompt: str, schema: dict, max_tokens: int, nonce: int) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
         "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if variant.startswith("json_schema"):
        s = dict(schema, description=f"request {nonce}") if variant.endswith("(new)") else schema
        b["response_format"] = {"type": "json_schema", "json_schema": {"name": f"answer{k}", "schema": s,
                                                                       "strict": True}}
    elif variant.startswith("tools"):
        b["tools"] = [{"type": "function", "function": {"name": f"answer{k}", "parameters": schema}}]
        b["tool_choice"] = "required" if variant.endswith("(required)") else "none"
    return b


def one(client: httpx.Client, base: str, payload: dict) -> dict:
    t0 = time.perf_counter()
    first = last = None
    tokens, text, finish = 0, "", None
    with client.stream("POST", f"{base}/v1/chat/completions", json=payload) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                d = c["delta"]
                if d.get("content") or d.get("tool_calls"):
                    first = first if first is not None else now
                    last = now
                    text += d.get("content") or "".join(t["function"].get("arguments") or ""
                                                        for t in d.get("tool_calls") or [])
                finish = c.get("finish_reason") or finish
    total = time.perf_counter() - t0
    ttft = (first if first is not None else t0 + total) - t0
    span = (last - first) if first is not None and last is not None else 0.0
    return {"ttft_s": ttft, "total_s": total, "tokens": tokens, "finish": finish, "text": text,
            "tok_s": (tokens - 1) / span if tokens > 1 and span > 0 else float("nan")}


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "structured-serve-cpu"))
    args = ap.parse_args()

    import jsonschema

    port, base = free_port(), None
    log = Path(args.out + ".log")
    sets = [x for o in ["serve.max_concurrent=1", *args.overrides] for x in ("--set", o)]
    load_before = os.getloadavg()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneops", "--params", args.params, *sets, "serve", args.model,
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    rows: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(f"{base}/health", proc, 600, log)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        nonce = 0
        with httpx.Client(timeout=600) as client:
            for k, (prompt, schema) in enumerate(PROMPTS):          # warm-up: the model, llguidance's tokenizer
                for v in VARIANTS:
                    nonce += 1
                    one(client, base, body(model, v, k, prompt, schema, 8, nonce))
            for rnd in range(args.rounds):
                for k, (prompt, schema) in enumerate(PROMPTS):
                    order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[:rnd % len(VARIANTS)]
                    for v in order:
                        nonce += 1
                        payload = body(model, v, k, prompt, schema, args.max_tokens, nonce)
                        r = one(client, base, payload)
                        r["prompt"] = k
                        if v == "tools (required)" and r["tokens"] > 1:
                            # the calls stream only once complete: decode time = this request's time less the
                            # same request's with max_tokens=1 (its prefill and first token)
                            r["prefill_s"] = one(client, base, {**payload, "max_tokens": 1})["total_s"]
                            span = r["total_s"] - r["prefill_s"]
                            r["tok_s"] = (r["tokens"] - 1) / span if span > 0 else float("nan")
                        if v.startswith("json_schema") and r["finish"] == "stop":
                            jsonschema.validate(json.loads(r["text"]), schema)
                            r["valid"] = True
                        rows[v].append(r)
                print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                    f"{v} {statistics.median(x['tokens'] / x['total_s'] for x in rows[v]):.1f} tok/s end to end"
                    for v in VARIANTS), flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    load_after = os.getloadavg()
    base_rate = statistics.median(r["tok_s"] for r in rows["no schema"])
    base_ttft = statistics.median(r["ttft_s"] for r in rows["no schema"])
    base_e2e = statistics.median(r["tokens"] / r["total_s"] for r in rows["no schema"])
    lines = ["| decoding | requests | decode tok/s median | x no schema | end-to-end tok/s median "
             "(tokens / request time) | x no schema | TTFT median (ms) | TTFT - no schema (ms) "
             "| completion tokens median | stopped on EOS | schema-valid of stopped |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = {}
    for v, rs in rows.items():
        rates = [r["tok_s"] for r in rs if r["tok_s"] == r["tok_s"]]
        rate = statistics.median(rates) if rates else float("nan")
        e2e = statistics.median(r["tokens"] / r["total_s"] for r in rs)
        ttft = statistics.median(r["ttft_s"] for r in rs)
        stops = [r for r in rs if r["finish"] in ("stop", "tool_calls")]
        valid = sum(bool(r.get("valid")) for r in stops) if v.startswith("json_schema") else None
        summary[v] = {"tok_s": rate, "ratio": rate / base_rate, "e2e_tok_s": e2e, "e2e_ratio": e2e / base_e2e,
                      "ttft_ms": ttft * 1e3, "requests": len(rs)}
        streamed = f"{rate:.1f} | {rate / base_rate:.2f}" if rates else "- | -"
        lines.append(f"| {v} | {len(rs)} | {streamed} | {e2e:.1f} | {e2e / base_e2e:.2f} | {ttft * 1e3:.0f} | "
                     f"{(ttft - base_ttft) * 1e3:+.0f} | {statistics.median(r['tokens'] for r in rs):.0f} | "
                     f"{len(stops)}/{len(rs)} | {'-' if valid is None else f'{valid}/{len(stops)}'} |")
    meta = {"model": args.model, "rounds": args.rounds, "prompts": len(PROMPTS), "max_tokens": args.max_tokens,
            **machine(), "load_before": load_before, "load_after": load_after}
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                    "rows": {v: [{k: x for k, x in r.items() if k != "text"}
                                                                 for r in rs] for v, rs in rows.items()}}, indent=1))
    table = "\n".join(lines)
    print(f"\n{meta}\n\n{table}")


if __name__ == "__main__":
    main()
