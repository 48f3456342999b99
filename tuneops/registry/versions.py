"""The model registry (MLflow): aliases ``champion`` / ``challenger``, promotion only
through the evaluation gate, rollback, model cards and lineage.

``champion`` moves only when a version passes ``promotion.decide`` (beats the base
model, passes the ONNX fp32 gate, not worse than the current champion re-scored on the same
eval rows) - at registration or with ``tuneops models promote``.

Every champion move is appended to the registered model's ``champion.history`` tag *after*
the alias has moved (and the version gets a ``champion.at`` tag), so the history names only
versions that really were champion. ``champion_stack`` derives the sequence of champions from
that log and from where the alias points now (a move whose log entry was lost to a kill is
taken from the alias itself); ``rollback`` walks that stack back.
"""
from __future__ import annotations

import json
import time
from typing import Any

from tuneops.registry import tracking
from tuneops.config import Config
from tuneops.errors import TuneopsError
from tuneops.registry.provenance import dvc_lock_md5s

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "champion.history"
REGISTRATION_TAG = "registration.key"     # training run + params: a rerun finds its own version


class RegistryError(TuneopsError, ValueError):
    """A registry request that cannot be done (message says why)."""


def client(cfg: Config) -> Any:
    from mlflow import MlflowClient

    tracking.setup(cfg)
    return MlflowClient()


def model_name(cfg: Config, name: str | None) -> str:
    """``default`` (or nothing) means this project's ``register.model_name``."""
    return cfg.register.model_name if name in (None, "", "default") else name


def parse_ref(cfg: Config, ref: str) -> tuple[str, str]:
    """``NAME@ALIAS`` / ``NAME@VERSION`` / ``ALIAS`` / ``VERSION`` -> (name, alias or version)."""
    name, _, which = ref.rpartition("@")
    return model_name(cfg, name), which or CHAMPION


