"""Production orchestration against a real Prefect server (started here on a free port,
its SQLite db in the test state dir) with a real process worker:

- the scheduled fine-tuning deployment fires (cron from params) and trains;
- the next scheduled run, with nothing changed, hits the task cache and trains nothing;
- editing the tracked dataset makes the watcher emit `tuneops.data.changed`, and exactly
  one fine-tuning run starts although the watcher fires twice; a further emission of the
  same md5 starts none.

Timings (server start, full scheduled run, cache-hit run) are written to
.tuneops/pytest/artifacts/orchestration-timings.json.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tuneops import stages
from tuneops.io import free_port, read_jsonl

from tests.conftest import REPO, TEST_ROOT, make_project
from tests.conftest import wait_for as _wait

ARTIFACTS = TEST_ROOT / "artifacts"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


class Orchestra:
    """Server + deployments + worker for one project; a Prefect client on that server."""

    def __init__(self, root: Path, cfg, api_url: str, worker, worker_log: Path, deployed: dict, timings: dict):
        self.root, self.cfg, self.api_url = root, cfg, api_url
        self.worker, self.worker_log, self.deployed, self.timings = worker, worker_log, deployed, timings
        self.server_log = cfg.state_dir / "servers" / "prefect.log"

    def settings(self):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def client(self):
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)

    def deployment_id(self, prefix: str) -> str:
        return next(d["id"] for key, d in self.deployed["deployments"].items() if key.startswith(prefix))

    def runs(self, prefix: str = "tuneops-finetune/") -> list:
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        with self.client() as c:
            return c.read_flow_runs(deployment_filter=DeploymentFilter(
                id=DeploymentFilterId(any_=[self.deployment_id(prefix)])))

    def task_states(self, flow_run_id) -> dict[str, str]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.client() as c:
            runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        return {t.name: t.state.name for t in runs}

    def finished(self, runs: list) -> list:
        failed = [r for r in runs if r.state and r.state.type.value in TERMINAL - {"COMPLETED"}]
        assert not failed, f"flow run failed: {failed[0].name} {failed[0].state}\n" + \
            self.worker_log.read_text(errors="replace")[-6000:]
        return [r for r in runs if r.state and r.state.type.value == "COMPLETED"]


def _versions(cfg) -> list:
    from mlflow import MlflowClient

    from tuneops.registry import tracking

    tracking.setup(cfg)
    return MlflowClient().search_model_versions(f"name='{cfg.register.model_name}'")


@pytest.fixture(scope="module")
def orchestra():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tuneops.config import load_config
    from tuneops.orchestrate import deploy, server

    root = make_project("orchestrate", (
        "optimize.targets=[]", "train.max_steps=4", "evaluate.max_samples=8", "evaluate.generations=0",
        "optimize.ppl_samples=4", "optimize.parity_samples=1", "orchestrate.schedule_cron=* * * * *", "orchestrate.watch_cron=null",
        "orchestrate.task_retry_delay_s=1", "orchestrate.startup_timeout_s=180"))
    cfg = load_config(root / "params.yaml")
    port = free_port()
    saved = {k: os.environ.get(k) for k in ("PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS",)}
    os.environ["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"   # schedule promptly in the test
    server.stop(cfg)
    (cfg.state_dir / "prefect-server.db").unlink(missing_ok=True)    # runs of earlier sessions would count
    rec = server.start_prefect(cfg, port)
    timings = {"server_start_s": rec["startup_s"]}
    api = rec["url"]
    env = server.client_env(cfg, api)
    env.update({"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)})
    worker_log = TEST_ROOT / "orchestrate-worker.log"
    worker_log.unlink(missing_ok=True)
    worker = None
    try:
        with temporary_settings(updates={PREFECT_API_URL: api}):
            t0 = time.perf_counter()
            deployed = deploy.deploy(cfg, root / "params.yaml")
            timings["deploy_s"] = round(time.perf_counter() - t0, 2)
            worker = deploy.start_worker(cfg, env, worker_log)
            yield Orchestra(root, cfg, api, worker, worker_log, deployed, timings)
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(5)           # a Prefect worker takes ~30 s to stop gracefully: nothing to keep here
            except Exception:  # noqa: BLE001
                worker.kill()
        server.stop(cfg)
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "orchestration-timings.json").write_text(json.dumps(timings, indent=2) + "\n")
        print(f"orchestration timings: {timings}")


def test_cache_key_follows_inputs_params_and_code():
    """A stage's key changes with its inputs' md5s and its own params, not with other sections."""
    from tuneops.config import load_config
    from tuneops.orchestrate import caching

    root = make_project("cache-key")
    params = root / "params.yaml"
    key = caching.stage_key(load_config(params), "train")
    assert caching.stage_key(load_config(params), "train") == key
    assert caching.stage_key(load_config(params, ["train.max_steps=9"]), "train") != key
    assert caching.stage_key(load_config(params, ["evaluate.batch_size=2"]), "train") == key
    assert caching.stage_key(load_config(params, ["orchestrate.task_retries=0"]), "train") == key
    cfg = load_config(params)
    data = cfg.path("clean_train_data")
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text('{"messages": []}\n')
    changed = caching.stage_key(cfg, "train")
    assert changed != key
    data.write_text('{"messages": [1]}\n')
    assert caching.stage_key(cfg, "train") != changed
    assert caching.task_options(cfg, "train")["refresh_cache"] is True     # never ran: run
    metrics = cfg.path("train_dir") / "metrics.json"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("{}")
    caching.record(cfg, "train")                                            # as after a run
    assert caching.task_options(cfg, "train")["refresh_cache"] is False    # same key, same outputs: cache
    metrics.write_text('{"edited": true}')
    assert caching.task_options(cfg, "train")["refresh_cache"] is True     # outputs changed on disk: run
    caching.record(cfg, "train")
    data.write_text('{"messages": [2]}\n')
    assert caching.task_options(cfg, "train")["refresh_cache"] is True     # new key: run
    for split in ("train_data", "eval_data", "ingest_manifest"):          # a stage without inputs ...
        cfg.path(split).parent.mkdir(parents=True, exist_ok=True)
        cfg.path(split).write_text("{}\n")
    caching.record(cfg, "ingest")
    cfg.path("train_data").write_text('{"edited": 1}\n')
    assert caching.task_options(cfg, "ingest")["refresh_cache"] is False   # ... keeps an edited dataset


def test_server_cli_start_status_stop():
    """`tuneops server start|status|stop` runs a real Prefect server with its db in the state dir."""
    import subprocess
    import urllib.request

    root = make_project("server-cli")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    port = free_port()

    def tuneops(*args):
        return subprocess.run(["tuneops", *args], cwd=root, capture_output=True, text=True, timeout=300, env=env)

    tuneops("server", "stop")
    start = tuneops("server", "start", "--port", str(port))
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        url = f"http://127.0.0.1:{port}/api"
        assert f"prefect: {url}" in start.stdout and f"export PREFECT_API_URL={url}" in start.stdout
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            assert resp.status == 200
        assert (TEST_ROOT / "state" / "prefect-server.db").is_file()
        status = tuneops("server", "status")
        assert status.returncode == 0 and "prefect: running" in status.stdout
        again = tuneops("server", "start", "--port", str(port))
        assert again.returncode == 0 and "already running" in again.stdout
    finally:
        stop = tuneops("server", "stop")
    assert stop.returncode == 0 and "prefect: stopped" in stop.stdout
    status = tuneops("server", "status")
    assert status.returncode == 3
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=3)


def _wall(run) -> float:
    """Seconds from Running to Completed (the flow itself)."""
    return round((run.end_time - run.start_time).total_seconds(), 2)


def _from_submission(o, run) -> float:
    """Seconds from the worker's submission (Pending) to Completed: adds process start and imports."""
    with o.client() as c:
        pending = [s.timestamp for s in c.read_flow_run_states(run.id) if s.type.value == "PENDING"]
    return round((run.end_time - min(pending)).total_seconds(), 2) if pending else float("nan")


