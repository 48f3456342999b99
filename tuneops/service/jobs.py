"""Fine-tuning jobs on the managed compute: each job is one run of the service's Prefect
deployment of the tuneops flow (``flows/pipeline.py:finetune``) on ``service.work_pool``,
with its own working directory (``<storage_dir>/jobs/<id>``: params.yaml, data, artifacts,
checkpoints). The job's status, events, checkpoints and fine-tuned model are read back
from Prefect (flow and task run states) and MLflow (step metrics, the registered model).

A running job whose flow run stops sending heartbeats (its worker or machine died) is set
to Crashed by a Prefect automation (``ensure_deployment``), which the API reports as
failed with the reason.
"""
from __future__ import annotations

import hashlib
import logging
import math
import shutil
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

from tuneops.registry import tracking
from tuneops.config import Config, apply_overrides, load_config
from tuneops.io import md5_file
from tuneops.service.db import TERMINAL, Store, new_id, now
from tuneops.stages import STAGE_NAMES as STAGES

REPO = Path(__file__).resolve().parents[2]
# The stage whose failure is the user's data, and the job parameter to blame.
DATA_STAGES = {"ingest": "training_file", "validate": "training_file"}
_sync_lock = threading.Lock()
log = logging.getLogger("tuneops.service")


class JobError(ValueError):
    """A job request the service refuses (400); ``param`` names the request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


# -- the deployment and the dead-worker automation ----------------------------------------------

def automation_name(cfg: Config) -> str:
    return f"{cfg.service.deployment}: fail jobs without heartbeats"


def dead_message(cfg: Config) -> str:
    return (f"no heartbeat from the job for {cfg.service.dead_after_s} s (service.dead_after_s): its worker or "
            f"machine died")


def ensure_deployment(cfg: Config) -> UUID:
    """The work pool, the jobs' deployment (heartbeats on) and the automation that marks a
    silent running job Crashed; idempotent (safe on every API start)."""
    from prefect import flow
    from prefect.automations import Automation
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    from tuneops.orchestrate.deploy import ensure_work_pool

    s = cfg.service
    ensure_work_pool(s.work_pool)
    from tuneops.stages import entry_file, source_root

    deployment_id = flow.from_source(source=str(source_root()), entrypoint=entry_file("finetune")).deploy(
        name=s.deployment, work_pool_name=s.work_pool, build=False, push=False, concurrency_limit=s.concurrency_limit,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(s.heartbeat_s)}},
        tags=["tuneops-service"], print_next_steps=False)
    name = automation_name(cfg)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(name)
    if not existing:
        Automation(
            name=name,
            description="tuneops jobs API: a running job silent for service.dead_after_s is Crashed",
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.id": f"prefect.deployment.{deployment_id}"},
                for_each={"prefect.resource.id"},
                posture=Posture.Proactive, threshold=1, within=timedelta(seconds=s.dead_after_s)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED, message=dead_message(cfg), force=True)],
        ).create()
    return deployment_id


# -- job creation ---------------------------------------------------------------------------------

def resolve_hyperparameters(cfg: Config, hp: dict[str, Any], train_rows: int,
                            where: str = "hyperparameters") -> tuple[dict[str, Any], list[str], int]:
    """OpenAI hyperparameters -> (resolved values, params overrides, training steps). ``auto`` = params.
    ``where``: the field they came from (``method.dpo.hyperparameters`` also takes ``beta``)."""
    allowed = {"n_epochs", "batch_size", "learning_rate_multiplier", *(("beta",) if where != "hyperparameters" else ())}
    unknown = sorted(set(hp) - allowed)
    if unknown:
        raise JobError(f"unknown hyperparameter(s) {unknown}; supported: {sorted(allowed)}", where)

    def value(key: str, kind: type, low: float, high: float) -> Any:
        v = hp.get(key, "auto")
        if v is None or v == "auto":
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and int(v) != v) \
                or not low <= v <= high:
            raise JobError(f"{where}.{key}: expected 'auto' or a {kind.__name__} in [{low:g}, {high:g}] "
                           f"(got {v!r})", f"{where}.{key}")
        return kind(v)

    batch = value("batch_size", int, 1, 256)
    epochs = value("n_epochs", int, 1, 50)
    mult = value("learning_rate_multiplier", float, 1e-3, 10.0)
    batch = batch or cfg.select.global_batch_size
    overrides = [f"select.global_batch_size={batch}",
                 f"select.max_micro_batch_size={min(batch, cfg.select.max_micro_batch_size)}"]
    if epochs:
        steps = max(1, math.ceil(epochs * train_rows / batch))
        if steps > cfg.service.max_steps:
            raise JobError(f"{where}.n_epochs: {epochs} epochs of {train_rows} records at batch size {batch} "
                           f"is {steps} steps, over this service's limit of {cfg.service.max_steps} "
                           f"(service.max_steps)", f"{where}.n_epochs")
    else:
        steps = cfg.train.max_steps
    overrides.append(f"train.max_steps={steps}")
    if mult:
        overrides.append(f"train.learning_rate={cfg.train.learning_rate * mult!r}")
    resolved = {"n_epochs": max(1, round(steps * batch / max(train_rows, 1))), "batch_size": batch,
                "learning_rate_multiplier": mult or 1.0}
    if "beta" in allowed:             # DPO: OpenAI's beta is train.beta
        beta = value("beta", float, 1e-6, 100.0)
        resolved["beta"] = beta or cfg.train.beta
        overrides.append(f"train.beta={resolved['beta']!r}")
    return resolved, overrides, steps


def job_dir(cfg: Config, job_id: str) -> Path:
    return storage(cfg) / "jobs" / job_id


def job_config(cfg: Config, job: dict[str, Any]) -> Config:
    return load_config(job_dir(cfg, job["id"]) / "params.yaml")


def storage(cfg: Config) -> Path:
    return (cfg.root / cfg.service.storage_dir).resolve()


def file_path(cfg: Config, file_id: str) -> Path:
    return storage(cfg) / "files" / file_id


def prepare_workdir(cfg: Config, job: dict[str, Any], train_file: dict[str, Any], eval_file: dict[str, Any] | None,
                    overrides: list[str], data_format: str = "chat", base: str | None = None) -> Path:
    """The job's working directory: its own params.yaml (the service's params + the job's
    settings, secrets redacted; relative paths land in this folder) and a copy of its data.
    Built in a private folder and moved into place only when its params validate: a refused
    job leaves no folder."""
    from tuneops.io import private_tmp
    from tuneops.secrets import redact

    d = job_dir(cfg, job["id"])
    work = private_tmp(d)
    try:
        (work / "data").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file_path(cfg, train_file["id"]), work / "data" / "train.jsonl")
        user: dict[str, Any] = {"path": "data/train.jsonl", "md5": train_file["md5"], "eval_path": None,
                                "eval_md5": None}
        if eval_file:
            shutil.copyfile(file_path(cfg, eval_file["id"]), work / "data" / "validation.jsonl")
            user.update(eval_path="data/validation.jsonl", eval_md5=eval_file["md5"])
        # every job's LoRA adapter also goes unmerged over the service's shared base (served over one base)
        shared = [f"optimize.lora_adapter_base={cfg.service.adapter_base}"]
        raw = apply_overrides(cfg.raw, shared + list(cfg.service.job_overrides) + overrides + [
            f"model.source={base or job['model']}", f"train.seed={job['seed']}", "orchestrate.cache=false",
            "train.keep_checkpoints=true", "data.scenario=user", f"data.format={data_format}"])
        raw["data"]["user"] = user
        raw["paths"]["state_dir"] = str(cfg.state_dir)                # shared caches and the MLflow registry
        raw["tracking"].update(tracking_uri=tracking.tracking_uri(cfg), experiment=cfg.service.experiment)
        raw["register"]["model_name"] = job["fine_tuned_model"]
        raw["register"]["tags"] = {**raw["register"].get("tags", {}), "tuneops.job.id": job["id"],
                                   "tuneops.job.owner": job["owner"], "tuneops.job.training_file": train_file["id"],
                                   **({"tuneops.job.validation_file": eval_file["id"]} if eval_file else {})}
        # a job runs the pipeline only: it needs no server database URLs, and its folder is the
        # user's to read (checkpoints, results), so no secret is copied into it
        raw["service"]["database_url"] = None
        raw["orchestrate"]["prefect_database_url"] = None
        (work / "params.yaml").write_text(yaml.safe_dump(redact(raw), sort_keys=False))
        load_config(work / "params.yaml", root=d)   # the job's params must validate before compute is spent
        work.rename(d)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        _dvc_project(cfg, d)
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d


def _dvc_project(cfg: Config, d: Path) -> None:
    """The job's own DVC record: its folder is a DVC project of the pipeline (dvc.yaml, the stage
    code it runs, the service project's default remote), so its flow run commits each stage to
    the job's dvc.lock and `dvc status` / `dvc repro` work in it."""
    from tuneops import dvc_record
    from tuneops.registry import remote

    if not dvc_record.is_project(d):
        dvc_record.init_project(d, remote=remote.default_remote(cfg.root) or str(cfg.state_dir / "dvc-remote"))


