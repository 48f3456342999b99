"""Training throughput on a lent GPU (issue 5): LoRA, QLoRA, DoRA and full fine-tuning under
DeepSpeed ZeRO-2 on a ~1B Gemma 3 shape with random weights (nothing downloaded), through the
same method strategies (tuneops/training/methods.py) and DeepSpeed config generator
(tuneops/training/loop.py) as the train stage. Reports tokens/s, MFU with LoRA-aware FLOPs and
peak memory (torch.cuda.max_memory_allocated).

    bench/gpu_train.sh                     # on the device machine (writes $OUT/gpu-train.md)
    python bench/gpu_train.py --device cpu --config bench/configs/tiny-gemma3.json --steps 3   # smoke

FLOPs per trained token (dense matmuls, N = parameters in matmuls incl. the tied lm_head):
full = 6N (forward 2N, backward 4N: input and weight gradients); LoRA/DoRA/QLoRA = 4N (the frozen
weights need input gradients only) + 6 x adapter params; attention scores add 12 x L x s x d_attn
(forward 4 L s d, backward twice that, also with frozen weights). MFU = achieved / peak dense bf16
(H100/H200 SXM: 989 TFLOP/s; override with --peak-tflops).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASES = [("lora", 0), ("qlora", 0), ("dora", 0), ("full", 2)]


def flops_per_token(cfg: dict, method: str, adapter_params: int, seq: int) -> float:
    h, L, inter = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"]
    heads, kv, hd, vocab = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"]
    per_layer = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter     # q,o + k,v + gate,up,down
    n = L * per_layer + vocab * h                                        # + lm_head
    attn = 12 * L * seq * heads * hd
    dense = 6 * n if method == "full" else 4 * n + 6 * adapter_params
    return dense + attn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=REPO / "bench" / "configs" / "gemma3-1b.json")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", REPO / "bench" / "results")))
    a = ap.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tuneops.training import methods

    gpu = a.device == "cuda"
    if gpu and not torch.cuda.is_available():
        sys.exit("gpu_train.py: no CUDA device")
    raw = {k: v for k, v in json.loads(a.config.read_text()).items() if not k.startswith("_")}
    work = Path(tempfile.mkdtemp(prefix="tuneops-gpu-train-", dir=os.environ.get("TMPDIR")))
    base = work / "base"
    cfg = AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items() if k != "architectures"})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if gpu else torch.float32).save_pretrained(base)
    g = torch.Generator().manual_seed(1)
    n_rows = a.micro * (a.steps + 1)
    feats = [{"input_ids": (ids := torch.randint(3, cfg.vocab_size, (a.seq,), generator=g).tolist()),
              "labels": ids, "attention_mask": [1] * a.seq} for _ in range(n_rows)]

    def collate(batch):
        return {k: torch.tensor([f[k] for f in batch]) for k in ("input_ids", "labels", "attention_mask")}

    rows = []
    for method, zero in CASES:
        name = f"{method}" + (f" ZeRO-{zero}" if zero else "")
        if a.only and not any(s in name for s in a.only):
            continue
        need = (["bitsandbytes"] if method == "qlora" else []) + (["deepspeed"] if zero else [])
        missing = [n for n in need if importlib.util.find_spec(n) is None]
        if missing:
            rows.append({"case": name, "skipped": f"{', '.join(missing)} not installed"})
            continue
        plan = {"method": method, "precision": ("nf4+" if method == "qlora" else "") + ("bf16" if gpu else "fp32"),
                "gradient_checkpointing": False, "task_head": "causal_lm", "zero_stage": zero,
                "offload": {"optimizer": False, "params": False}, "micro_batch_size": a.micro, "grad_accum": 1,
                "world_size": 1,
                "peft": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                   "gate_proj", "up_proj", "down_proj"]}}
        ds = None
        if zero:
            from tuneops.training.loop import ds_config

            ds = ds_config(plan, max_grad_norm=1.0)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29533")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        args = TrainingArguments(output_dir=str(work / "out"), max_steps=a.steps, learning_rate=1e-4,
                                 per_device_train_batch_size=a.micro, logging_steps=1, save_strategy="no",
                                 report_to="none", use_cpu=not gpu, bf16=gpu, dataloader_pin_memory=gpu,
                                 remove_unused_columns=False, disable_tqdm=True, deepspeed=ds)
        model = methods.build(base, plan)
        adapter = sum(p.numel() for p in model.parameters() if p.requires_grad) if method != "full" else 0
        times: list[float] = []

        class Timer(TrainerCallback):
            def on_step_begin(self, *_a, **_k):
                if gpu:
                    torch.cuda.synchronize()
                self.t = time.perf_counter()

            def on_step_end(self, *_a, **_k):
                if gpu:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - self.t)

        trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=collate, callbacks=[Timer()])
        out = trainer.train()
        step = statistics.median(times[a.warmup:] or times)
        tps = a.micro * a.seq / step
        fpt = flops_per_token(cfg.to_dict(), method, adapter, a.seq)
        rows.append({"case": name, "tokens_per_s": tps, "step_s": step,
                     "mfu": tps * fpt / (a.peak_tflops * 1e12),
                     "peak_gib": (torch.cuda.max_memory_allocated() / 2**30) if gpu else None,
                     "loss": out.training_loss, "trainable": adapter or sum(p.numel() for p in model.parameters())})
        del trainer, model
    dev = torch.cuda.get_device_name(0) if gpu else "cpu"
    lines = [f"# Training throughput on {dev} ({a.config.name}, random weights, micro {a.micro} x seq {a.seq}, "
             f"{a.steps} steps, median step after {a.warmup})", "",
             "| case | tokens/s | step s | MFU | peak GiB | trainable | loss |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['case']} | skipped: {r['skipped']} | | | | | |")
        else:
            peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
            lines.append(f"| {r['case']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | {100 * r['mfu']:.1f}% | "
                         f"{peak} | {r['trainable']:,} | {r['loss']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"gpu-train{'' if gpu else '-cpu-smoke'}.md").write_text(text)
    (a.out / f"gpu-train{'' if gpu else '-cpu-smoke'}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
