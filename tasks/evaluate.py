"""Stage `evaluate`: eval loss and perplexity of the base and the fine-tuned model on
the held-out split (assistant tokens only), plus a few greedy generations, and the graders of
``evaluate.graders`` (OpenAI grader JSON, ``tuneops.inference.graders``) over the split's graded turns
for both models (``graded.jsonl``); ``evaluate.primary_grader`` makes one the primary metric.

Classification / NER heads: accuracy and macro-F1, or word accuracy and entity-level span F1,
of the base model with a fresh (untrained, fixed-seed) head vs the fine-tuned one, and a few
predictions. ``metrics.json`` names the ``primary_metric`` and its direction (``lower`` for
perplexity, ``higher`` for accuracy / entity F1): what register's champion gate compares."""
from __future__ import annotations

from typing import Any

from tuneops import log
from tuneops.config import Config
from tuneops.errors import TuneopsError
from tuneops.inference import finetuned, graders
from tuneops.inference.chat import prompt_and_reference, record_tools
from tuneops.inference.scoring import encode, torch_perplexity
from tuneops.io import fresh_dir, md5_file, read_jsonl, write_json, write_jsonl
from tuneops.models import load_causal_lm, load_tokenizer


def run_head(cfg: Config, info: dict[str, Any], out: Any) -> dict[str, Any]:
    import torch

    from tuneops.training import heads

    e, plan = cfg.evaluate, finetuned.head_plan(info)
    base_dir, train_dir = cfg.path("base_model_dir"), cfg.path("train_dir")
    tokenizer = load_tokenizer(base_dir)
    rows = read_jsonl(cfg.path("clean_eval_data"))[: e.max_samples]
    features = heads.encode(rows, tokenizer, cfg.model.max_seq_len, plan)
    scores, preds = {}, {}
    for name in ("base", "finetuned"):
        torch.manual_seed(0)          # the base's untrained head: the same initialisation every run
        model = finetuned.load_base(base_dir, info) if name == "base" else finetuned.load(base_dir, train_dir)
        scores[name], preds[name] = heads.score(model, features, plan, e.batch_size, tokenizer.pad_token_id)
        del model
    head = heads.of(plan)
    metric, direction = head.primary_metric, head.direction
    metrics = {
        "task_head": plan["task_head"], "samples": len(features), "labels": plan["labels"],
        "eval_data_md5": md5_file(cfg.path("clean_eval_data")),
        "primary_metric": metric, "primary_direction": direction,
        **{f"base_{k}": v for k, v in scores["base"].items()},
        **{f"finetuned_{k}": v for k, v in scores["finetuned"].items()},
        f"{metric}_change": scores["finetuned"][metric] - scores["base"][metric],
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "comparison.json", comparison(metric, scores["base"][metric], scores["finetuned"][metric]))
    write_jsonl(out / "predictions.jsonl", (
        {"record": rows[i]["record"], "base": preds["base"][i], "finetuned": preds["finetuned"][i]}
        for i in range(min(len(rows), max(e.generations, 8)))))
    return {"evaluate_dir": str(out), **metrics}