def remove_workdir(cfg: Config, job_id: str) -> None:
    shutil.rmtree(job_dir(cfg, job_id), ignore_errors=True)


def public_message(cfg: Config, exc: BaseException) -> str:
    """An error's message as a user of the API may see it: no server paths."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for root in sorted({str(storage(cfg)), str(cfg.root), str(cfg.state_dir), str(REPO)}, key=len, reverse=True):
        text = text.replace(root, "<server>")
    return text[:500]


def submit(cfg: Config, store: Store, job: dict[str, Any]) -> str | None:
    """Create the job's flow run (idempotent on the job id); None when Prefect is unreachable
    (the sync loop tries again)."""
    from prefect.client.orchestration import get_client

    d = job_dir(cfg, job["id"])
    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(f"tuneops-finetune/{cfg.service.deployment}")
            run = client.create_flow_run_from_deployment(
                dep.id, parameters={"params_file": str(d / "params.yaml"), "overrides": []},
                name=job["id"], tags=["tuneops-service", f"owner:{job['owner']}"], idempotency_key=job["id"],
                job_variables={"working_dir": str(d)})
    except Exception as exc:  # noqa: BLE001 - Prefect down: the job stays queued and is submitted later
        store.add_event(job["id"], "submit-error", f"Could not reach the job scheduler yet ({type(exc).__name__}); "
                        f"the job stays queued and is submitted when it is back", level="warn")
        return None
    store.update_job(job["id"], flow_run_id=str(run.id), status="queued")
    store.add_event(job["id"], "queued", f"Job queued on work pool {cfg.service.work_pool} (Prefect flow run "
                    f"{run.name}, {run.id})")
    return str(run.id)


# -- state: Prefect + MLflow -> the job record and its events -------------------------------------

def _ts(dt: Any) -> int | None:
    return int(dt.timestamp()) if dt is not None else None


def _training_run(cfg: Config, flow_run_id: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(tracking.tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.service.experiment)
    if exp is None:
        return None, client
    runs = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=1)
    return (runs[0] if runs else None), client


# a pair objective's (DPO) step metrics as TRL logs them -> their names in events and the results file
PAIR_STEP_METRICS = (("rewards/chosen", "rewards_chosen"), ("rewards/rejected", "rewards_rejected"),
                     ("rewards/margins", "rewards_margins"), ("rewards/accuracies", "rewards_accuracies"))


def step_history(cfg: Config, flow_run_id: str | None) -> list[dict[str, Any]]:
    """The training steps logged to MLflow: step, timestamp, train_loss, learning_rate (and a pair
    objective's rewards, margins and accuracies)."""
    if not flow_run_id:
        return []
    run, client = _training_run(cfg, flow_run_id)
    if run is None:
        return []
    rows: dict[int, dict[str, Any]] = {}
    for key, name in (("loss", "train_loss"), ("learning_rate", "learning_rate"), *PAIR_STEP_METRICS):
        for m in client.get_metric_history(run.info.run_id, key):
            rows.setdefault(m.step, {"step": m.step, "timestamp": m.timestamp // 1000})[name] = m.value
    return [rows[k] for k in sorted(rows) if "train_loss" in rows[k]]


def _silent(cfg: Config, client: Any, fr: Any) -> bool:
    """A running flow run with no heartbeat in the last ``service.dead_after_s`` (and running
    longer than that). The automation covers runs that sent at least one heartbeat; this also
    covers a process that died before its first one, while the API is up."""
    from datetime import datetime, timezone

    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventResourceFilter

    window = timedelta(seconds=cfg.service.dead_after_s)
    start = fr.start_time or fr.state.timestamp
    now_ = datetime.now(timezone.utc)
    if start is None or now_ - start < window:
        return False
    page = client.read_events(EventFilter(
        event=EventNameFilter(name=["prefect.flow-run.heartbeat"]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{fr.id}"]),
        occurred=EventOccurredFilter(since=now_ - window, until=now_)), limit=1)
    return not page.events


def _failure(flow_run: Any, task_runs: list[Any]) -> dict[str, Any]:
    """The job's ``error``: which stage failed and why (the data stages blame training_file)."""
    failed = [t for t in task_runs if t.name in STAGES and t.state and t.state.type.value in ("FAILED", "CRASHED")]
    state = flow_run.state
    if state.type.value == "CRASHED":
        return {"code": "worker_died" if "heartbeat" in (state.message or "") else "crashed",
                "message": state.message or "the job's process crashed", "param": None}
    if failed:
        t = failed[-1]
        stage = t.name
        detail = _state_detail(t.state)
        return {"code": "invalid_training_file" if stage in DATA_STAGES else f"{stage}_failed",
                "message": f"stage {stage} failed: {detail}", "param": DATA_STAGES.get(stage)}
    return {"code": "job_failed", "message": state.message or "the job failed", "param": None}


def _state_detail(state: Any) -> str:
    """The exception message of a failed state, else the state message."""
    try:
        exc = state.result(raise_on_failure=False)
        if isinstance(exc, BaseException):
            return f"{type(exc).__name__}: {exc}"[:4000]
    except Exception:  # noqa: BLE001 - the result may not be retrievable (not persisted)
        pass
    return (state.message or state.name)[:4000]


def sync(cfg: Config, store: Store, job_id: str) -> dict[str, Any] | None:
    """Bring one job's record and events up to date; returns the job."""
    with _sync_lock:
        job = store.job(job_id)
        if job is None or job["status"] in TERMINAL:
            return job
        if not job["flow_run_id"]:
            submit(cfg, store, job)
            return store.job(job_id)
        try:
            _sync(cfg, store, job)
        except Exception as exc:  # noqa: BLE001 - Prefect / MLflow unreachable: keep the last known state
            store.add_event(job_id, f"sync-error-{now() // 600}", f"Job state not readable right now "
                            f"({type(exc).__name__}); last known status kept", level="warn")
        return store.job(job_id)


def _sync(cfg: Config, store: Store, job: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    jid = job["id"]
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(UUID(job["flow_run_id"]))
        if fr.state.type.value == "RUNNING" and _silent(cfg, client, fr):
            from prefect.states import Crashed

            client.set_flow_run_state(fr.id, Crashed(message=dead_message(cfg)), force=True)
            fr = client.read_flow_run(fr.id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
    tasks = sorted(tasks, key=lambda t: (t.start_time or t.expected_start_time or t.created))
    kind = fr.state.type.value
    if fr.start_time is not None:
        store.add_event(jid, "started", "Fine-tuning job started", _ts(fr.start_time))
        store.update_job(jid, started_at=_ts(fr.start_time))
    for t in tasks:
        if t.name not in STAGES:
            continue
        if t.start_time is not None:
            store.add_event(jid, f"stage-{t.name}-start", f"Stage {t.name} started", _ts(t.start_time),
                            data={"stage": t.name})
        if t.state and t.state.is_completed():
            took = f" in {t.total_run_time.total_seconds():.1f} s" if t.total_run_time else ""
            store.add_event(jid, f"stage-{t.name}-done", f"Stage {t.name} completed{took}",
                            _ts(t.end_time) or now(), data={"stage": t.name})
        elif t.state and t.state.type.value in ("FAILED", "CRASHED"):
            store.add_event(jid, f"stage-{t.name}-failed", f"Stage {t.name} failed: {_state_detail(t.state)}",
                            _ts(t.end_time) or now(), level="error", data={"stage": t.name})
    total = job["total_steps"]
    history = step_history(cfg, job["flow_run_id"])
    if len(history) >= 2 and history[-1]["step"] < total:     # the remaining steps at the rate so far
        (a, b) = history[0], history[-1]
        rate = (b["timestamp"] - a["timestamp"]) / max(b["step"] - a["step"], 1)
        store.update_job(jid, estimated_finish=int(b["timestamp"] + rate * (total - b["step"])))
    for h in history:
        pairs = {n: h[n] for _, n in PAIR_STEP_METRICS if n in h}
        store.add_event(jid, f"step-{h['step']}", f"Step {h['step']}/{total}: training loss={h['train_loss']:.4f}"
                        + (f", reward margin={pairs['rewards_margins']:.4f}, reward accuracy="
                           f"{pairs['rewards_accuracies']:.2f}" if len(pairs) == len(PAIR_STEP_METRICS) else ""),
                        h["timestamp"], type="metrics",
                        data={"step": h["step"], "train_loss": h["train_loss"], "total_steps": total,
                              **({"learning_rate": h["learning_rate"]} if "learning_rate" in h else {}), **pairs})
    if kind in ("SCHEDULED", "PENDING", "PAUSED"):
        store.update_job(jid, status="queued")
    elif kind in ("RUNNING", "CANCELLING"):
        store.update_job(jid, status="running")
    elif kind == "COMPLETED":
        from mlflow.exceptions import MlflowException

        try:
            _succeeded(cfg, store, job, history, _ts(fr.end_time) or now())
        except (OSError, ValueError, KeyError, MlflowException) as exc:   # finished, but no registered model
            _fail(store, jid, {"code": "no_model", "param": None, "message": f"the pipeline finished without a "
                               f"registered model ({type(exc).__name__}: {exc})"}, _ts(fr.end_time) or now())
    elif kind in ("FAILED", "CRASHED"):
        _fail(store, jid, _failure(fr, tasks), _ts(fr.end_time) or now())
    elif kind == "CANCELLED":
        store.add_event(jid, "cancelled", "Fine-tuning job cancelled", _ts(fr.end_time) or now())
        store.update_job(jid, status="cancelled", finished_at=_ts(fr.end_time) or now())


def _fail(store: Store, job_id: str, error: dict[str, Any], finished: int) -> None:
    store.add_event(job_id, "failed", f"Fine-tuning job failed: {error['message']}", finished, level="error")
    store.update_job(job_id, status="failed", error=error, finished_at=finished)


def _succeeded(cfg: Config, store: Store, job: dict[str, Any], history: list[dict[str, Any]],
               finished: int) -> None:
    """A completed flow run: the job succeeds once its model is found in the MLflow registry."""
    import json

    from mlflow import MlflowClient

    jc = job_config(cfg, job)
    record = json.loads((jc.path("register_dir") / "registration.json").read_text())
    client = MlflowClient(tracking.tracking_uri(cfg), registry_uri=tracking.tracking_uri(cfg))
    version = client.get_model_version(job["fine_tuned_model"], str(record["version"]))
    train = json.loads((jc.path("train_dir") / "metrics.json").read_text())
    ev = json.loads((jc.path("evaluate_dir") / "metrics.json").read_text())
    metric = ev.get("primary_metric", "perplexity")
    extra = {} if metric == "perplexity" else {f"base_{metric}": ev[f"base_{metric}"], metric: ev[f"finetuned_{metric}"],
                                               "margin": ev.get("finetuned_margin")}
    store.add_event(job["id"], "evaluated",
                    f"Evaluation: perplexity {ev['base_perplexity']:.3f} (base model) -> "
                    f"{ev['finetuned_perplexity']:.3f} (fine-tuned)"
                    + (f"; {metric} {ev[f'base_{metric}']:.3f} -> {ev[f'finetuned_{metric}']:.3f}" if extra else ""),
                    finished, data={"base_perplexity": ev["base_perplexity"], "perplexity": ev["finetuned_perplexity"],
                                    **extra})
    store.add_event(job["id"], "model", f"New fine-tuned model created: {job['fine_tuned_model']} (MLflow version "
                    f"{version.version}, alias {record['alias']}: {record['reason']})", finished,
                    data={"model": job["fine_tuned_model"], "version": version.version, "alias": record["alias"]})
    result = _results_file(cfg, store, job, history)
    store.add_event(job["id"], "succeeded", "The job has successfully completed", finished)
    store.update_job(job["id"], status="succeeded", finished_at=finished, model_version=str(version.version),
                     estimated_finish=None, trained_tokens=int(train.get("tokens") or 0), result_files=[result])


def _results_file(cfg: Config, store: Store, job: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """step,train_loss,learning_rate (and a pair objective's rewards_chosen, rewards_rejected,
    rewards_margins, rewards_accuracies) as a CSV file of the job's owner (purpose fine-tune-results)."""
    extra = [n for _, n in PAIR_STEP_METRICS if any(n in r for r in rows)]
    text = ",".join(["step", "train_loss", "learning_rate", *extra]) + "\n" + "".join(
        ",".join([str(r["step"]), f"{r['train_loss']:.6f}", str(r.get("learning_rate", "")),
                  *(f"{r[n]:.6f}" if n in r else "" for n in extra)]) + "\n" for r in rows)
    fid = new_id("file")
    path = file_path(cfg, fid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    store.add_file(id=fid, owner=job["owner"], filename=f"{job['id']}-results.csv", purpose="fine-tune-results",
                   bytes=path.stat().st_size, created_at=now(), status="processed", status_details=None,
                   md5=md5_file(path), records=len(rows), deleted=False)
    return fid


def cancel(cfg: Config, store: Store, job: dict[str, Any]) -> dict[str, Any]:
    """Cancel a queued or running job (Prefect: Cancelled if not started, else Cancelling, which
    makes the worker stop the process)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    if job["flow_run_id"]:
        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(UUID(job["flow_run_id"]))
            if not fr.state.is_final():
                started = fr.state.type.value in ("RUNNING", "CANCELLING")
                client.set_flow_run_state(fr.id, Cancelling(message="cancelled through the jobs API") if started
                                          else Cancelled(message="cancelled through the jobs API"), force=True)
    store.update_job(job["id"], status="cancelled", finished_at=now())
    store.add_event(job["id"], "cancelled", "Fine-tuning job cancelled")
    return store.job(job["id"])  # type: ignore[return-value]


def checkpoints(cfg: Config, job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's complete training checkpoints (newest first), with the loss at their step."""
    from tuneops.training.checkpoints import MARKER, is_complete, step_of

    root = job_config(cfg, job).path("checkpoint_dir")
    found = [p for p in root.glob("*/checkpoint-*") if p.is_dir() and is_complete(p)] if root.is_dir() else []
    loss = {h["step"]: h["train_loss"] for h in step_history(cfg, job["flow_run_id"])}
    name = job["fine_tuned_model"] or job["id"]
    out = []
    for p in sorted(found, key=step_of, reverse=True):
        step = step_of(p)
        out.append({"object": "fine_tuning.job.checkpoint",
                    "id": "ftckpt-" + hashlib.sha256(f"{job['id']}/{step}".encode()).hexdigest()[:24],
                    "created_at": int((p / MARKER).stat().st_mtime), "fine_tuning_job_id": job["id"],
                    "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{step}", "step_number": step,
                    "metrics": {"step": float(step), **({"train_loss": loss[step]} if step in loss else {})}})
    return out


class Syncer:
    """The API's background loop: every ``service.sync_interval_s`` brings every unfinished
    job up to date (so events are recorded while nobody polls)."""

    def __init__(self, cfg: Config, store: Store):
        self.cfg, self.store = cfg, store
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tuneops-job-sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.cfg.service.sync_interval_s):
            for job in self.store.active_jobs():
                if self._stop.is_set():
                    return
                try:
                    sync(self.cfg, self.store, job["id"])
                except Exception:  # noqa: BLE001 - one bad job must not stop the loop
                    log.exception("syncing job %s failed", job["id"])
