"""``tuneops api``: the OpenAI-compatible fine-tuning jobs API (model as a service).

Endpoints and response shapes follow the OpenAI API, so its official client works
unchanged with ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=TOKEN)``:

- ``POST/GET /v1/files``, ``GET/DELETE /v1/files/{id}``, ``GET /v1/files/{id}/content``;
  uploads are validated on arrival by the data gate (chat JSONL; errors name the line);
- ``POST/GET /v1/fine_tuning/jobs``, ``GET /v1/fine_tuning/jobs/{id}``, ``.../events``,
  ``.../checkpoints``, ``POST .../cancel``;
- ``GET /v1/models``, ``GET /v1/models/{id}``: the allowed base models and the caller's
  fine-tuned ones.

Security: bearer tokens (``tuneops api token create NAME``; only their SHA-256 is stored);
a token sees only its own files, jobs and models (anything else is 404); uploads larger
than ``service.max_upload_mb`` are refused with 413 before they are stored; ids are
chosen by the server and never used from user input as paths.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse

from tuneops.config import Config
from tuneops.inference.http.auth import BearerGate, bearer
from tuneops.inference.http.errors import ApiError, install_error_handlers
from tuneops.inference.http.schema import max_request_bytes
from tuneops.inference.http.server import not_ready, run_server
from tuneops.data.chatterbot import eval_count
from tuneops.service import jobs as J
from tuneops.service.db import Store, default_url, iter_chunks, new_id, now, page
from tuneops.service.requests import MAX_JSON_BYTES, BadRequest, JobCreate, job_request, parse_json_object
_gate_lock = threading.Lock()     # the data gate (Great Expectations) runs one upload at a time


def not_found(kind: str, ident: str) -> ApiError:
    return ApiError(404, f"No {kind} found with id {ident!r}", None, "not_found")


def database_url(cfg: Config) -> str:
    return cfg.service.database_url or default_url(cfg.state_dir)


# -- objects in the OpenAI shapes -----------------------------------------------------------------

def file_obj(f: dict[str, Any]) -> dict[str, Any]:
    return {"id": f["id"], "object": "file", "bytes": f["bytes"], "created_at": f["created_at"],
            "filename": f["filename"], "purpose": f["purpose"], "status": f["status"],
            "status_details": f["status_details"], "expires_at": None}


def job_obj(j: dict[str, Any]) -> dict[str, Any]:
    hp = j["hyperparameters"]
    return {"object": "fine_tuning.job", "id": j["id"], "model": j["model"], "created_at": j["created_at"],
            "finished_at": j["finished_at"], "status": j["status"], "organization_id": j["owner"],
            "fine_tuned_model": j["fine_tuned_model"] if j["status"] == "succeeded" else None,
            "training_file": j["training_file"], "validation_file": j["validation_file"],
            "hyperparameters": hp, "method": ({"type": "dpo", "dpo": {"hyperparameters": hp}} if "beta" in hp
                                              else {"type": "supervised", "supervised": {"hyperparameters": hp}}),
            "result_files": j["result_files"] or [], "trained_tokens": j["trained_tokens"], "error": j["error"],
            "seed": j["seed"],
            "estimated_finish": j["estimated_finish"] if j["status"] == "running" else None, "integrations": [], "metadata": j["job_metadata"],
            "user_provided_suffix": j["suffix"]}


def event_obj(e: dict[str, Any]) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": e["id"], "created_at": e["created_at"], "level": e["level"],
            "message": e["message"], "type": e["type"], "data": e["data"]}


def listing(items: list[Any], has_more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


# -- upload limit -----------------------------------------------------------------------------------

class RequestGate:
    """Before any body is read (and after ``BearerGate`` has refused an unauthenticated request,
    so that such a client cannot make the API buffer anything), the body of every ``/v1`` request
    is capped: ``POST /v1/files`` at the upload limit, the inference endpoints at
    ``serve.max_request_mb``, every other body at ``MAX_JSON_BYTES`` (413 from Content-Length, and
    a chunked or lying body is stopped as soon as it passes the cap)."""

    SLACK = 64 * 1024            # multipart boundaries and the purpose field
    INFERENCE = ("/v1/chat/completions", "/v1/classify")

    def __init__(self, app: Any, limit: int, request_limit: int = MAX_JSON_BYTES):
        self.app, self.limit, self.request_limit = app, limit, request_limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files"
        json_cap = self.request_limit if scope["path"].rstrip("/") in self.INFERENCE else MAX_JSON_BYTES
        cap = self.limit + self.SLACK if upload else json_cap
        refuse = too_large(self.limit) if upload else ApiError(
            413, f"request body too large: at most {json_cap / 2**20:g} MB"
                 + (" (serve.max_request_mb)" if json_cap != MAX_JSON_BYTES else ""), None, "request_too_large")
        length = headers.get(b"content-length")
        if length and (not length.isdigit() or int(length) > cap):
            return await JSONResponse(refuse.body, 413)(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > cap:
                raise refuse
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"file too large: this service accepts uploads of at most {limit / 2**20:g} MB "
                         f"(service.max_upload_mb)", "file", "file_too_large")


# -- the app --------------------------------------------------------------------------------------

def create_app(cfg: Config, start_background: bool = True) -> FastAPI:
    store = Store(database_url(cfg))
    limit = int(cfg.service.max_upload_mb * 2**20)
    (J.storage(cfg) / "tmp").mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(J.storage(cfg) / "tmp")     # multipart spooling stays in the project

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        import anyio

        await anyio.to_thread.run_sync(J.ensure_deployment, cfg)
        syncer = J.Syncer(cfg, store)
        if start_background:
            syncer.start()
        yield
        if start_background:
            await anyio.to_thread.run_sync(syncer.stop)

    app = FastAPI(title="tuneops fine-tuning jobs API", version="1", lifespan=lifespan)
    app.state.store, app.state.cfg = store, cfg
    app.add_middleware(RequestGate, limit=limit, request_limit=max_request_bytes(cfg.serve))
    app.add_middleware(BearerGate, owner_of=store.owner_of)     # outside RequestGate: 401 before any cap

    install_error_handlers(app)
    owner = bearer(store.owner_of)

    @app.get("/health")
    async def health() -> Any:
        """Readiness for probes (no token needed, nothing about jobs): 503 while shutting down or
        while the chat endpoint's slots are wedged (``inference.http.server.not_ready``)."""
        error = not_ready(app.state.scheduler, cfg.serve)
        if error is not None:
            return JSONResponse(error.body, 503)
        pool = app.state.pool        # counts only: the models loaded, and the base graphs their adapters share
        return {"status": "ok", "models_loaded": len(pool.loaded()), "base_graphs_loaded": len(pool.bases.loaded())}

    # -- files ---------------------------------------------------------------------------------
    @app.post("/v1/files")
    def upload(file: UploadFile = File(...), purpose: str = Form(...), who: str = Depends(owner)) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose {purpose!r} is not supported; this service accepts 'fine-tune'", "purpose",
                           "invalid_purpose")
        fid = new_id("file")
        dest = J.file_path(cfg, fid)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part, md5, size = dest.with_name(f"{fid}.part"), hashlib.md5(), 0  # noqa: S324 - a content fingerprint
        try:
            with part.open("wb") as out:
                while chunk := file.file.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise too_large(limit)
                    md5.update(chunk)
                    out.write(chunk)
            filename = Path(file.filename or "upload.jsonl").name[:255]
            records, details = _validate_upload(cfg, part, filename)
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)
        return file_obj(store.add_file(id=fid, owner=who, filename=filename, purpose=purpose, bytes=size,
                                       created_at=now(), status="processed", status_details=details,
                                       md5=md5.hexdigest(), records=records, deleted=False))

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   who: str = Depends(owner)) -> dict[str, Any]:
        items, more = page([file_obj(f) for f in store.list_files(who, purpose)], after, max(1, min(limit, 10000)))
        return listing(items, more)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        f = store.get_file(who, file_id)
        if f is None:
            raise not_found("file", file_id)
        return file_obj(f)

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, who: str = Depends(owner)) -> StreamingResponse:
        f = store.get_file(who, file_id)
        if f is None:
            raise not_found("file", file_id)
        return StreamingResponse(iter_chunks(J.file_path(cfg, f["id"])), media_type="application/octet-stream")

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        if not store.delete_file(who, file_id):
            raise not_found("file", file_id)
        J.file_path(cfg, file_id).unlink(missing_ok=True)     # jobs keep their own copy in their working dir
        return {"id": file_id, "object": "file", "deleted": True}

    # -- jobs ----------------------------------------------------------------------------------
    @app.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request, who: str = Depends(owner)) -> dict[str, Any]:
        import anyio

        try:
            req = job_request(parse_json_object(await request.body()))
        except BadRequest as exc:
            raise ApiError(400, str(exc), exc.param, exc.code) from None
        return job_obj(await anyio.to_thread.run_sync(_create_job, cfg, store, who, req))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20, who: str = Depends(owner)) -> dict[str, Any]:
        items, more = page([job_obj(j) for j in store.list_jobs(who)], after, max(1, min(limit, 100)))
        return listing(items, more)

    def own_job(job_id: str, who: str) -> dict[str, Any]:
        job = store.job(job_id, owner=who)
        if job is None:
            raise not_found("fine-tuning job", job_id)
        return J.sync(cfg, store, job_id) or job

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        return job_obj(own_job(job_id, who))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: int = 20, who: str = Depends(owner)) -> dict[str, Any]:
        own_job(job_id, who)
        items, more = page([event_obj(e) for e in store.events(job_id)], after, max(1, min(limit, 1000)))
        return listing(items, more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10,
                        who: str = Depends(owner)) -> dict[str, Any]:
        items, more = page(J.checkpoints(cfg, own_job(job_id, who)), after, max(1, min(limit, 100)))
        return listing(items, more)

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        job = own_job(job_id, who)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            raise ApiError(400, f"fine-tuning job {job_id} has already {job['status']}; only queued or running "
                                f"jobs can be cancelled", None, "job_not_cancellable")
        return job_obj(J.cancel(cfg, store, job))

    # -- models --------------------------------------------------------------------------------
    def models_of(who: str) -> list[dict[str, Any]]:
        started = now()
        base = [{"id": m, "object": "model", "created": started, "owned_by": "tuneops"}
                for m in cfg.service.allowed_models]
        tuned = [{"id": j["fine_tuned_model"], "object": "model", "created": j["finished_at"], "owned_by": who}
                 for j in store.list_jobs(who) if j["status"] == "succeeded" and j["fine_tuned_model"]]
        return base + tuned

    @app.get("/v1/models")
    def list_models(who: str = Depends(owner)) -> dict[str, Any]:
        return {"object": "list", "data": models_of(who)}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        for m in models_of(who):
            if m["id"] == model_id:
                return m
        raise ApiError(404, f"The model {model_id!r} does not exist or you do not have access to it", "model",
                       "model_not_found")

    from tuneops.inference.http import job_models     # chat with the caller's own fine-tuned models (issue 16)

    chat = job_models.router(cfg, store, owner)
    app.state.scheduler = chat.scheduler      # type: ignore[attr-defined]
    app.state.pool = chat.pool                # type: ignore[attr-defined]
    app.include_router(chat)
    return app


