"""OpenAI-compatible inference endpoints, shared by ``tuneops serve`` (one model) and the jobs
API (each token's own fine-tuned models): ``POST /v1/chat/completions`` and ``POST /v1/classify``.

Chat request fields: ``model``, ``messages`` (roles system / developer / user / assistant; content
a string or a list of text parts), ``max_tokens`` or ``max_completion_tokens``, ``temperature``
(0 = greedy), ``top_p``, ``seed``, ``stop`` (a string or up to 4), ``n`` (1 only), ``stream``
(server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``) with
``stream_options.include_usage``. Other OpenAI fields are ignored, except the ones that would
change the answer (tools, logprobs, a non-text response_format), which are refused with 400.

``POST /v1/classify`` (classification / NER versions): ``{"model": ID, "input": "text" | ["text", ...]}``
answers ``{"object": "list", "model": ID, "data": [{"index": 0, "label": "positive", "score": 0.93}]}``
(NER: ``{"index": 0, "words": [...], "tags": ["B-PER", "O", ...]}``).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request or an input longer than ``serve.max_input_tokens`` (the message gives the token count),
401 for a missing or unknown token, 404 for a model the caller cannot see, 429 when the bounded
queue is full.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Callable, Iterator

from fastapi import Depends, Request
from starlette.exceptions import HTTPException

from .chat_engine import Busy, ChatEngine, Generation, Scheduler


class ApiError(HTTPException):
    """An error in the OpenAI shape ``{"error": {"message", "type", "param", "code"}}`` (rendered by
    the handlers of ``install_error_handlers`` from ``body``); ``extra`` adds fields to the error."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code, **(extra or {})}}


def install_error_handlers(app: Any) -> None:
    """Every HTTP error and every request-validation error of ``app`` answers in OpenAI's shape
    (a validation error is a 400 naming the first bad field as ``param``)."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        body = getattr(exc, "body", None) or {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                                        "param": None, "code": None}}
        return JSONResponse(body, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        return JSONResponse(ApiError(400, f"{where}: {err['msg']}", where or None, "invalid_request").body, 400)


def model_not_found(model: Any) -> ApiError:
    return ApiError(404, f"The model {model!r} does not exist or you do not have access to it", "model",
                    "model_not_found")


def busy(exc: Busy) -> ApiError:
    return ApiError(429, f"Server busy: {exc}", None, "rate_limit_exceeded", type="rate_limit_error",
                    headers={"Retry-After": "1"})


# -- request checks -----------------------------------------------------------------------------------

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
REFUSED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "audio", "prediction")


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}]: only text content parts are supported", where, "invalid_content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"{where}: expected a string or a list of text parts", where, "invalid_content")


def _number(body: dict[str, Any], key: str, kind: type, low: float, high: float, default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or not low <= value <= high:
        raise ApiError(400, f"{key}: expected {'a number' if kind is float else 'an integer'} in [{low:g}, {high:g}] "
                            f"(got {value!r})", key, "invalid_value")
    return kind(value)


def chat_request(body: Any, settings: Any) -> dict[str, Any]:
    """The checked request: messages (plain role/content), max_tokens, sampling, stop, stream."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_request")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages: expected a non-empty list of {role, content}", "messages", "invalid_value")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role: expected one of {sorted(ROLES)}", f"messages[{i}].role",
                           "invalid_value")
        messages.append({"role": ROLES[m["role"]], "content": _text(m.get("content"), f"messages[{i}].content")})
    for key in REFUSED:
        if body.get(key):
            raise ApiError(400, f"{key}: not supported by this server", key, "unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise ApiError(400, "logprobs: not supported by this server", "logprobs", "unsupported_parameter")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise ApiError(400, "response_format: only 'text' is supported", "response_format", "unsupported_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"n: only n=1 is supported (got {n!r})", "n", "invalid_value")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, 1, settings.max_tokens, settings.default_max_tokens)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                             or not all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "stop: expected a string or a list of up to 4 strings", "stop", "invalid_value")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed: expected an integer (got {seed!r})", "seed", "invalid_value")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "stream: expected a boolean", "stream", "invalid_value")
    options = body.get("stream_options") or {}
    return {"messages": messages, "max_tokens": max_tokens, "stop": stop or [], "seed": seed,
            "temperature": _number(body, "temperature", float, 0, 2, settings.temperature),
            "top_p": _number(body, "top_p", float, 0, 1, 1.0) or 1.0, "stream": bool(stream),
            "include_usage": bool(isinstance(options, dict) and options.get("include_usage"))}


