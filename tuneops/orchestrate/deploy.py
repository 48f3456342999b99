"""`tuneops deploy` and `tuneops worker`: the deployments on a Prefect server.

- ``<orchestrate.deployment>``: the fine-tuning flow (``flows/pipeline.py:finetune``) on the
  process work pool ``orchestrate.work_pool``, with the cron schedule ``schedule_cron``, a
  concurrency limit (``concurrency_limit``; further runs wait in line) and an event trigger:
  ``orchestrate.event`` for this project's dataset starts one run per dataset md5 (the
  trigger buckets on the event's ``tuneops.data.md5`` label for ``dedupe_window_s``).
- ``<orchestrate.deployment>-data-watch``: the watcher flow (``flows/watch.py:watch``) on the
  cron ``watch_cron``.

Both run the code of this checkout (``from_source`` on the local folder) with the
project's params file, so a worker on this machine picks them up.
"""
from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from tuneops import stages
from tuneops.config import Config
from tuneops.orchestrate import watch


def watch_deployment_name(cfg: Config) -> str:
    return f"{cfg.orchestrate.deployment}-data-watch"


def ensure_work_pool(name: str) -> str:
    """Create the process work pool ``name`` if the server does not have it yet; its type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            pool = client.create_work_pool(WorkPoolCreate(name=name, type="process"))
    return pool.type


def data_trigger(cfg: Config, params_file: str, overrides: list[str]) -> Any:
    from prefect.events import DeploymentEventTrigger

    o = cfg.orchestrate
    return DeploymentEventTrigger(
        name=f"retrain {cfg.register.model_name} on {o.event}",
        expect={o.event},
        match={"prefect.resource.id": watch.resource_id(cfg)},
        for_each={"tuneops.data.md5"},           # one bucket per dataset fingerprint ...
        posture="Reactive", threshold=1,
        within=timedelta(seconds=o.dedupe_window_s),  # ... that fires once in this window
        parameters={"params_file": params_file, "overrides": overrides, "data_md5": "{{ event.payload.md5 }}"},
    )


APP = "/app"     # the project folder in the tuneops image (Dockerfile WORKDIR)


def _image_deploy(cfg: Config, image: str, parameters: dict[str, Any], triggers: list[Any]) -> tuple[str, str, str]:
    """Both deployments on a Docker or Kubernetes work pool, running the code baked into
    ``image`` at /app (no source pull); ``platforms.job_variables`` (resources, GPUs, volumes,
    TUNEOPS_DVC_PULL for the data) go to every flow run. Returns (pool type, finetune id, watch id)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments.runner import RunnerDeployment
    from prefect.deployments.runner import deploy as deploy_all
    from prefect.exceptions import ObjectNotFound
    from prefect.schedules import Cron

    from tuneops.errors import TuneopsError

    o = cfg.orchestrate
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(o.work_pool)
        except ObjectNotFound:
            # a new pool: Docker, with Prefect's own default job template (a Kubernetes pool is made
            # first with `prefect work-pool create NAME --type kubernetes`, then named here)
            from prefect.client.schemas.actions import WorkPoolCreate
            from prefect.utilities.asyncutils import run_coro_as_sync
            from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

            template = run_coro_as_sync(get_default_base_job_template_for_infrastructure_type("docker"))
            if not template:
                raise TuneopsError(f"deploy --image: work pool {o.work_pool!r} does not exist; create it with `prefect "
                                   f"work-pool create {o.work_pool} --type docker` (or kubernetes) and pass "
                                   "--set orchestrate.work_pool=NAME") from None
            pool = client.create_work_pool(WorkPoolCreate(name=o.work_pool, type="docker",
                                                          base_job_template=template))
    if "image" not in pool.base_job_template.get("variables", {}).get("properties", {}):
        raise TuneopsError(f"deploy --image: work pool {o.work_pool!r} is a {pool.type} pool, which runs no images; "
                           "use a docker or kubernetes pool (--set orchestrate.work_pool=NAME)")
    jobvars = dict(cfg.platforms.job_variables)
    common = {"concurrency_limit": None, "parameters": parameters, "tags": ["tuneops", cfg.register.model_name],
              "job_variables": jobvars}
    out = []
    for entry, name, cron, limit, trig in ((stages.entry_file("finetune"), o.deployment, o.schedule_cron,
                                            o.concurrency_limit, triggers),
                                           (stages.entry_file("watch"), watch_deployment_name(cfg), o.watch_cron, 1, [])):
        d = RunnerDeployment.from_entrypoint(
            entrypoint=str(stages.source_root() / entry), name=name, **{**common, "concurrency_limit": limit},
            schedules=[Cron(cron, timezone=o.timezone)] if cron else [], triggers=trig)
        d.entrypoint, d._path = entry, APP          # where the code is in the image
        out.append(d)
    ids = deploy_all(*out, work_pool_name=o.work_pool, image=image, build=False, push=False,
                     print_next_steps_message=False)
    return pool.type, str(ids[0]), str(ids[1])