def upload_format(path: Path) -> str:
    """``preference`` for a file of preference rows (OpenAI DPO: its first record has ``input`` /
    ``preferred_output`` / ``non_preferred_output``; or TRL ``chosen`` / ``rejected``), else ``chat``
    (OpenAI SFT). The record checks of that format then say what is wrong with each line."""
    import json

    try:
        with path.open("rb") as f:
            for raw in f:
                if raw.strip():
                    first = json.loads(raw[:1 << 20])
                    break
            else:
                return "chat"
    except (OSError, ValueError, RecursionError):
        return "chat"
    keys = set(first) if isinstance(first, dict) else set()
    return "preference" if keys & {"preferred_output", "non_preferred_output", "chosen", "rejected"} \
        or ("input" in keys and "messages" not in keys) else "chat"


def _validate_upload(cfg: Config, path: Path, filename: str) -> tuple[int, str | None]:
    """The data gate on an upload (chat format, or preference for OpenAI DPO rows; params' rules):
    (records accepted, details), or a 400 whose message lists the problems as
    ``FILENAME:LINE: FIELD: RULE: message``."""
    from tuneops.data.cli import resolve_tokenizer
    from tuneops.data.gate import LazyTokenizer, Settings, validate_dataset

    fmt = upload_format(path)
    with _gate_lock:
        try:
            result = validate_dataset({"train": path}, LazyTokenizer(lambda: resolve_tokenizer(cfg)),
                                      Settings.from_config(cfg, fmt=fmt))
        except Exception as exc:  # noqa: BLE001 - a hostile file is a 400, never a 500
            raise ApiError(400, f"{filename}: could not be read as {fmt} JSONL: {type(exc).__name__}: "
                                f"{J.public_message(cfg, exc)}", "file", "invalid_file") from None
    if result.success:
        total = result.counts()["total"]
        return int(total["accepted"]), (f"{total['rejected']} of {total['read']} records will be left out by the data "
                                         f"gate (data.policy quarantine)" if total["rejected"] else None)
    problems = [{"line": p.line, "field": p.field, "rule": p.rule, "message": p.message} for p in result.problems]
    shown = "\n".join(str(dataclasses.replace(p, path=filename)) for p in result.problems[:20])
    more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ApiError(400, f"{filename} failed validation ({len(problems)} problems; format {fmt}, see data/README.md):\n"
                        f"{shown}{more}", "file", "invalid_file", extra={"problems": problems[:200]})