def test_scheduled_deployment_fires_and_an_unchanged_rerun_hits_the_cache(orchestra):
    o = orchestra
    logs = [o.worker_log, o.server_log]
    # the cron schedule (every minute here) fires; the second run has nothing new to do
    done = _wait(lambda: (lambda r: r if len(r) >= 2 else None)(o.finished(o.runs())), 600,
                 "two scheduled fine-tuning runs", logs, interval=3)
    with o.client() as c:
        for schedule in c.read_deployment_schedules(o.deployment_id("tuneops-finetune/")):
            c.update_deployment_schedule(o.deployment_id("tuneops-finetune/"), schedule.id, active=False)
    first, second = sorted(done, key=lambda r: r.start_time)[:2]
    assert first.auto_scheduled and second.auto_scheduled
    assert first.parameters["params_file"] == str(o.root / "params.yaml")
    assert set(o.task_states(first.id).values()) == {"Completed"}
    states = o.task_states(second.id)
    assert sorted(states) == sorted(stages.STAGE_NAMES)
    assert set(states.values()) == {"Cached"}, states           # trained nothing
    versions = _versions(o.cfg)
    assert len(versions) == 1 and versions[0].tags["prefect.flow_run_id"] == str(first.id)
    o.timings["full_scheduled_run_s"] = _wall(first)
    o.timings["cache_hit_run_s"] = _wall(second)
    o.timings["full_scheduled_run_from_submission_s"] = _from_submission(o, first)
    o.timings["cache_hit_run_from_submission_s"] = _from_submission(o, second)
    assert _wall(second) < _wall(first)
    # drop what the schedule queued before it was paused (waiting for the concurrency slot), let a
    # running one finish: the next test counts the runs its data change starts
    with o.client() as c:
        for r in o.runs():
            if r.state.type.value == "SCHEDULED":
                c.delete_flow_run(r.id)
    _wait(lambda: all(r.state.type.value in TERMINAL for r in o.runs()), 300, "queued scheduled runs to finish", logs)


