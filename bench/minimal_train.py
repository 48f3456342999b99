"""The baseline for bench/bench_train.py: a hand-written minimal peft + Trainer LoRA script, the
way a user would write it without tuneops. Same model, same tokenized data, same batch layout
and optimizer settings; prints one JSON line with tokens/s over ``trainer.train()``.

    python bench/minimal_train.py --model models/base --data artifacts/data/train.jsonl \
        --micro 4 --accum 2 --steps 6 --seq 256
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--micro", type=int, required=True)
    p.add_argument("--accum", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--out", default=".tuneops/bench/minimal-out")
    a = p.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from tuneops.inference.chat import Collator, tokenize   # the same tokenization + padding collator

    torch.manual_seed(42)
    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [json.loads(line) for line in open(a.data)]
    feats = [tokenize(r["messages"], tok, a.seq) for r in rows]
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    collate = Collator(tok.pad_token_id)
    tokens = [0]

    def counting(batch):
        out = collate(batch)
        tokens[0] += int(out["attention_mask"].sum())
        return out

    args = TrainingArguments(output_dir=a.out,
                             max_steps=a.steps, learning_rate=a.lr, warmup_steps=1, lr_scheduler_type="cosine",
                             per_device_train_batch_size=a.micro, gradient_accumulation_steps=a.accum,
                             logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=42,
                             data_seed=42, dataloader_pin_memory=False, remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=counting)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    print(json.dumps({"tokens": tokens[0], "runtime_s": wall, "tokens_per_s": tokens[0] / wall}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
