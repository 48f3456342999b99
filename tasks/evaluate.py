"""Stage `evaluate`: eval loss and perplexity of the base and the fine-tuned model on
the held-out split (assistant tokens only), plus a few greedy generations."""
from __future__ import annotations

from typing import Any

from tuneops import finetuned
from tuneops.chat import prompt_and_reference
from tuneops.config import Config
from tuneops.io import fresh_dir, md5_file, read_jsonl, write_json, write_jsonl
from tuneops.lm import encode, generate, perplexity, torch_forward
from tuneops.models import load_causal_lm, load_tokenizer


def run(cfg: Config) -> dict[str, Any]:
    e = cfg.evaluate
    base_dir, train_dir = cfg.path("base_model_dir"), cfg.path("train_dir")
    out = fresh_dir(cfg.path("evaluate_dir"))
    tokenizer = load_tokenizer(base_dir)
    rows = read_jsonl(cfg.path("clean_eval_data"))[: e.max_samples]
    features = encode(rows, tokenizer, cfg.model.max_seq_len)
    pad = tokenizer.pad_token_id
    prompts = [prompt_and_reference(r["messages"]) for r in rows[: e.generations]]

    scores, replies = {}, {}
    for name, model in (("base", load_causal_lm(base_dir)), ("finetuned", finetuned.load(base_dir, train_dir))):
        model.eval()
        scores[name] = perplexity(torch_forward(model), features, e.batch_size, pad)
        replies[name] = [generate(model, tokenizer, msgs, e.max_new_tokens) for msgs, _ in prompts]
        del model

    base, ft = scores["base"], scores["finetuned"]
    metrics = {
        "samples": len(features), "tokens": ft["tokens"], "eval_data_md5": md5_file(cfg.path("clean_eval_data")),
        "base_loss": base["loss"], "base_perplexity": base["perplexity"],
        "finetuned_loss": ft["loss"], "finetuned_perplexity": ft["perplexity"],
        "perplexity_change_pct": 100.0 * (ft["perplexity"] / base["perplexity"] - 1.0),
    }
    write_json(out / "metrics.json", metrics)
    write_jsonl(out / "generations.jsonl", (
        {"prompt": msgs, "reference": ref, "base": replies["base"][i], "finetuned": replies["finetuned"][i]}
        for i, (msgs, ref) in enumerate(prompts)))
    return {"evaluate_dir": str(out), **metrics}