def _create_job(cfg: Config, store: Store, who: str, req: JobCreate) -> dict[str, Any]:
    """Check a job request completely (model, files, sizes, hyperparameters), then prepare its
    working directory, record it and submit it. A refused request leaves nothing behind."""
    model = req.model
    base, start_from = model, None
    if model not in cfg.service.allowed_models:
        # one of the caller's own fine-tuned models (as OpenAI allows): trained further from it (SFT then
        # DPO: it is also the reference), on its base model
        prior = next((j for j in store.list_jobs(who) if j["fine_tuned_model"] == model and j["status"] == "succeeded"
                      and j["model_version"]), None) if isinstance(model, str) else None
        if prior is None:
            raise ApiError(400, f"model {model!r} cannot be fine-tuned here; allowed base models: "
                                f"{list(cfg.service.allowed_models)} (service.allowed_models) or one of your "
                                "fine-tuned models", "model", "model_not_available")
        base, start_from = _base_of(store, who, prior), \
            f"models:/{model}/{prior['model_version']}"
    if req.integrations:
        raise ApiError(400, "integrations are not supported (runs are tracked in this service's MLflow)",
                       "integrations", "unsupported")
    files = {}
    for key in ("training_file", "validation_file"):
        fid = getattr(req, key)
        if fid is None and key == "validation_file":
            continue
        f = store.get_file(who, fid) if isinstance(fid, str) else None
        if f is None:
            raise ApiError(400, f"{key}: no file with id {fid!r}", key, "invalid_file")
        if f["purpose"] != "fine-tune":
            raise ApiError(400, f"{key}: file {fid} has purpose {f['purpose']!r}, expected 'fine-tune'", key,
                           "invalid_file")
        files[key] = f
    from tuneops.service.requests import METHOD_OBJECTIVES
    from tuneops.training import objectives

    objective = objectives.get(METHOD_OBJECTIVES[req.method_type])
    fmt = objective.data_format or "chat"
    for key, f in files.items():            # the file must be of the kind the method trains on
        got = upload_format(J.file_path(cfg, f["id"]))
        if got != fmt:
            raise ApiError(400, f"{key}: file {f['id']} holds {got} rows; method.type {req.method_type!r} trains on "
                                f"{fmt} rows ({'OpenAI DPO rows: input, preferred_output, non_preferred_output' if objective.pairs else 'messages'})",
                           key, "invalid_file")
    if objective.pairs and req.method is not None and req.method.supervised is not None:
        raise ApiError(400, "method.supervised: given with method.type 'dpo'; use method.dpo.hyperparameters",
                       "method.supervised", "invalid_request")
    hp = req.all_hyperparameters()
    suffix = req.suffix
    seed = cfg.train.seed if req.seed is None else req.seed
    meta = req.metadata
    rows = files["training_file"]["records"]
    held_out = 0 if "validation_file" in files else eval_count(rows, cfg.ingest.eval_fraction)
    min_rows = cfg.validate.min_rows
    if rows - held_out < min_rows or (held_out and held_out < min_rows):
        need = min_rows if held_out == 0 else max(min_rows + 1, -(-min_rows // cfg.ingest.eval_fraction))
        raise ApiError(400, f"training_file: {rows} records; with no validation_file, {held_out} of them "
                            f"(ingest.eval_fraction {cfg.ingest.eval_fraction:g}) are held out for evaluation, and each "
                            f"split needs validate.min_rows={min_rows}: upload at least {int(need)} records or a "
                            f"validation_file" if held_out else
                       f"training_file: {rows} records, fewer than validate.min_rows={min_rows}",
                       "training_file", "insufficient_records")
    try:
        resolved, overrides, steps = J.resolve_hyperparameters(
            cfg, hp, rows - held_out, f"method.{req.method_type}.hyperparameters" if objective.pairs else "hyperparameters")
        overrides.append(f"train.objective={objective.name}")
        if start_from:
            overrides.append(f"train.start_from={start_from}")
    except J.JobError as exc:
        raise ApiError(400, str(exc), exc.param, "invalid_hyperparameters") from None
    jid = new_id("ftjob")
    name = "-".join(x for x in ("ft", base, who, suffix, jid[-8:]) if x)
    job = {"id": jid, "owner": who, "model": model, "training_file": files["training_file"]["id"],
           "validation_file": files.get("validation_file", {}).get("id"), "hyperparameters": resolved,
           "suffix": suffix, "seed": seed, "job_metadata": meta, "status": "queued", "created_at": now(),
           "fine_tuned_model": name, "total_steps": steps, "result_files": []}
    try:
        J.prepare_workdir(cfg, job, files["training_file"], files.get("validation_file"), overrides, fmt, base)
    except Exception as exc:  # noqa: BLE001 - nothing recorded, nothing submitted, no folder left
        raise ApiError(400, f"the job's params do not validate: {J.public_message(cfg, exc)}", None,
                       "invalid_request") from None
    try:
        store.add_job(**job)
    except Exception:
        J.remove_workdir(cfg, jid)
        raise
    store.add_event(jid, "created", f"Created fine-tuning job: {jid}", job["created_at"])
    store.add_event(jid, "validated", f"Files validated ({rows} training records"
                    + (f", validation file {job['validation_file']}" if job["validation_file"] else "")
                    + "), moving job to queued state", job["created_at"])
    J.submit(cfg, store, job)
    return store.job(jid)  # type: ignore[return-value]


def _base_of(store: Store, who: str, job: dict[str, Any]) -> str:
    """The base model (a ``model.source``) under a chain of fine-tuned models."""
    seen = set()
    while job["model"] not in seen:
        seen.add(job["model"])
        prior = next((j for j in store.list_jobs(who) if j["fine_tuned_model"] == job["model"]), None)
        if prior is None:
            return job["model"]
        job = prior
    return job["model"]


def serve(cfg: Config, host: str | None = None, port: int | None = None) -> None:
    from tuneops.orchestrate import server

    os.environ["PREFECT_API_URL"] = server.api_url(cfg)
    app = create_app(cfg)
    run_server(app, host or cfg.service.host, port or cfg.service.port, [app.state.scheduler], cfg.serve)