@pytest.mark.slow   # ~2 min: a second full retrain (CI time); the trigger and dedupe settings are in the deploy test
def test_data_change_triggers_exactly_one_retrain(orchestra):
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    from flows.watch import watch
    from tuneops.orchestrate import watch as watcher

    o = orchestra
    with o.settings():
        _retrain_once(o, watch, watcher, emit_event, EventsWorker)


def _retrain_once(o, watch, watcher, emit_event, EventsWorker):
    logs = [o.worker_log, o.server_log]
    params = str(o.root / "params.yaml")
    assert watch(params_file=params)["changed"] is False        # nothing changed since the last training
    # edit the tracked dataset: one more (valid) conversation
    train = o.cfg.path("train_data")
    with train.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"messages": [
            {"role": "user", "content": "Which tool schedules the fine-tuning runs?"},
            {"role": "assistant", "content": "A Prefect deployment with a cron schedule and a data trigger."}]})
            + "\n")
    first, second = watch(params_file=params), watch(params_file=params)   # the watcher fires twice
    EventsWorker.drain_all()
    assert first["changed"] and second["changed"] and first["md5"] == second["md5"]
    assert first["event_id"] and second["event_id"] and first["event_id"] != second["event_id"]
    changed = [f for f in first["files"] if f["changed"]]
    assert [f["path"] for f in changed] == ["data/chat/train.jsonl"]
    md5 = first["md5"]

    def triggered():
        return [r for r in o.runs() if r.parameters.get("data_md5") == md5]

    t0 = time.perf_counter()
    run = _wait(lambda: (lambda r: r[0] if r else None)(o.finished(triggered())), 600,
                "the triggered fine-tuning run", logs, interval=3)
    o.timings["event_to_retrained_s"] = round(time.perf_counter() - t0, 2)
    o.timings["triggered_run_s"] = _wall(run)
    states = o.task_states(run.id)
    assert states["train"] == "Completed" and states["register"] == "Completed", states
    assert states["ingest"] == "Cached"                          # the edit is the data, not a re-ingest
    # the same md5 again: no new run
    emit_event(event=o.cfg.orchestrate.event, payload={"dataset": "chat", "md5": md5},
               resource={"prefect.resource.id": watcher.resource_id(o.cfg), "tuneops.data.md5": md5})
    EventsWorker.drain_all()
    time.sleep(25)
    assert len(triggered()) == 1
    newest = max(_versions(o.cfg), key=lambda v: int(v.version))
    assert newest.tags["prefect.flow_run_id"] == str(run.id)
    assert newest.tags["data.train.md5"] == next(f["md5"] for f in changed)
    assert watcher.check(o.cfg)["changed"] is False
    assert len(read_jsonl(train)) == len(read_jsonl(o.cfg.path("clean_train_data")))


def test_retries_are_for_transient_failures_only():
    """A transient error is retried (orchestrate.task_retries); bad data fails at once."""
    from prefect import flow, task

    from tasks.validate import DataValidationError
    from tuneops.orchestrate.caching import is_transient

    calls = {"transient": 0, "data": 0}

    def flaky() -> str:
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise ConnectionResetError("lost the MLflow connection")
        return "ok"

    def bad_data() -> None:
        calls["data"] += 1
        raise DataValidationError([], "artifacts/validate/report.json")

    options = {"retries": 2, "retry_delay_seconds": 0, "retry_condition_fn": is_transient}

    @flow
    def both() -> dict:
        first = task(flaky, **options)()
        second = task(bad_data, **options)(return_state=True)
        return {"first": first, "second_failed": second.is_failed()}

    assert both() == {"first": "ok", "second_failed": True}
    assert calls == {"transient": 3, "data": 1}