def run_pairs(cfg: Config, info: dict[str, Any], out: Any) -> dict[str, Any]:
    """A pair objective (train.objective dpo, ...): on the held-out pairs, for the base and the
    fine-tuned model, preference accuracy (share with a positive implicit reward margin against the
    run's reference), mean margin, log-prob accuracy and the chosen replies' perplexity
    (tuneops/training/preference.py pair_scores); register logs them to the training run in MLflow."""
    from tuneops.training import objectives, preference  # noqa: F811

    e, obj = cfg.evaluate, objectives.get(info["objective"])
    base_dir, train_dir = cfg.path("base_model_dir"), cfg.path("train_dir")
    tokenizer = load_tokenizer(base_dir)
    feats = preference.pair_features(cfg.path("clean_eval_data"), tokenizer, cfg.model.max_seq_len)[: e.max_samples]
    beta, pad = float(info.get("beta", 0.1)), tokenizer.pad_token_id
    ref_adapter = train_dir / "adapter" / "ref"       # started from an SFT adapter: TRL's frozen copy of it
    use_start = ref_adapter.is_dir() and (info.get("reference") or {}).get("reference") != "base"
    base = load_causal_lm(base_dir)
    if use_start:
        from peft import PeftModel

        ref = PeftModel.from_pretrained(base, str(ref_adapter)).merge_and_unload()
        reference = dict(zip(("chosen", "rejected"), (preference.side_logps(ref, feats, s, e.batch_size, pad)[0]
                                                      for s in ("chosen", "rejected"))))
        del ref
        base = load_causal_lm(base_dir)
    else:
        reference = None      # the base is the reference: its own margins are 0
    scores, per = {}, {}
    scores["base"], per["base"] = preference.pair_scores(base, reference, feats, beta, e.batch_size, pad)
    reference = reference or {"chosen": per["base"]["chosen"], "rejected": per["base"]["rejected"]}
    del base
    model = finetuned.load(base_dir, train_dir)
    scores["finetuned"], per["finetuned"] = preference.pair_scores(model, reference, feats, beta, e.batch_size, pad)
    del model
    metric = obj.primary_metric
    metrics = {
        "objective": obj.name, "beta": beta, "samples": len(feats),
        "reference": "the start (SFT) adapter" if use_start else "the base model",
        "eval_data_md5": md5_file(cfg.path("clean_eval_data")),
        **{f"base_{k}": v for k, v in scores["base"].items()},
        **{f"finetuned_{k}": v for k, v in scores["finetuned"].items()},
        # perplexity of the chosen replies: what register's language-model tags and metrics read
        "base_loss": scores["base"]["chosen_loss"], "base_perplexity": scores["base"]["chosen_perplexity"],
        "finetuned_loss": scores["finetuned"]["chosen_loss"],
        "finetuned_perplexity": scores["finetuned"]["chosen_perplexity"],
        "primary_metric": metric, "primary_direction": obj.direction,
        f"{metric}_change": scores["finetuned"][metric] - scores["base"][metric],
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "comparison.json", comparison(metric, scores["base"][metric], scores["finetuned"][metric]))
    write_jsonl(out / "pairs.jsonl", ({"pair": i, **{f"{m}_{k}": per[m][k][i] for m in per for k in per[m]}}
                                      for i in range(len(feats))))
    return {"evaluate_dir": str(out), **metrics}


def comparison(metric: str, base: float, finetuned: float) -> list[dict[str, Any]]:
    """``comparison.json``: base vs fine-tuned on the primary metric (the plot dvc.yaml declares)."""
    return [{"model": "base", "metric": metric, "value": base},
            {"model": "fine-tuned", "metric": metric, "value": finetuned}]


def grade(e: Any, model: Any, tokenizer: Any, graded: list[dict[str, Any]]) -> tuple[dict[str, Any], list] | None:
    """``evaluate.graders`` over the graded turns, with ``model``'s greedy replies (None: no graders)."""
    if not graded:
        return None
    log.log.info(f"evaluate: graders {', '.join(graders.declared(e.graders))} over {len(graded)} turns ...")
    return graders.grade(model, tokenizer, e.graders, graded, e.grader_max_new_tokens, e.batch_size)