def deploy(cfg: Config, params_file: str | Path, overrides: list[str] | tuple[str, ...] = (),
           image: str | None = None) -> dict[str, Any]:
    """Create or update both deployments; returns their ids and settings. With ``image``: on
    the Docker / Kubernetes pool ``orchestrate.work_pool``, from the tuneops image."""
    from prefect import flow
    from prefect.schedules import Cron

    o = cfg.orchestrate
    params_file, overrides = str(Path(params_file).resolve()), list(overrides)
    if image:
        params_file = f"{APP}/{Path(params_file).relative_to(cfg.root)}" if Path(params_file).is_relative_to(
            cfg.root) else f"{APP}/params.yaml"
        parameters = {"params_file": params_file, "overrides": overrides}
        pool_type, finetune_id, watch_id = _image_deploy(cfg, image, parameters,
                                                         [data_trigger(cfg, params_file, overrides)])
        return {"work_pool": {"name": o.work_pool, "type": pool_type}, "image": image,
                "job_variables": dict(cfg.platforms.job_variables), "params_file": params_file,
                "deployments": {f"tuneops-finetune/{o.deployment}": {"id": finetune_id, "cron": o.schedule_cron},
                                f"tuneops-data-watch/{watch_deployment_name(cfg)}": {"id": watch_id,
                                                                                     "cron": o.watch_cron}}}
    pool_type = ensure_work_pool(o.work_pool)
    parameters = {"params_file": params_file, "overrides": overrides}
    finetune = flow.from_source(source=str(stages.source_root()), entrypoint=stages.entry_file("finetune"))
    finetune_id = finetune.deploy(
        name=o.deployment, work_pool_name=o.work_pool, build=False, push=False,
        schedules=[Cron(o.schedule_cron, timezone=o.timezone)] if o.schedule_cron else [],
        concurrency_limit=o.concurrency_limit, triggers=[data_trigger(cfg, params_file, overrides)],
        parameters=parameters, tags=["tuneops", cfg.register.model_name], print_next_steps=False,
    )
    watcher = flow.from_source(source=str(stages.source_root()), entrypoint=stages.entry_file("watch"))
    watch_id = watcher.deploy(
        name=watch_deployment_name(cfg), work_pool_name=o.work_pool, build=False, push=False,
        schedules=[Cron(o.watch_cron, timezone=o.timezone)] if o.watch_cron else [],
        concurrency_limit=1, parameters=parameters, tags=["tuneops", cfg.register.model_name],
        print_next_steps=False,
    )
    return {
        "work_pool": {"name": o.work_pool, "type": pool_type},
        "deployments": {
            f"tuneops-finetune/{o.deployment}": {"id": str(finetune_id), "cron": o.schedule_cron,
                                                 "timezone": o.timezone, "concurrency_limit": o.concurrency_limit,
                                                 "trigger": {"event": o.event, "resource": watch.resource_id(cfg),
                                                             "dedupe": "tuneops.data.md5",
                                                             "window_s": o.dedupe_window_s}},
            f"tuneops-data-watch/{watch_deployment_name(cfg)}": {"id": str(watch_id), "cron": o.watch_cron},
        },
        "params_file": params_file,
    }


def worker_command(pool: str) -> list[str]:
    """A process worker for the work pool ``pool`` (orchestrate.work_pool, or service.work_pool)."""
    from tuneops.orchestrate.server import _bin

    return [_bin("prefect"), "worker", "start", "--pool", pool, "--type", "process"]


def start_worker(cfg: Config, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process worker for the pool, in the background (its own process group)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(worker_command(cfg.orchestrate.work_pool), stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(cfg.root), start_new_session=True)
