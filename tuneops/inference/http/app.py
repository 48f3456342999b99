"""``tuneops serve [MODEL]``: one model behind an OpenAI-compatible HTTP server.

MODEL (default ``serve.model``, else ``models:/<register.model_name>@champion``) is a registered
version or alias (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) or an exported folder (an
optimize output, a variant folder with ``model.onnx``, a registered model folder with ``MLmodel``).
A chat model runs its default ONNX Runtime variant with its own chat template and stop tokens;
a classification / NER model answers ``POST /v1/classify``. Endpoints: ``tuneops.inference.http.routes``
plus ``GET /v1/models``, ``GET /v1/models/{id}`` and ``GET /health``.

Auth (``serve.auth: true``): the jobs API's bearer tokens (``tuneops api token create NAME``;
``tuneops.inference.http.auth``).

``GET /health`` answers 200 with the queue's counters while a request could be served, and 503
(OpenAI's error shape) while the server shuts down or when every generation slot has been busy
for over ``serve.stall_s`` with no token produced. SIGINT / SIGTERM stop the server within
``serve.shutdown_s`` (``tuneops.inference.http.server.run_server``).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from ...config import Config
from ..pool import ModelPool, batching
from ..resolve import ServeError, resolve
from ..scheduler import Scheduler
from .auth import bearer
from .errors import install_error_handlers, model_not_found
from .routes import add_routes
from .server import not_ready, run_server


def default_model(cfg: Config) -> str:
    return cfg.serve.model or f"models:/{cfg.register.model_name}@champion"


def create_app(cfg: Config, model: str | None = None) -> FastAPI:
    """The app for one model, loaded now (a bad reference fails before the server listens)."""
    import time

    from ...registry import tracking

    ref = model or default_model(cfg)
    pool = ModelPool(1, cfg.serve.threads, batching(cfg.serve))
    try:
        files = resolve(ref, tracking.tracking_uri(cfg), fallback_tokenizer=cfg.path("base_model_dir"))
        loaded = pool.get(ref, files)
    except ServeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt model file is the user's to fix: one line, no traceback
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ServeError(f"{ref}: the model cannot be loaded: {type(exc).__name__}: {first}") from exc
    ids = {files.id, ref}
    created = int(time.time())
    if cfg.serve.auth:
        from ...service.app import database_url
        from ...service.db import Store

        who = bearer(Store(database_url(cfg)).owner_of)
    else:
        def who() -> str:
            return "local"

    app = FastAPI(title="tuneops serve", version="1")
    app.state.model, app.state.scheduler = loaded, Scheduler(cfg.serve.max_concurrent, cfg.serve.max_queue)

    install_error_handlers(app)

    def get_model(owner: str, model_id: str) -> Any:
        if model_id not in ids:
            raise model_not_found(model_id)
        return loaded

    def model_obj() -> dict[str, Any]:
        # the registered name and version, or the exported folder's name: never a server path
        return {"id": files.id, "object": "model", "created": created, "owned_by": "tuneops", "kind": files.kind,
                "version": files.version}

    @app.get("/health")
    async def health() -> Any:
        from fastapi.responses import JSONResponse

        error = not_ready(app.state.scheduler, cfg.serve)
        if error is not None:
            return JSONResponse(error.body, 503)
        return {"status": "ok", "model": files.id, "kind": files.kind, **app.state.scheduler.state()}

    router = APIRouter()

    @router.get("/v1/models")
    def list_models(_: str = Depends(who)) -> dict[str, Any]:
        return {"object": "list", "data": [model_obj()]}

    @router.get("/v1/models/{model_id:path}")
    def get_model_obj(model_id: str, _: str = Depends(who)) -> dict[str, Any]:
        if model_id not in ids:
            raise model_not_found(model_id)
        return model_obj()

    add_routes(router, get_model, app.state.scheduler, cfg.serve, who)
    app.include_router(router)
    return app


def serve(cfg: Config, model: str | None = None, host: str | None = None, port: int | None = None) -> None:
    app = create_app(cfg, model)
    run_server(app, host or cfg.serve.host, port or cfg.serve.port, [app.state.scheduler], cfg.serve)