def get_version(mc: Any, name: str, which: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        if which.isdigit():
            return mc.get_model_version(name, which)
        return mc.get_model_version_by_alias(name, which)
    except MlflowException:
        raise RegistryError(f"registry: {name}@{which}: no such model version") from None


def _registered(mc: Any, name: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"registry: no registered model named {name!r} (nothing registered yet)") from None


def _history(mc: Any, name: str) -> list[dict[str, Any]]:
    tags = _registered(mc, name).tags
    try:
        history = json.loads(tags.get(HISTORY_TAG, "[]"))
    except ValueError:
        return []
    return history if isinstance(history, list) else []


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def champion_stack(mc: Any, name: str) -> list[str]:
    """The champions in order, oldest first, the current one last: replayed from the history
    log (``promoted`` pushes, ``rolled_back`` pops to its target), then reconciled with the
    alias, the ground truth (an interrupted move whose entry was never written)."""
    stack: list[str] = []
    for event in _history(mc, name):
        version = str(event.get("version"))
        if event.get("event") == "rolled_back":
            while stack and stack[-1] != version:
                stack.pop()
            if not stack:
                stack.append(version)
        elif not stack or stack[-1] != version:
            stack.append(version)
    current = alias_version(mc, name, CHAMPION)
    if current is None:
        return []
    current_s = str(current)
    if current_s in stack:
        while stack[-1] != current_s:
            stack.pop()
    else:
        stack.append(current_s)
    return stack


def record_champion(mc: Any, name: str, version: str, reason: str) -> None:
    """After the champion alias has moved to ``version``: log the move (once) and tag the version."""
    version = str(version)
    history = _history(mc, name)
    last = history[-1] if history else {}
    if str(last.get("version")) == version and last.get("event", "promoted") == "promoted":
        at = str(last.get("at") or _now())           # a rerun: the move is already logged
    else:
        at = _now()
        history.append({"event": "promoted", "version": version, "at": at, "reason": reason})
        mc.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    mc.set_model_version_tag(name, version, "champion.at", at)


def move_alias(mc: Any, name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` (a new champion stops being the challenger)."""
    mc.set_registered_model_alias(name, alias, str(version))
    if alias == CHAMPION and alias_version(mc, name, CHALLENGER) == int(version):
        mc.delete_registered_model_alias(name, CHALLENGER)


def set_alias(mc: Any, name: str, alias: str, version: str, reason: str) -> None:
    """Point ``alias`` at ``version``; a champion move is logged for rollback only after the
    alias has moved."""
    move_alias(mc, name, alias, version)
    if alias == CHAMPION:
        record_champion(mc, name, version, reason)


def find_registration(mc: Any, name: str, key: str) -> Any:
    """The version an earlier (maybe interrupted) registration with this key created, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = mc.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    mine = [v for v in found if v.tags.get(REGISTRATION_TAG) == key]
    return min(mine, key=lambda v: int(v.version)) if mine else None


def _artifact(mc: Any, run_id: str, path: str) -> Any:
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{path}")
    except Exception:  # noqa: BLE001 - older versions may lack an artifact
        return None


def summary(mv: Any, aliases: list[str] | None = None) -> dict[str, Any]:
    t = mv.tags
    return {
        "version": int(mv.version), "aliases": sorted(mv.aliases if aliases is None else aliases),
        "run_id": mv.run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mv.creation_timestamp / 1000)),
        "method": t.get("method"), "eval_perplexity": _float(t.get("eval.finetuned_perplexity")),
        "base_perplexity": _float(t.get("eval.base_perplexity")), "data_train_md5": t.get("data.train.md5"),
        "onnx_default_variant": t.get("onnx.default_variant"), "promotion_reason": t.get("promotion.reason"),
    }


def _float(value: Any) -> float | None:
    return float(value) if value not in (None, "") else None


def list_versions(cfg: Config, name: str | None = None) -> list[dict[str, Any]]:
    mc, name = client(cfg), model_name(cfg, name)
    found = mc.search_model_versions(f"name='{name}'")
    aliases: dict[str, list[str]] = {}
    if found:  # search results do not carry aliases: read them from the registered model
        for alias, version in mc.get_registered_model(name).aliases.items():
            aliases.setdefault(str(version), []).append(alias)
    return [summary(v, aliases.get(str(v.version), [])) for v in sorted(found, key=lambda v: int(v.version))]


def show(cfg: Config, ref: str) -> dict[str, Any]:
    mc = client(cfg)
    name, which = parse_ref(cfg, ref)
    mv = get_version(mc, name, which)
    return {"name": name, **summary(mv), "tags": dict(mv.tags), "model_card": mv.description or ""}


def gate(mc: Any, cfg: Config, name: str, mv: Any) -> tuple[str, str]:
    """The evaluation gate for an existing version against the current champion: the base
    comparison from the version's own evaluation, the champion comparison on numbers measured
    now, both versions re-scored on this project's current eval split with their own tokenizers."""
    import tempfile
    from pathlib import Path

    from tuneops.registry.promotion import decide, registered_fp32, score_graders, score_onnx

    opt = _artifact(mc, mv.run_id, "optimize/metrics.json") or {}
    onnx_ok = bool(opt.get("variants", {}).get("fp32", {}).get("accepted", False))
    try:
        champ = mc.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001 - no champion yet
        champ = None
    if champ is not None and champ.version == mv.version:
        raise RegistryError(f"registry: {name} version {mv.version} is already the champion")
    grader = mv.tags.get("eval.primary_metric", "").removeprefix("grader_") \
        if mv.tags.get("eval.primary_metric", "").startswith("grader_") else None    # evaluate.primary_grader
    metric = "perplexity" if grader is None else f"grader_{grader}"
    ppl, base = _float(mv.tags.get(f"eval.finetuned_{metric}")), _float(mv.tags.get(f"eval.base_{metric}"))
    if ppl is None or base is None:
        raise RegistryError(f"registry: {name} version {mv.version} has no evaluation tags; it cannot pass the gate")
    if grader is not None and grader not in [g["name"] for g in cfg.evaluate.graders]:
        raise RegistryError(f"registry: {name} version {mv.version} is gated by the grader {grader!r}, which "
                            "evaluate.graders does not declare: it cannot be re-scored")
    champ_ppl = chal_ppl = None
    if champ is not None:
        if not cfg.path("clean_eval_data").is_file():
            raise RegistryError(f"registry: no eval split at {cfg.path('clean_eval_data')} to score {name} "
                                f"v{mv.version} and the champion v{champ.version} on (run the pipeline up to validate)")
        with tempfile.TemporaryDirectory(dir=cfg.state_dir, prefix="gate-") as tmp:
            try:
                files = [registered_fp32(name, v.version, Path(tmp) / str(v.version)) for v in (mv, champ)]
            except FileNotFoundError as exc:
                raise RegistryError(f"registry: {exc}") from None
            if grader is None:
                chal_ppl, champ_ppl = (score_onnx(cfg, *f)["perplexity"] for f in files)
            else:
                chal_ppl, champ_ppl = (score_graders(cfg, *f)[grader] for f in files)
                if chal_ppl is None or champ_ppl is None:
                    raise RegistryError(f"registry: the grader {grader!r} grades no turn of the current eval split")
    return decide(ppl, base, onnx_ok, champ_ppl, cfg.register.min_improvement_pct, metric=metric,
                  higher_is_better=grader is not None, challenger_ppl=chal_ppl)


def promote(cfg: Config, ref: str) -> dict[str, Any]:
    """Make a version champion if, and only if, it passes the evaluation gate now."""
    mc = client(cfg)
    name, which = parse_ref(cfg, ref)
    mv = get_version(mc, name, which)
    previous = alias_version(mc, name, CHAMPION)
    alias, reason = gate(mc, cfg, name, mv)
    if alias != CHAMPION:
        raise RegistryError(f"registry: {name} version {mv.version} not promoted: {reason}")
    set_alias(mc, name, CHAMPION, mv.version, f"promoted: {reason}")
    return {"name": name, "version": int(mv.version), "alias": CHAMPION, "reason": reason,
            "previous_champion": previous}


def alias_version(mc: Any, name: str, alias: str) -> int | None:
    """The version number ``alias`` points at, or None (no such alias or model)."""
    try:
        return int(mc.get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001
        return None


def current_champion(mc: Any, name: str) -> Any:
    """The model version the ``champion`` alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mc.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def rollback(cfg: Config, name: str | None = None) -> dict[str, Any]:
    """Give ``champion`` back to the version that held it before the current one (only ever a
    version that really was champion: see ``champion_stack``)."""
    mc, name = client(cfg), model_name(cfg, name)
    _registered(mc, name)
    stack = champion_stack(mc, name)
    if not stack:
        raise RegistryError(f"registry: {name} has no champion to roll back")
    current = stack[-1]
    if len(stack) < 2:
        raise RegistryError(f"registry: {name}: no earlier champion than version {current} to roll back to")
    target = stack[-2]
    get_version(mc, name, target)
    mc.set_registered_model_alias(name, CHAMPION, target)
    history = _history(mc, name)
    history.append({"event": "rolled_back", "version": target, "from": current, "at": _now()})
    mc.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    mc.set_model_version_tag(name, current, "rolled_back", _now())
    return {"name": name, "champion": int(target), "rolled_back": int(current)}


# --- lineage -------------------------------------------------------------------------------------------

def lineage(cfg: Config, ref: str) -> dict[str, Any]:
    """Everything a registered version came from, read back from MLflow (not local files)."""
    mc = client(cfg)
    name, which = parse_ref(cfg, ref)
    mv = get_version(mc, name, which)
    t = mv.tags
    run = mc.get_run(mv.run_id)
    validation = _artifact(mc, mv.run_id, "validation/report.json") or {}
    plan = _artifact(mc, mv.run_id, "plan.json") or {}
    optimize = _artifact(mc, mv.run_id, "optimize/metrics.json") or {}
    params = _artifact(mc, mv.run_id, "params.json")
    lock = dvc_lock_md5s(cfg.root)
    datasets = []
    for key in ("train", "eval"):
        path = t.get(f"data.{key}.path")
        datasets.append({"split": key, "path": path, "md5": t.get(f"data.{key}.md5"),
                         "dvc_lock_md5": t.get(f"dvc.lock.{key}.md5"),
                         "matches_dvc_lock": lock.get(path) == t.get(f"data.{key}.md5") if path in lock else None})
    return {
        "model": {"name": name, "version": int(mv.version), "aliases": sorted(mv.aliases),
                  "uri": f"models:/{name}/{mv.version}"},
        "git_commit": t.get("git.commit"),
        "datasets": datasets,
        "params": {"hash": t.get("params.hash"), "values": params},
        "validation": {
            "success": validation.get("success"), "scenario": validation.get("scenario"),
            "format": validation.get("format"), "policy": validation.get("policy"),
            "counts": {s: {k: c.get(k) for k in ("read", "accepted", "rejected")}
                       for s, c in (validation.get("counts") or {}).items()},
        },
        "base_model": {"id": t.get("base_model.id") or t.get("base_model.source"),
                       "source": t.get("base_model.source"), "hash": t.get("base_model.hash")},
        "plan": {k: plan.get(k) for k in ("method", "zero_stage", "offload", "micro_batch_size", "grad_accum",
                                          "gradient_checkpointing", "launcher", "fits", "reasons") if k in plan},
        "metrics": dict(run.data.metrics),
        "onnx": {"default_variant": optimize.get("default_variant"),
                 "variants": {n: {k: v.get(k) for k in ("path", "accepted", "gate", "perplexity",
                                                          "perplexity_change_pct", "max_abs_logits_diff",
                                                          "size_bytes", "coverage") if k in v}
                              for n, v in (optimize.get("variants") or {}).items()}},
        "promotion_reason": t.get("promotion.reason"),
        "prefect_flow_run_id": t.get("prefect.flow_run_id"),
        "mlflow_run_id": mv.run_id,
    }


# --- model card -----------------------------------------------------------------------------------------

def _gate_section(tags: dict[str, str]) -> str:
    """How the champion comparison was measured (the ``gate.*`` tags; ``gate.metric`` for heads)."""
    metric = tags.get("gate.metric", "perplexity")
    if f"gate.challenger.{metric}" not in tags:
        return "Fine-tuned vs base: the evaluation above (same split, same tokenizer)."
    scorer = tags.get("gate.grader_scorer") if metric.startswith("grader_") else tags.get("gate.scorer")
    tokens = "tokens scored" if metric == "perplexity" else ""
    lines = [f"Fine-tuned vs base: the evaluation above. Champion comparison: {scorer}, "
             f"{tags.get('gate.samples')} rows of the eval split `{tags.get('gate.eval_data.md5')}`, measured at "
             "registration.", "", f"| model | {metric} | {tokens} |", "|---|---|---|",
             f"| this version | {tags[f'gate.challenger.{metric}']} | {tokens and tags.get('gate.challenger.tokens', '')} |"]
    if tags.get("gate.champion.version"):
        same = tags.get("gate.champion.base_model.hash") == tags.get("base_model.hash")
        lines.append(f"| champion v{tags['gate.champion.version']} | {tags.get(f'gate.champion.{metric}')} | "
                     f"{tokens and tags.get('gate.champion.tokens', '')} |")
        lines += ["", "The champion was scored with its own tokenizer and weights"
                  + ("" if same else " (another base model than this version's)") + "."]
    else:
        lines += ["", "No champion at registration."]
    return "\n".join(lines)


def _graders_section(tags: dict[str, str], metrics: dict[str, Any]) -> str:
    """evaluate's graders (base, fine-tuned) and, when register compared, champion and this version re-scored."""
    graded = {n: g for n, g in (metrics.get("graders") or {}).items() if g.get("n")}   # graders that graded turns
    if not graded:
        return ""

    def num(v: Any) -> str:
        return "-" if v is None else f"{float(v):.4f}"

    rows = []
    for n, g in graded.items():
        champion, this = (tags.get(f"gate.{w}.grader_{n}") for w in ("champion", "challenger"))
        rows.append(f"| {n} | {g.get('type')} | {g.get('n')} | {num(g.get('base'))} | {num(g.get('finetuned'))} | "
                    f"{num(this)} | {num(champion)} |")
    champ = f"champion v{tags['gate.champion.version']}" if tags.get("gate.champion.version") else "champion"
    return ("\n## Graders (held-out split, `evaluate.graders`)\n"
            f"{metrics.get('graded_turns')} graded turns; the last two columns: both fp32 ONNX models re-scored at "
            "registration when there was a champion to compare with.\n\n"
            f"| grader | type | turns | base | fine-tuned | this version (ONNX) | {champ} (ONNX) |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def model_card(name: str, version: str, alias: str, reason: str, tags: dict[str, str], metrics: dict[str, Any],
               plan: dict[str, Any], optimize: dict[str, Any], validation: dict[str, Any]) -> str:
    """The markdown model card stored as the version's description (and as an artifact). The
    evaluation is by ``metrics['primary_metric']`` (perplexity for language models)."""
    metric = metrics.get("primary_metric", "perplexity")
    rows = "\n".join(f"| {n} | {'yes' if v.get('accepted') else 'no'} | {v.get('gate', '')} | "
                     f"{v.get('perplexity', float('nan')):.4f} | {v.get('size_bytes', 0) / 2**20:.1f} MB |"
                     for n, v in (optimize.get("variants") or {}).items())
    counts = validation.get("counts") or {}
    data = "\n".join(f"| {s} | {tags.get(f'data.{s}.path', '')} | `{tags.get(f'data.{s}.md5', '')}` | "
                     f"{(counts.get(s) or {}).get('accepted', '')} |" for s in ("train", "eval"))
    return f"""# {name} v{version}

**Alias at registration:** `{alias}` - {reason}

## Model
- Base model: {tags.get('base_model.id') or tags.get('base_model.source')} (hash `{tags.get('base_model.hash', '')}`)
- Method: {plan.get('method')} (ZeRO stage {plan.get('zero_stage')}, micro-batch {plan.get('micro_batch_size')} x \
accumulation {plan.get('grad_accum')})
- Git commit: `{tags.get('git.commit')}`, params hash `{tags.get('params.hash')}`

## Data ({tags.get('data.scenario')}, format {tags.get('data.format')}, policy {tags.get('data.policy')})
| split | path | md5 | rows accepted |
|---|---|---|---|
{data}

Validation passed: {tags.get('validation.success')}

## Evaluation (held-out split)
| model | {metric} |
|---|---|
| base | {metrics.get(f'base_{metric}', float('nan')):.4f} |
| fine-tuned | {metrics.get(f'finetuned_{metric}', float('nan')):.4f} |
{_graders_section(tags, metrics)}
## Promotion gate
{_gate_section(tags)}

## ONNX variants
| variant | accepted | gate | perplexity | size |
|---|---|---|---|---|
{rows}

Default variant: {optimize.get('default_variant')}

## Provenance
- MLflow run: `{tags.get('mlflow.run_id', '')}`; Prefect flow run: `{tags.get('prefect.flow_run_id', 'n/a')}`

## Intended use and limits
Fine-tuned for the `{tags.get('data.scenario')}` scenario; evaluated only by held-out {metric}{' and the graders above' if _graders_section(tags, metrics) else ''}. Not evaluated for
safety, bias or factuality. Promotion to `champion` happens only through the evaluation gate.
"""