def grader_metrics(e: Any, graded: list[dict[str, Any]], grades: dict[str, Any], out: Any) -> dict[str, Any]:
    """The graders' scores of base and fine-tuned (``graders``, ``base_grader_<name>``,
    ``finetuned_grader_<name>``), each turn's replies and scores in ``graded.jsonl``; with
    ``evaluate.primary_grader``, that grader is the primary metric (higher is better)."""
    if not graded or grades.get("base") is None:
        return {}
    (base, base_samples), (ft, ft_samples) = grades["base"], grades["finetuned"]
    metrics: dict[str, Any] = {
        "graded_turns": len(graded),
        "graders": {n: {"type": r["type"], "n": r["n"], "base": r["score"], "finetuned": ft["graders"][n]["score"],
                        **({"base_pass_rate": r["pass_rate"], "finetuned_pass_rate": ft["graders"][n]["pass_rate"]}
                           if "pass_rate" in r else {})}
                    for n, r in base["graders"].items()},
        **graders.flat("base", base), **graders.flat("finetuned", ft)}
    write_jsonl(out / "graded.jsonl", (
        {"row": it["row"], "turn": it["turn"], "reference": it["reference"], "tool_calls": it["tool_calls"],
         "base": {"text": b["text"], "output_tools": b["output_tools"], "scores": base["per_item"][k]},
         "finetuned": {"text": f["text"], "output_tools": f["output_tools"], "scores": ft["per_item"][k]}}
        for k, (it, b, f) in enumerate(zip(graded, base_samples, ft_samples)) if b is not None))
    if e.primary_grader:
        metric = graders.metric_name(e.primary_grader)
        if f"base_{metric}" not in metrics:
            raise TuneopsError(f"evaluate.primary_grader: {e.primary_grader} graded no turn of the eval split "
                               f"(it applies to none of its {len(graded)} turns)")
        metrics.update({"primary_metric": metric, "primary_direction": "higher",
                        f"{metric}_change": metrics[f"finetuned_{metric}"] - metrics[f"base_{metric}"]})
    return metrics


def run(cfg: Config) -> dict[str, Any]:
    from tuneops.io import read_json
    from tuneops.training import objectives
    from tuneops.training.heads import is_head

    e = cfg.evaluate
    base_dir, train_dir = cfg.path("base_model_dir"), cfg.path("train_dir")
    out = fresh_dir(cfg.path("evaluate_dir"))
    info = read_json(train_dir / "metrics.json")
    if is_head(finetuned.head_plan(info)):
        return run_head(cfg, info, out)
    if objectives.of(info).pairs:       # a pair objective (dpo, ...): preference metrics
        return run_pairs(cfg, info, out)
    tokenizer = load_tokenizer(base_dir)
    rows = read_jsonl(cfg.path("clean_eval_data"))[: e.max_samples]
    features = encode(rows, tokenizer, cfg.model.max_seq_len)
    pad = tokenizer.pad_token_id
    prompts = [prompt_and_reference(r["messages"]) for r in rows[: e.generations]]
    tools = [record_tools(r) for r in rows[: e.generations]]     # tool rows: the functions, declared in the prompt

    graded = graders.items(rows) if e.graders else []     # the graded turns of the eval rows

    scores, replies, grades = {}, {}, {}
    for name, model in (("base", load_causal_lm(base_dir)), ("finetuned", finetuned.load(base_dir, train_dir))):
        log.log.info(f"evaluate: {name} model, {len(features)} conversations, {len(prompts)} generations ...")
        model.eval()
        scores[name] = torch_perplexity(model, features, e.batch_size, pad)
        # as the model wrote them: a reply with tool calls keeps its call markers (special tokens in some families)
        replies[name] = [s["text"] for s in graders.sample_replies(
            model, tokenizer, [msgs for msgs, _ in prompts], tools, e.max_new_tokens, e.batch_size)]
        grades[name] = grade(e, model, tokenizer, graded)
        del model

    base, ft = scores["base"], scores["finetuned"]
    metrics = {
        "samples": len(features), "tokens": ft["tokens"], "eval_data_md5": md5_file(cfg.path("clean_eval_data")),
        "base_loss": base["loss"], "base_perplexity": base["perplexity"],
        "finetuned_loss": ft["loss"], "finetuned_perplexity": ft["perplexity"],
        "perplexity_change_pct": 100.0 * (ft["perplexity"] / base["perplexity"] - 1.0),
        "primary_metric": "perplexity", "primary_direction": "lower",
    }
    metrics.update(grader_metrics(e, graded, grades, out))
    write_json(out / "metrics.json", metrics)
    write_json(out / "comparison.json", comparison("perplexity", base["perplexity"], ft["perplexity"]))
    write_jsonl(out / "generations.jsonl", (
        {"prompt": msgs, "reference": ref, "base": replies["base"][i], "finetuned": replies["finetuned"][i]}
        for i, (msgs, ref) in enumerate(prompts)))
    return {"evaluate_dir": str(out), **metrics}
