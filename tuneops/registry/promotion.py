"""The promotion gate, on like-for-like numbers.

``decide`` is the rule: a fine-tuned model becomes ``champion`` only when it beats the base
model, passes the ONNX fp32 gate and is not worse than the current champion; otherwise
``challenger``. It compares numbers that were measured the same way on the same rows:

- fine-tuned vs base: evaluate's two scores (one run, one eval split, one tokenizer);
- challenger vs champion: both re-scored now (``rescore``), on the current eval split,
  each registered/exported fp32 ONNX model with its *own* tokenizer (a champion with
  another base model or tokenizer is scored with its own), by the same ONNX Runtime
  scorer. A champion's old tag value, measured on an older split, is never compared.

Graders (``evaluate.graders``): with a champion, both models' fp32 ONNX graphs also reply greedily to
the current eval split's graded turns and are graded the same way (``score_graders``); with
``evaluate.primary_grader`` the gate compares that grader's score (higher is better) instead of perplexity.

Classification / NER heads: the champion's registered PyTorch head is re-scored the same way
(``rescore_head``) by the scorer evaluate uses, on the current eval split, with its own
tokenizer; a champion with another label set is not comparable.

The numbers and how they were measured are tags on the version (``gate.*``) and a section
of its model card.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneops.inference import layout

SCORER = "ONNX Runtime fp32, each model with its own tokenizer, on the current eval split"
GRADER_SCORER = ("evaluate.graders over greedy replies of each fp32 ONNX model (ONNX Runtime, its own tokenizer), "
                 "on the current eval split")
HEAD_SCORER = "PyTorch, each head model with its own tokenizer and label set, on the current eval split"


def decide(ft_ppl: float, base_ppl: float, onnx_ok: bool, champion_ppl: float | None,
           min_improvement_pct: float, metric: str = "perplexity", higher_is_better: bool = False,
           challenger_ppl: float | None = None) -> tuple[str, str]:
    """The promotion gate: (alias, reason). ``metric`` is lower-is-better (perplexity) unless
    ``higher_is_better`` (accuracy, entity F1); the required improvement over the champion is
    relative in the metric's direction. ``challenger_ppl`` is the fine-tuned model's score on the
    same scale as ``champion_ppl`` (default ``ft_ppl``)."""
    ft, base, champ = ft_ppl, base_ppl, champion_ppl
    chal = ft if challenger_ppl is None else challenger_ppl
    if (ft <= base) if higher_is_better else (ft >= base):
        return "challenger", f"fine-tuned {metric} {ft:.3f} does not beat base {base:.3f}"
    if not onnx_ok:
        return "challenger", "ONNX fp32 export failed the parity gate"
    if champ is not None and ((chal < champ * (1 + min_improvement_pct / 100)) if higher_is_better
                              else (chal > champ * (1 - min_improvement_pct / 100))):
        return "challenger", (f"fine-tuned {metric} {chal:.3f} is worse than the champion's "
                              f"{champ:.3f} on the same eval rows (required improvement {min_improvement_pct}%)")
    against = "no champion yet" if champ is None else f"champion {champ:.3f} (same eval rows: {chal:.3f})"
    return "champion", f"{metric} {ft:.3f} beats base {base:.3f} and {against}"


def eval_rows(cfg: Any) -> list[dict[str, Any]]:
    """The current eval split: the rows evaluate scores."""
    from tuneops.io import read_jsonl

    return read_jsonl(cfg.path("clean_eval_data"))[: cfg.evaluate.max_samples]


def eval_features(cfg: Any, tokenizer: Any) -> list[dict[str, list[int]]]:
    """The current eval split, encoded with ``tokenizer``."""
    from tuneops.inference.scoring import encode

    return encode(eval_rows(cfg), tokenizer, cfg.model.max_seq_len)


def score_onnx(cfg: Any, onnx_path: Path, tokenizer_dir: Path) -> dict[str, float]:
    """Perplexity of an fp32 ONNX causal LM on the current eval split, with its own tokenizer."""
    from tuneops.inference.scoring import perplexity
    from tuneops.models import load_tokenizer
    from tuneops.inference.runtimes import OnnxCausalLM

    tok = load_tokenizer(Path(tokenizer_dir))
    features = eval_features(cfg, tok)
    return perplexity(OnnxCausalLM(Path(onnx_path)), features, cfg.evaluate.batch_size, tok.pad_token_id)


def score_graders(cfg: Any, onnx_path: Path, tokenizer_dir: Path) -> dict[str, float | None]:
    """``evaluate.graders`` of an fp32 ONNX causal LM on the current eval split's graded turns (greedy
    replies, its own tokenizer): the grader name -> its score (None: it applies to no turn)."""
    from tuneops.inference import graders
    from tuneops.inference.runtimes import OnnxCausalLM
    from tuneops.models import load_tokenizer

    e = cfg.evaluate
    tok = load_tokenizer(Path(tokenizer_dir))
    runtime = OnnxCausalLM(Path(onnx_path))
    result, _ = graders.grade(runtime, tok, e.graders, graders.items(eval_rows(cfg)), e.grader_max_new_tokens,
                              e.batch_size)
    return {n: r["score"] for n, r in result["graders"].items()}


def _grader_tags(who: str, scores: dict[str, float | None]) -> dict[str, str]:
    from tuneops.inference.graders import metric_name

    return {f"gate.{who}.{metric_name(n)}": f"{v:.6f}" for n, v in scores.items() if v is not None}


def registered_fp32(name: str, version: str, dest: Path) -> tuple[Path, Path]:
    """(fp32 model.onnx, tokenizer folder) of a registered version, downloaded into ``dest``."""
    import mlflow.pyfunc

    Path(dest).mkdir(parents=True, exist_ok=True)    # MLflow downloads only into an existing folder
    arts = mlflow.pyfunc.load_model(f"models:/{name}/{version}", dst_path=str(dest)).unwrap_python_model().artifacts
    onnx, tok = layout.onnx_file(arts, "fp32"), layout.tokenizer_dir(arts)
    if onnx is None or tok is None or not onnx.is_file() or not (tok / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"{name} v{version}: no fp32 ONNX model and tokenizer among its artifacts")
    return onnx, tok


def _split_tags(cfg: Any, scorer: str, samples: int) -> dict[str, Any]:
    """How and on which rows both models were scored: the scorer, the eval split's md5, the row count."""
    from tuneops.io import md5_file

    return {"gate.scorer": scorer, "gate.eval_data.md5": md5_file(cfg.path("clean_eval_data")),
            "gate.samples": str(samples)}


