"""The jobs API's model endpoints: ``POST /v1/chat/completions`` (and ``/v1/classify``) with
``model=<job.fine_tuned_model>``, through the same routes and engine as ``tuneops serve``
(``tuneops.inference.http.routes``, ``tuneops.inference.engine``); ``tuneops.service.app`` mounts
this router behind its auth and body gates.

A token reaches only the models of its own succeeded jobs (anything else is 404, like every
other object of this API). Each model is the job's registered MLflow version, loaded on first
use and evicted least-recently-used beyond ``serve.max_loaded_models``; requests share one
bounded queue (``serve.max_concurrent`` + ``serve.max_queue``; full = 429).
"""
from __future__ import annotations

from typing import Any, Callable

from fastapi import APIRouter

from tuneops.registry import tracking
from tuneops.config import Config
from tuneops.inference.http.errors import model_not_found
from tuneops.inference.http.routes import add_routes
from tuneops.inference.pool import ModelPool, batching
from tuneops.inference.resolve import files_of_registered, registered_dir
from tuneops.inference.scheduler import Scheduler
from tuneops.service.db import Store


def router(cfg: Config, store: Store, owner: Callable[..., str]) -> APIRouter:
    pool = ModelPool(cfg.serve.max_loaded_models, cfg.serve.threads, batching(cfg.serve))
    scheduler = Scheduler(cfg.serve.max_concurrent, cfg.serve.max_queue)

    def get_model(who: str, model_id: str) -> Any:
        job = next((j for j in store.list_jobs(who)
                    if j["fine_tuned_model"] == model_id and j["status"] == "succeeded" and j.get("model_version")),
                   None)
        if job is None:
            raise model_not_found(model_id)
        uri = f"models:/{model_id}/{job['model_version']}"

        def files() -> Any:
            folder, _ = registered_dir(uri, tracking.tracking_uri(cfg))
            return files_of_registered(folder, model_id)
        return pool.get(uri, files)

    r = APIRouter()
    add_routes(r, get_model, scheduler, cfg.serve, owner)
    r.pool = pool            # type: ignore[attr-defined]  # for tests and health checks
    r.scheduler = scheduler  # type: ignore[attr-defined]
    return r