def prompt_of(engine: ChatEngine, req: dict[str, Any], settings: Any) -> list[int]:
    from .inference.chat import ChatFormatError

    try:
        ids = engine.prompt(req["messages"])
    except ChatFormatError as exc:
        raise ApiError(400, f"messages: {exc}", "messages", "invalid_messages") from None
    if len(ids) > settings.max_input_tokens:
        raise ApiError(400, f"This model's maximum input length is {settings.max_input_tokens} tokens "
                            f"(serve.max_input_tokens); your messages are {len(ids)} tokens", "messages",
                       "context_length_exceeded")
    return ids


# -- responses ------------------------------------------------------------------------------------------

def _usage(g: Generation) -> dict[str, int]:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def _sample_kw(req: dict[str, Any]) -> dict[str, Any]:
    return {"temperature": req["temperature"], "top_p": req["top_p"], "seed": req["seed"], "stop": req["stop"]}


def completion(engine: ChatEngine, model_id: str, ids: list[int], req: dict[str, Any]) -> dict[str, Any]:
    g = Generation()
    for _ in engine.deltas(ids, req["max_tokens"], result=g, **_sample_kw(req)):
        pass
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text, "refusal": None},
                         "logprobs": None, "finish_reason": g.finish_reason}],
            "usage": _usage(g)}


def chunks(engine: ChatEngine, model_id: str, ids: list[int], req: dict[str, Any], ticket: Any) -> Iterator[str]:
    """Server-sent events: a role chunk, content chunks, the finish chunk (and usage), [DONE]."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": model_id, "system_fingerprint": None, "choices": choices,
                                      **extra}) + "\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    g = Generation()
    try:
        with ticket.running():
            yield event(choice({"role": "assistant", "content": ""}))
            for piece in engine.deltas(ids, req["max_tokens"], result=g, **_sample_kw(req)):
                yield event(choice({"content": piece}))
        yield event(choice({}, g.finish_reason))
        if req["include_usage"]:
            yield event([], usage=_usage(g))
        yield "data: [DONE]\n\n"
    finally:
        ticket.release()


# -- the routes -------------------------------------------------------------------------------------------

def add_routes(router: Any, get_model: Callable[[str, Any], Any], scheduler: Scheduler, settings: Any,
               who: Callable[..., str]) -> None:
    """``POST /v1/chat/completions`` and ``POST /v1/classify`` on ``router``. ``get_model(owner,
    model_id)`` returns a loaded ChatEngine / Classifier or raises a 404 ``ApiError``; ``who`` is
    the auth dependency (it runs before the body is read)."""
    import anyio
    from fastapi.responses import StreamingResponse

    async def body_of(request: Request) -> Any:
        try:
            return await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None

    async def model_for(owner: str, body: Any, kind: str) -> Any:
        model_id = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model_id, str) or not model_id:
            raise ApiError(400, "model: required (GET /v1/models lists them)", "model", "invalid_value")
        model = await anyio.to_thread.run_sync(get_model, owner, model_id)
        if model.kind != kind:
            other = "/v1/classify" if model.kind == "classify" else "/v1/chat/completions"
            raise ApiError(400, f"model {model_id!r} is a {model.kind} model: use POST {other}", "model",
                           "wrong_endpoint")
        return model

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, owner: str = Depends(who)) -> Any:
        body = await body_of(request)
        req = chat_request(body, settings)
        engine = await model_for(owner, body, "chat")
        ids = prompt_of(engine, req, settings)
        try:
            ticket = scheduler.admit()
        except Busy as exc:
            raise busy(exc) from None
        if req["stream"]:
            from starlette.background import BackgroundTask

            return StreamingResponse(chunks(engine, engine.id, ids, req, ticket), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}, background=BackgroundTask(ticket.release))

        def run() -> dict[str, Any]:
            try:
                with ticket.running():
                    return completion(engine, engine.id, ids, req)
            finally:
                ticket.release()
        return await anyio.to_thread.run_sync(run)

    @router.post("/v1/classify")
    async def classify(request: Request, owner: str = Depends(who)) -> Any:
        body = await body_of(request)
        texts = body.get("input") if isinstance(body, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts) \
                or len(texts) > settings.max_classify_inputs:
            raise ApiError(400, f"input: expected a non-empty string or a list of 1-{settings.max_classify_inputs} "
                                f"non-empty strings", "input", "invalid_value")
        model = await model_for(owner, body, "classify")
        try:
            ticket = scheduler.admit()
        except Busy as exc:
            raise busy(exc) from None

        def run() -> list[dict[str, Any]]:
            try:
                with ticket.running():
                    return model.classify(texts)
            finally:
                ticket.release()
        rows = await anyio.to_thread.run_sync(run)
        return {"object": "list", "model": model.id, "data": [{"index": i, **r} for i, r in enumerate(rows)]}