def _champion_tags(champion: Any) -> dict[str, str]:
    return {"gate.champion.version": str(champion.version),
            "gate.champion.base_model.hash": str(champion.tags.get("base_model.hash", ""))}


def rescore(cfg: Any, name: str, champion: Any, challenger_onnx: Path,
            challenger_tok: Path, grade: bool = False) -> dict[str, Any]:
    """Champion and challenger scored now, the same way, on the same rows. Returns the
    ``gate.*`` tags; ``champion`` is None when there is none. ``grade``: with a champion, both are
    also graded by ``evaluate.graders`` (``gate.{challenger,champion}.grader_<name>``)."""
    import tempfile

    tags = _split_tags(cfg, SCORER, len(eval_rows(cfg)))
    chal = score_onnx(cfg, challenger_onnx, challenger_tok)
    tags["gate.challenger.perplexity"] = f"{chal['perplexity']:.6f}"
    tags["gate.challenger.tokens"] = str(chal["tokens"])
    if champion is None:
        return tags
    tags.update(_champion_tags(champion))
    with tempfile.TemporaryDirectory(dir=cfg.state_dir, prefix=f"gate-{os.getpid()}-") as tmp:
        try:
            onnx, tok = registered_fp32(name, champion.version, Path(tmp))
        except FileNotFoundError as exc:      # e.g. a head model: nothing to score the same way
            tags["gate.champion.error"] = str(exc)[:500]
            return tags
        champ = score_onnx(cfg, onnx, tok)
        if grade and cfg.evaluate.graders:
            tags["gate.grader_scorer"] = GRADER_SCORER
            tags.update(_grader_tags("challenger", score_graders(cfg, challenger_onnx, challenger_tok)))
            tags.update(_grader_tags("champion", score_graders(cfg, onnx, tok)))
    tags["gate.champion.perplexity"] = f"{champ['perplexity']:.6f}"
    tags["gate.champion.tokens"] = str(champ["tokens"])
    return tags


def rescore_head(cfg: Any, name: str, champion: Any, metric: str, challenger_value: float,
                 labels: list[str]) -> dict[str, Any]:
    """A classification / NER champion scored now on the current eval split, by the scorer
    evaluate uses for heads (``heads.score``), with the champion's own tokenizer and label set:
    the challenger's number (evaluate's, on the same rows) is comparable with it. Returns the
    ``gate.*`` tags; ``gate.champion.error`` when the champion cannot be scored on these rows
    (another label set, no head model among its artifacts)."""
    import tempfile

    import mlflow.pyfunc

    from tuneops.training import heads

    rows = eval_rows(cfg)
    tags: dict[str, Any] = {**_split_tags(cfg, HEAD_SCORER, len(rows)), "gate.metric": metric,
                            f"gate.challenger.{metric}": f"{challenger_value:.6f}", **_champion_tags(champion)}
    with tempfile.TemporaryDirectory(dir=cfg.state_dir, prefix=f"gate-{os.getpid()}-") as tmp:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{champion.version}", dst_path=tmp).unwrap_python_model()
        if not hasattr(model, "model") or not hasattr(model, "labels"):
            tags["gate.champion.error"] = f"{name} v{champion.version} is not a head model"
            return tags
        if list(model.labels) != list(labels):
            tags["gate.champion.error"] = (f"{name} v{champion.version} predicts labels {list(model.labels)}, "
                                           f"this model {list(labels)}")
            return tags
        plan = {"task_head": model.head, "labels": list(model.labels), "method": champion.tags.get("method")}
        try:
            features = heads.encode(rows, model.tokenizer, model.max_len, plan)
        except ValueError as exc:
            tags["gate.champion.error"] = str(exc)[:500]
            return tags
        scores, _ = heads.score(model.model, features, plan, cfg.evaluate.batch_size, model.tokenizer.pad_token_id)
    tags[f"gate.champion.{metric}"] = f"{scores[metric]:.6f}"
    return tags
