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
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tuneops.config import Config
from tuneops.data.chatterbot import eval_count
from tuneops.service import jobs as J
from tuneops.service.db import Store, default_url, iter_chunks, new_id, now, page

SUFFIX = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
_gate_lock = threading.Lock()     # the data gate (Great Expectations) runs one upload at a time


class APIError(HTTPException):
    """An error in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", extra: dict[str, Any] | None = None):
        super().__init__(status_code=status, detail=message)
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code, **(extra or {})}}


def not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"No {kind} found with id {ident!r}", None, "not_found")


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
            "hyperparameters": hp, "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
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

class UploadLimit:
    """Refuse ``POST /v1/files`` bodies over the limit (413) from Content-Length, and stop
    reading a body (chunked or lying) as soon as it passes the limit."""

    SLACK = 64 * 1024            # multipart boundaries and the purpose field

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/v1/files":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length and length.isdigit() and int(length) > self.limit + self.SLACK:
            return await JSONResponse(too_large(self.limit).body, 413)(scope, receive, send)
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit + self.SLACK:
                raise too_large(self.limit)
            return message

        await self.app(scope, limited, send)


def too_large(limit: int) -> APIError:
    return APIError(413, f"file too large: this service accepts uploads of at most {limit / 2**20:g} MB "
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
    app.add_middleware(UploadLimit, limit=limit)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        body = getattr(exc, "body", None) or {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                                        "param": None, "code": None}}
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        return JSONResponse(APIError(400, f"{where}: {err['msg']}", where or None, "invalid_request").body, 400)

    def owner(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise APIError(401, "You didn't provide an API key: send 'Authorization: Bearer <token>' "
                                "(tokens: `tuneops api token create NAME`)", None, "missing_api_key")
        name = store.owner_of(auth[7:].strip())
        if name is None:
            raise APIError(401, "Incorrect API key provided", None, "invalid_api_key")
        return name

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness for probes (no token needed, nothing about jobs)."""
        return {"status": "ok"}

    # -- files ---------------------------------------------------------------------------------
    @app.post("/v1/files")
    def upload(file: UploadFile = File(...), purpose: str = Form(...), who: str = Depends(owner)) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise APIError(400, f"purpose {purpose!r} is not supported; this service accepts 'fine-tune'", "purpose",
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
    def create_job(body: dict[str, Any], who: str = Depends(owner)) -> dict[str, Any]:
        return job_obj(_create_job(cfg, store, who, body))

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
            raise APIError(400, f"fine-tuning job {job_id} has already {job['status']}; only queued or running "
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
        raise APIError(404, f"The model {model_id!r} does not exist or you do not have access to it", "model",
                       "model_not_found")

    from tuneops.service import inference       # chat with the caller's own fine-tuned models (issue 16)

    app.include_router(inference.router(cfg, store, owner))
    return app


def _validate_upload(cfg: Config, path: Path, filename: str) -> tuple[int, str | None]:
    """The data gate on an upload (chat format, params' rules): (records accepted, details), or a
    400 whose message lists the problems as ``FILENAME:LINE: FIELD: RULE: message``."""
    from tuneops.data.cli import resolve_tokenizer
    from tuneops.data.gate import LazyTokenizer, Settings, validate_dataset

    with _gate_lock:
        try:
            result = validate_dataset({"train": path}, LazyTokenizer(lambda: resolve_tokenizer(cfg)),
                                      Settings.from_config(cfg, fmt="chat"))
        except Exception as exc:  # noqa: BLE001 - a hostile file is a 400, never a 500
            raise APIError(400, f"{filename}: could not be read as chat JSONL: {type(exc).__name__}: {exc}",
                           "file", "invalid_file") from None
    if result.success:
        total = result.counts()["total"]
        return int(total["accepted"]), (f"{total['rejected']} of {total['read']} records will be left out by the data "
                                         f"gate (data.policy quarantine)" if total["rejected"] else None)
    problems = [{"line": p.line, "field": p.field, "rule": p.rule, "message": p.message} for p in result.problems]
    shown = "\n".join(str(dataclasses.replace(p, path=filename)) for p in result.problems[:20])
    more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise APIError(400, f"{filename} failed validation ({len(problems)} problems; format chat, see data/README.md):\n"
                        f"{shown}{more}", "file", "invalid_file", extra={"problems": problems[:200]})


def _create_job(cfg: Config, store: Store, who: str, body: dict[str, Any]) -> dict[str, Any]:
    """Check a job request completely (model, files, sizes, hyperparameters), then record it,
    prepare its working directory and submit it."""
    known = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed", "metadata",
             "integrations"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise APIError(400, f"unknown parameter(s) {unknown}", unknown[0], "unknown_parameter")
    model = body.get("model")
    if model not in cfg.service.allowed_models:
        raise APIError(400, f"model {model!r} cannot be fine-tuned here; allowed base models: "
                            f"{list(cfg.service.allowed_models)} (service.allowed_models)", "model", "model_not_available")
    if body.get("integrations"):
        raise APIError(400, "integrations are not supported (runs are tracked in this service's MLflow)",
                       "integrations", "unsupported")
    files = {}
    for key in ("training_file", "validation_file"):
        fid = body.get(key)
        if fid is None and key == "validation_file":
            continue
        f = store.get_file(who, fid) if isinstance(fid, str) else None
        if f is None:
            raise APIError(400, f"{key}: no file with id {fid!r}", key, "invalid_file")
        if f["purpose"] != "fine-tune":
            raise APIError(400, f"{key}: file {fid} has purpose {f['purpose']!r}, expected 'fine-tune'", key,
                           "invalid_file")
        files[key] = f
    hp, method = body.get("hyperparameters") or {}, body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type", "supervised") != "supervised":
            raise APIError(400, f"method.type: only 'supervised' fine-tuning is offered (got "
                                f"{method.get('type') if isinstance(method, dict) else method!r})", "method.type",
                           "unsupported_method")
        hp = {**hp, **((method.get("supervised") or {}).get("hyperparameters") or {})}
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.match(suffix)):
        raise APIError(400, "suffix: 1-40 characters of A-Z a-z 0-9 _ -", "suffix", "invalid_suffix")
    seed = body.get("seed", cfg.train.seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise APIError(400, f"seed: expected an integer in [0, 2^31) (got {seed!r})", "seed", "invalid_seed")
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or len(meta) > 16
                             or any(not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512
                                    for k, v in meta.items())):
        raise APIError(400, "metadata: at most 16 string pairs (keys <= 64, values <= 512 characters)", "metadata",
                       "invalid_metadata")
    rows = files["training_file"]["records"]
    held_out = 0 if "validation_file" in files else eval_count(rows, cfg.ingest.eval_fraction)
    min_rows = cfg.validate.min_rows
    if rows - held_out < min_rows or (held_out and held_out < min_rows):
        need = min_rows if held_out == 0 else max(min_rows + 1, -(-min_rows // cfg.ingest.eval_fraction))
        raise APIError(400, f"training_file: {rows} records; with no validation_file, {held_out} of them "
                            f"(ingest.eval_fraction {cfg.ingest.eval_fraction:g}) are held out for evaluation, and each "
                            f"split needs validate.min_rows={min_rows}: upload at least {int(need)} records or a "
                            f"validation_file" if held_out else
                       f"training_file: {rows} records, fewer than validate.min_rows={min_rows}",
                       "training_file", "insufficient_records")
    try:
        resolved, overrides, steps = J.resolve_hyperparameters(cfg, hp, rows - held_out)
    except J.JobError as exc:
        raise APIError(400, str(exc), exc.param, "invalid_hyperparameters") from None
    jid = new_id("ftjob")
    name = "-".join(x for x in ("ft", model, who, suffix, jid[-8:]) if x)
    job = {"id": jid, "owner": who, "model": model, "training_file": files["training_file"]["id"],
           "validation_file": files.get("validation_file", {}).get("id"), "hyperparameters": resolved,
           "suffix": suffix, "seed": seed, "job_metadata": meta, "status": "queued", "created_at": now(),
           "fine_tuned_model": name, "total_steps": steps, "result_files": []}
    try:
        J.prepare_workdir(cfg, job, files["training_file"], files.get("validation_file"), overrides)
    except Exception as exc:  # noqa: BLE001 - nothing recorded, nothing submitted
        raise APIError(400, f"the job's params do not validate: {exc}", None, "invalid_request") from None
    store.add_job(**job)
    store.add_event(jid, "created", f"Created fine-tuning job: {jid}", job["created_at"])
    store.add_event(jid, "validated", f"Files validated ({rows} training records"
                    + (f", validation file {job['validation_file']}" if job["validation_file"] else "")
                    + "), moving job to queued state", job["created_at"])
    J.submit(cfg, store, job)
    return store.job(jid)  # type: ignore[return-value]


def serve(cfg: Config, host: str | None = None, port: int | None = None) -> None:
    import uvicorn

    from tuneops.orchestrate import server

    os.environ["PREFECT_API_URL"] = server.api_url(cfg)
    uvicorn.run(create_app(cfg), host=host or cfg.service.host, port=port or cfg.service.port, log_level="info")
