"""Stage `register`: log everything to the training run in MLflow and register the model
(ONNX variants + adapter + tokenizer as a pyfunc) in the MLflow model registry.

Alias ``champion`` only when the fine-tuned model beats the base model, passes the
ONNX parity gate, and is not worse than the current champion, both re-scored now on the
current eval split with their own tokenizers (``tuneops/registry/promotion.py``); otherwise
``challenger``: a worse model never replaces the champion. Champion moves are recorded
for ``tuneops models rollback`` (``tuneops/registry/versions.py``).

Bound to its run: in the Prefect flow, the training run id and the train / evaluate /
optimize results come from the same flow run (``upstream``), and the files on disk must be
that run's (else it stops: another run replaced them). Convergent: the version is found
again by its ``registration.key`` tag (training run + params), and the gate's decision is a
tag of the version, so a rerun after a kill at any point finishes the same version (card,
alias, champion history, registration.json) instead of creating another. The kill points
between the writes are ``tuneops.faults.REGISTER_POINTS``. The params logged to MLflow are
redacted (``tuneops/secrets.py``). Also writes the version's markdown
model card (its description in the registry) and the HTML run report (``tuneops/registry/report.py``),
both saved in ``paths.register_dir`` and logged to the run.

One flow for every model: what differs between a language model and a classification / NER
head (``task_head`` in the eval metrics) is a ``Kind`` (data: its tags, metrics, pyfunc and
gate), so both converge the same way. Heads: the gate compares evaluate's ``primary_metric``
(accuracy / entity F1, higher is better) against base and champion (the champion re-scored now on
the current eval split with its own tokenizer: ``promotion.rescore_head``); no ONNX variant exists
yet (optimize records why), so the PyTorch model (adapter merged, with its tokenizer and label
maps) is registered as a pyfunc (``tuneops.inference.pyfunc.HeadModel``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tuneops.training import objectives
from tuneops import faults
from tuneops.config import Config
from tuneops.errors import TuneopsError
from tuneops.io import md5_file, read_json, write_json
from tuneops.registry import (CHAMPION, REGISTRATION_TAG, alias_version, base_model_identity, current_champion,
                              decide, dvc_lock_md5s, find_registration, git_commit, model_card, move_alias,
                              record_champion, report, rescore, rescore_head, tracking)
from tuneops.registry import remote as data_remote
from tuneops.secrets import redact, redact_text

__all__ = ["decide", "run"]


def _count_metrics(counts: dict[str, Any]) -> dict[str, float]:
    """The data gate's row counts per split (read = accepted + rejected), as MLflow metrics."""
    out: dict[str, float] = {}
    for split, c in counts.items():
        for key in ("read", "accepted", "rejected"):
            out[f"data_{split}_{key}"] = float(c[key])
        for rule, n in c.get("rejected_by_rule", {}).items():
            out[f"data_{split}_rejected_{rule}"] = float(n)
    return out


def _lineage_tags(cfg: Config) -> dict[str, str]:
    """Git commit, params hash and the datasets' paths and md5s: every registered version's lineage."""
    return {
        "git.commit": git_commit(cfg.root),
        "params.hash": cfg.sections_hash(),
        "data.train.path": os.path.relpath(cfg.path("train_data"), cfg.root),
        "data.train.md5": md5_file(cfg.path("train_data")),
        "data.eval.path": os.path.relpath(cfg.path("eval_data"), cfg.root),
        "data.eval.md5": md5_file(cfg.path("eval_data")),
        **cfg.register.tags,
    }


def _validation_tags(validation: dict[str, Any]) -> dict[str, str]:
    return {"validation.success": str(validation["success"]), "data.scenario": str(validation.get("scenario")),
            "data.format": str(validation.get("format")), "data.policy": str(validation.get("policy")),
            **tracking.run_tags()}


def _add_dvc_lock_tags(cfg: Config, tags: dict[str, str]) -> None:
    """The md5s dvc.lock records for the same dataset paths (equal to data.*.md5 after dvc repro),
    and the DVC remote the train/eval files are pushed to (``tuneops data checkout`` reads it)."""
    lock = dvc_lock_md5s(cfg.root)
    for key in ("train", "eval"):
        recorded = lock.get(tags[f"data.{key}.path"])
        if recorded:
            tags[f"dvc.lock.{key}.md5"] = recorded
    url = data_remote.default_remote(cfg.root)
    if url:
        data_remote.push(url, [cfg.path("train_data"), cfg.path("eval_data")])
        tags["data.remote"] = redact_text(url)      # an s3/http remote URL may carry a password


def _write_record(cfg: Config, name: str, version: Any, alias: str, reason: str, previous: Any,
                  tm: dict[str, Any], tags: dict[str, str]) -> tuple[dict[str, Any], Any]:
    """``registration.json``: the registered version, its alias and why, and its lineage tags."""
    record = {"model_name": name, "version": version.version, "alias": alias, "reason": reason,
              "previous_champion": previous, "mlflow_run_id": tm["mlflow_run_id"],
              "model_uri": f"models:/{name}/{version.version}", "tracking_uri": redact_text(tracking.tracking_uri(cfg)),
              "tags": tags}
    out = cfg.path("register_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "registration.json", record)
    return record, out


def _bound(cfg: Config, upstream: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(train, evaluate, optimize) results of this flow run (``upstream``), checked against the
    files on disk; without ``upstream`` (the stage alone, as dvc.yaml runs it) the files."""
    disk = {"train": read_json(cfg.path("train_dir") / "metrics.json"),
            "evaluate": read_json(cfg.path("evaluate_dir") / "metrics.json"),
            "optimize": read_json(cfg.path("optimize_dir") / "metrics.json")}
    upstream = upstream or {}
    tm = {**disk["train"], **{k: v for k, v in (upstream.get("train") or {}).items() if k in disk["train"]}}
    if tm.get("mlflow_run_id") != disk["train"].get("mlflow_run_id"):
        raise TuneopsError(f"register: {cfg.path('train_dir')} holds training run {disk['train'].get('mlflow_run_id')},"
                           f" not this flow run's {tm.get('mlflow_run_id')}: another run replaced it; run again")
    # as written to disk (write_json: default=str), so numbers and paths compare like for like
    em = json.loads(json.dumps({**disk["evaluate"], **(upstream.get("evaluate") or {})}, default=str))
    om = json.loads(json.dumps({**disk["optimize"], **(upstream.get("optimize") or {})}, default=str))
    for stage, got, have in (("evaluate", em, disk["evaluate"]), ("optimize", om, disk["optimize"])):
        if any(have.get(k) != v for k, v in got.items() if k in have and not k.endswith("_dir")):
            raise TuneopsError(f"register: the {stage} outputs on disk are not this flow run's (another run "
                               f"replaced them); run again")
    em.pop("evaluate_dir", None)
    om.pop("optimize_dir", None)
    tm.pop("train_dir", None)
    return tm, em, om


def registration_key(cfg: Config, tm: dict[str, Any]) -> str:
    """One registration per training run and params: what a rerun looks its version up by."""
    return f"{tm['mlflow_run_id']}:{cfg.sections_hash(('evaluate', 'optimize', 'register'))}"


# --- what differs between a language model and a task head -------------------------------------------

@dataclass(frozen=True)
class Kind:
    """How one kind of model is registered: the rest of the flow is shared (and convergent)."""
    eval_file: str                                                           # evaluate's per-row output
    tags: Callable[[dict[str, Any], dict[str, Any]], dict[str, str]]       # (evaluate, optimize) -> eval tags
    metrics: Callable[[dict[str, Any], dict[str, Any]], dict[str, float]]  # (evaluate, optimize) -> run metrics
    model: Callable[..., dict[str, Any]]    # (cfg, train, evaluate, optimize, tmp) -> pyfunc.log_model kwargs
    gate: Callable[..., tuple[str, str, dict[str, str]]]  # (cfg, name, champion, train, evaluate, optimize)
    #                                                       -> (alias, reason, gate.* tags)


def _grader_scores(em: dict[str, Any]) -> dict[str, float]:
    """evaluate's grader scores (``base_grader_<name>``, ``finetuned_grader_<name>``, pass rates)."""
    return {k: float(v) for k, v in em.items() if k.startswith(("base_grader_", "finetuned_grader_"))
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _lm_tags(em: dict[str, Any], om: dict[str, Any]) -> dict[str, str]:
    return {"eval.base_perplexity": f"{em['base_perplexity']:.6f}",
            "eval.finetuned_perplexity": f"{em['finetuned_perplexity']:.6f}",
            "eval.primary_metric": str(em.get("primary_metric", "perplexity")),
            **{f"eval.{k}": f"{v:.6f}" for k, v in _grader_scores(em).items()},
            "onnx.default_variant": str(om["default_variant"]), **_adapter_tags(om)}



def _adapter_tags(om: dict[str, Any]) -> dict[str, str]:
    """The base graph an unmerged adapter needs (``tuneops/export/adapters.py``): its md5, quantization
    and base model; a server refuses the adapter over any other base."""
    a = om.get("adapter")
    if not a:
        return {}
    return {"adapter.base_md5": a["base"]["md5"], "adapter.base_quant": a["base"]["quant"],
            "adapter.base_quant_id": a["base"]["quant_id"], "adapter.base_model": str(a["base"]["model"]),
            "adapter.base_model_md5": a["base"]["model_md5"], "adapter.accepted": str(a["accepted"])}


def _lm_metrics(em: dict[str, Any], om: dict[str, Any]) -> dict[str, float]:
    variants = om["variants"]
    return {
        "eval_base_loss": em["base_loss"], "eval_base_perplexity": em["base_perplexity"],
        "eval_loss": em["finetuned_loss"], "eval_perplexity": em["finetuned_perplexity"],
        **{("eval_" + k[len("finetuned_"):] if k.startswith("finetuned_") else f"eval_{k}"): v
           for k, v in _grader_scores(em).items()},
        "onnx_fp32_max_abs_logits_diff": variants["fp32"]["max_abs_logits_diff"],
        **{f"onnx_{n}_size_mb": v["size_bytes"] / 2**20 for n, v in variants.items()},
        **{f"onnx_{n}_perplexity": v["perplexity"] for n, v in variants.items()},
        **{f"onnx_{n}_perplexity_change_pct": v["perplexity_change_pct"]
           for n, v in variants.items() if "perplexity_change_pct" in v},
        **{f"onnx_{n}_top1_agreement": v["top1_agreement"] for n, v in variants.items()
           if "top1_agreement" in v},
        **{f"onnx_{n}_accepted": float(v["accepted"]) for n, v in variants.items()},
        **{f"onnx_{n}_coverage_{t}_node_share": c["node_share"]
           for n, v in variants.items() for t, c in v.get("coverage", {}).items()},
        **({f"onnx_adapter_{k}": float(om["adapter"][k]) for k in ("perplexity", "max_abs_logits_diff",
                                                                    "adapter_size_bytes", "accepted")}
           if om.get("adapter") else {}),
    }


def _lm_model(cfg: Config, tm: dict[str, Any], em: dict[str, Any], om: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Self-contained pyfunc: the ONNX variants, the adapter, the tokenizer, tuneops code, pinned requirements."""
    from tuneops.inference import layout
    from tuneops.inference.pyfunc import chat_model_spec

    artifact, opt_dir = cfg.path("train_dir") / tm["artifact"], cfg.path("optimize_dir")
    return chat_model_spec(
        artifacts={**layout.variant_artifacts({n: (opt_dir / v["path"]).parent for n, v in om["variants"].items()}),
                   tm["artifact"]: str(artifact), layout.TOKENIZER: str(artifact),
                   # the unmerged adapter, when its gate passed (its base graph is shared: named by the
                   # adapter.base_* tags; served over it where that graph is on the machine)
                   **({layout.ADAPTER: str(opt_dir / om["adapter"]["path"])}
                      if (om.get("adapter") or {}).get("accepted") else {})},
        variant=om["default_variant"] or "fp32", max_new_tokens=cfg.evaluate.max_new_tokens)


def _lm_gate(cfg: Config, name: str, current: Any, tm: dict[str, Any], em: dict[str, Any],
             om: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """Perplexity: the challenger's fp32 ONNX model and the champion's, both re-scored now (and graded
    by evaluate's graders); with ``evaluate.primary_grader``, that grader's score decides instead."""
    fp32 = om["variants"]["fp32"]
    gate_tags = rescore(cfg, name, current, cfg.path("optimize_dir") / fp32["path"],
                        cfg.path("train_dir") / tm["artifact"], grade=any(g.get("n") for g in (em.get("graders") or {}).values()))
    if current is not None and "gate.champion.error" in gate_tags:
        return "challenger", (f"the champion (version {current.version}) cannot be scored like this "
                              f"version ({gate_tags['gate.champion.error']}): not comparable"), gate_tags
    metric = em.get("primary_metric", "perplexity")
    if metric != "perplexity":          # a grader (evaluate.primary_grader): higher is better
        gate_tags["gate.metric"] = metric
        champion, challenger = (gate_tags.get(f"gate.{w}.{metric}") for w in ("champion", "challenger"))
        if current is not None and (champion is None or challenger is None):
            return "challenger", (f"the champion (version {current.version}) has no {metric} score on this eval "
                                  "split: not comparable"), gate_tags
        alias, reason = decide(em[f"finetuned_{metric}"], em[f"base_{metric}"], fp32["accepted"],
                               None if champion is None else float(champion), cfg.register.min_improvement_pct,
                               metric=metric, higher_is_better=True,
                               challenger_ppl=None if challenger is None else float(challenger))
        return alias, reason, gate_tags
    champion_ppl = float(gate_tags["gate.champion.perplexity"]) if current is not None else None
    alias, reason = decide(em["finetuned_perplexity"], em["base_perplexity"], fp32["accepted"], champion_ppl,
                           cfg.register.min_improvement_pct,
                           challenger_ppl=float(gate_tags["gate.challenger.perplexity"]))
    return alias, reason, gate_tags


def _head_tags(em: dict[str, Any], om: dict[str, Any]) -> dict[str, str]:
    metric = em["primary_metric"]
    return {"task_head": em["task_head"], "labels": ",".join(em["labels"]), "eval.primary_metric": metric,
            "eval.primary_direction": em["primary_direction"],
            f"eval.base_{metric}": f"{em[f'base_{metric}']:.6f}",
            f"eval.finetuned_{metric}": f"{em[f'finetuned_{metric}']:.6f}",
            "onnx.default_variant": "None", "onnx.skipped": str(om.get("skipped"))}


def _head_metrics(em: dict[str, Any], om: dict[str, Any]) -> dict[str, float]:
    scores = {k: v for k, v in em.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {("eval_" + k[len("finetuned_"):] if k.startswith("finetuned_") else f"eval_{k}"): float(v)
            for k, v in scores.items() if k != "samples"}


def _head_model_dir(cfg: Config, tm: dict[str, Any], dest: Any) -> dict[str, str]:
    """The fine-tuned head model as pyfunc artifacts: a plain folder (adapter merged), or base +
    adapter for prompt tuning (nothing to merge)."""
    from tuneops.inference import finetuned
    from tuneops.models import load_tokenizer

    train_dir, base_dir = cfg.path("train_dir"), cfg.path("base_model_dir")
    tokenizer_dir = str(train_dir / tm["artifact"])
    if tm["method"] == "prompt_tuning":
        return {"base": str(base_dir), "adapter": str(train_dir / "adapter"), "tokenizer": tokenizer_dir}
    model = finetuned.load(base_dir, train_dir, merge=True)
    model.save_pretrained(str(dest))
    load_tokenizer(base_dir).save_pretrained(str(dest))
    return {"model": str(dest), "tokenizer": str(dest)}


def _head_model(cfg: Config, tm: dict[str, Any], em: dict[str, Any], om: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The PyTorch head model (adapter merged) with its tokenizer and label maps."""
    from tuneops.inference.pyfunc import HeadModel

    return {"python_model": HeadModel(), "artifacts": _head_model_dir(cfg, tm, tmp / "model"),
            "model_config": {"task_head": em["task_head"], "labels": em["labels"],
                             "max_seq_len": cfg.model.max_seq_len},
            "pip_requirements": ["torch", "transformers>=5.20,<6", "peft", "numpy"]}


def _head_gate(cfg: Config, name: str, current: Any, tm: dict[str, Any], em: dict[str, Any],
               om: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """The primary metric: evaluate's number, and the champion re-scored now on the same rows."""
    metric = em["primary_metric"]
    champion_value, gate_tags = None, {}
    if current is not None:
        theirs = current.tags.get("eval.primary_metric", "perplexity")
        if theirs != metric:
            return "challenger", (f"the champion (version {current.version}) is measured by {theirs}, not {metric}: "
                                  "not comparable (register other tasks under another register.model_name)"), {}
        gate_tags = rescore_head(cfg, name, current, metric, em[f"finetuned_{metric}"], em["labels"])
        if "gate.champion.error" in gate_tags:
            return "challenger", (f"the champion (version {current.version}) cannot be scored on this eval split "
                                  f"({gate_tags['gate.champion.error']}): not comparable, so not promoted"), gate_tags
        champion_value = float(gate_tags[f"gate.champion.{metric}"])
    alias, reason = decide(em[f"finetuned_{metric}"], em[f"base_{metric}"], True, champion_value,
                           cfg.register.min_improvement_pct, metric=metric,
                           higher_is_better=em["primary_direction"] == "higher")
    return alias, reason, gate_tags


def _pair_tags(em: dict[str, Any], om: dict[str, Any]) -> dict[str, str]:
    metric = em["primary_metric"]
    return {**_lm_tags(em, om), "objective": em["objective"], "eval.primary_metric": metric,
            "eval.primary_direction": em["primary_direction"],
            f"eval.base_{metric}": f"{em[f'base_{metric}']:.6f}",
            f"eval.finetuned_{metric}": f"{em[f'finetuned_{metric}']:.6f}",
            "eval.finetuned_margin": f"{em['finetuned_margin']:.6f}"}


def _pair_metrics(em: dict[str, Any], om: dict[str, Any]) -> dict[str, float]:
    pairs = {("eval_" + k[len("finetuned_"):] if k.startswith("finetuned_") else f"eval_{k}"): float(v)
             for k, v in em.items() if k.startswith(("base_", "finetuned_")) and isinstance(v, (int, float))
             and not isinstance(v, bool)}
    return {**pairs, **_lm_metrics(em, om)}


def _pair_gate(cfg: Config, name: str, current: Any, tm: dict[str, Any], em: dict[str, Any],
               om: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
    """A pair objective: the primary metric (preference accuracy on the held-out pairs) against
    the base and the champion's own recorded value, when the champion was measured the same way on
    the same eval rows (its tags); otherwise not comparable."""
    metric = em["primary_metric"]
    champion_value, gate_tags = None, {}
    if current is not None:
        theirs = current.tags.get("eval.primary_metric", "perplexity")
        same_rows = current.tags.get("eval.data.md5") == str(em.get("eval_data_md5", ""))
        if theirs != metric or not same_rows or f"eval.finetuned_{metric}" not in current.tags:
            why = f"is measured by {theirs}, not {metric}" if theirs != metric else "was scored on other eval rows"
            return "challenger", (f"the champion (version {current.version}) {why}: not comparable "
                                  "(register other objectives under another register.model_name)"), {}
        champion_value = float(current.tags[f"eval.finetuned_{metric}"])
        gate_tags = {f"gate.champion.{metric}": f"{champion_value:.6f}",
                     f"gate.challenger.{metric}": f"{em[f'finetuned_{metric}']:.6f}"}
    alias, reason = decide(em[f"finetuned_{metric}"], em[f"base_{metric}"], om["variants"]["fp32"]["accepted"],
                           champion_value, cfg.register.min_improvement_pct, metric=metric,
                           higher_is_better=em["primary_direction"] == "higher")
    return alias, reason, gate_tags


LM = Kind("generations.jsonl", _lm_tags, _lm_metrics, _lm_model, _lm_gate)
HEAD = Kind("predictions.jsonl", _head_tags, _head_metrics, _head_model, _head_gate)
PAIRS = Kind("pairs.jsonl", _pair_tags, _pair_metrics, _lm_model, _pair_gate)   # dpo and the other pair objectives


# --- the flow -------------------------------------------------------------------------------------------

def run(cfg: Config, upstream: dict[str, Any] | None = None) -> dict[str, Any]:
    from mlflow import MlflowClient

    tm, em, om = _bound(cfg, upstream)
    plan = read_json(cfg.path("plan"))
    validation = read_json(cfg.path("validation_dir") / "report.json")
    kind = HEAD if em.get("task_head") else PAIRS if objectives.of(em).pairs else LM
    name = cfg.register.model_name

    tracking.setup(cfg)
    client = MlflowClient()
    key = registration_key(cfg, tm)
    version = find_registration(client, name, key)
    if version is None:
        version = _register(cfg, kind, client, name, key, tm, em, om, plan, validation)
    faults.point("register:version")
    return _finish(cfg, client, name, version, tm, em, om, plan, validation)


def _register(cfg: Config, kind: Kind, client: Any, name: str, key: str, tm: dict[str, Any], em: dict[str, Any],
              om: dict[str, Any], plan: dict[str, Any], validation: dict[str, Any]) -> Any:
    """Log the run's record and the pyfunc, run the gate, and create the version: one write with
    everything a rerun needs (lineage, the gate's numbers and decision, the champion it was
    compared with, and the registration key)."""
    import tempfile

    import mlflow

    tags = {
        **_lineage_tags(cfg),
        **base_model_identity(cfg.path("base_model_dir")),
        "method": plan["method"],
        **kind.tags(em, om),
        "eval.data.md5": str(em.get("eval_data_md5", "")),
        **_validation_tags(validation),
    }
    _add_dvc_lock_tags(cfg, tags)
    # into the training run: metrics, data counts, lineage tags, the plan, the validation report and
    # Data Docs, optimize's metrics, evaluate's per-row file, the loss history, the params, the pyfunc
    with tempfile.TemporaryDirectory(dir=cfg.state_dir) as tmp, mlflow.start_run(run_id=tm["mlflow_run_id"]):
        mlflow.log_metrics({**kind.metrics(em, om), **_count_metrics(validation.get("counts", {}))})
        mlflow.set_tags(tags)
        mlflow.log_dict(plan, "plan.json")
        mlflow.log_dict(validation, "validation/report.json")
        if (docs := cfg.path("validation_dir") / "data_docs").is_dir():
            mlflow.log_artifacts(str(docs), "validation/data_docs")
        mlflow.log_dict(om, "optimize/metrics.json")
        mlflow.log_artifact(str(cfg.path("evaluate_dir") / kind.eval_file), "evaluate")
        mlflow.log_artifact(str(cfg.path("train_dir") / "history.json"), "train")
        mlflow.log_dict(redact(cfg.raw), "params.json")
        info = mlflow.pyfunc.log_model(name="model", **kind.model(cfg, tm, em, om, Path(tmp)))
    faults.point("register:logged")
    current = current_champion(client, name)
    alias, reason, gate_tags = kind.gate(cfg, name, current, tm, em, om)
    return mlflow.register_model(info.model_uri, name, tags={
        **tags, **gate_tags, "promotion.reason": reason, "promotion.alias": alias,
        "previous_champion": str(current.version) if current is not None else "", REGISTRATION_TAG: key})


def _finish(cfg: Config, client: Any, name: str, version: Any, tm: dict[str, Any], em: dict[str, Any],
            om: dict[str, Any], plan: dict[str, Any], validation: dict[str, Any]) -> dict[str, Any]:
    """Everything after the version exists, each step idempotent and read from the version's tags:
    model card, alias, champion history, registration.json, report. A rerun redoes what is missing."""
    version = client.get_model_version(name, str(version.version))
    vt = dict(version.tags)
    alias, reason = vt["promotion.alias"], vt["promotion.reason"]
    tags = {k: v for k, v in vt.items() if not k.startswith(("promotion.", "gate.", "champion.", "rolled_back"))
            and k not in (REGISTRATION_TAG, "previous_champion")}
    card = model_card(name, version.version, alias, reason, {**vt, "mlflow.run_id": tm["mlflow_run_id"]},
                      em, plan, om, validation)
    if version.description != card:
        client.update_model_version(name, version.version, description=card)
    faults.point("register:card")
    number = int(version.version)
    if alias == CHAMPION:
        # once champion (then maybe rolled back), a rerun never moves the alias back to it
        if alias_version(client, name, alias) != number and not vt.get("champion.at") \
                and not vt.get("rolled_back"):
            move_alias(client, name, alias, number)
        faults.point("register:alias")
        if alias_version(client, name, alias) == number and not vt.get("champion.at"):
            record_champion(client, name, number, reason)
    else:
        held = alias_version(client, name, alias)
        if held is None or held < number:          # never takes the alias from a newer version
            move_alias(client, name, alias, number)
        faults.point("register:alias")
    faults.point("register:history")
    record, out = _write_record(cfg, name, version, alias, reason, vt.get("previous_champion") or None, tm, tags)
    faults.point("register:record")
    (out / "model_card.md").write_text(card, encoding="utf-8")
    client.log_artifact(tm["mlflow_run_id"], str(out / "model_card.md"))
    record["report"] = str(report.write(cfg, record))
    client.log_artifact(tm["mlflow_run_id"], record["report"], "report")
    return {"register_dir": str(out), **record}
