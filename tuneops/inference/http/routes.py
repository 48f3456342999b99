"""OpenAI-compatible inference endpoints, shared by ``tuneops serve`` (one model) and the jobs
API (each token's own fine-tuned models): ``POST /v1/chat/completions`` and ``POST /v1/classify``.

Chat request fields: ``model``, ``messages`` (roles system / developer / user / assistant; content
a string or a list of text parts), ``max_tokens`` or ``max_completion_tokens``, ``temperature``
(0 = greedy), ``top_p``, ``seed``, ``stop`` (a string or up to 4), ``n`` (1 only), ``stream``
(server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``) with
``stream_options.include_usage``. Other OpenAI fields are ignored, except the ones that would
change the answer (tools, logprobs, a non-text response_format), which are refused with 400.
The request is validated by a pydantic schema (``ChatRequest``) before anything runs: the body is
capped at ``serve.max_request_mb`` before it is read, JSON nested deeper than ``MAX_DEPTH`` is
refused before it is parsed, ``seed`` is an integer in [0, 2^63-1], ``temperature`` a number in
[0, 2] (below ``MIN_TEMPERATURE`` = 1e-5 it decodes greedily, as 0 does), a role is one of the
names below and text is valid Unicode (no lone surrogates). Every bad value is a 400 naming its
``param`` and showing at most the first ``SHOWN`` characters of the value.

``POST /v1/classify`` (classification / NER versions): ``{"model": ID, "input": "text" | ["text", ...]}``
answers ``{"object": "list", "model": ID, "data": [{"index": 0, "label": "positive", "score": 0.93}]}``
(NER: ``{"index": 0, "words": [...], "tags": ["B-PER", "O", ...]}``).

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad
request or an input longer than ``serve.max_input_tokens`` (the message gives the token count),
401 for a missing or unknown token, 404 for a model the caller cannot see, 413 for a body over
``serve.max_request_mb``, 429 when the bounded queue is full, 503 while the server shuts down,
500 (``server_error``; logged with its traceback) for a bug. No exception reaches the HTTP server
(``CatchAll``), so a keep-alive connection survives every error. An error after a stream has
started ends it with ``data: {"error": {...}}`` and ``data: [DONE]``.

Generation runs in a thread of its own and holds a slot of the ``Scheduler`` only while it
computes: a client that reads slowly, or not at all, holds no slot. A client that goes away
(before its first token, while streaming or while queued) cancels its request at once: its
place in the queue is given back, and its generation stops at the next token.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from ..engine import MIN_TEMPERATURE, Busy, Cancelled, ChatEngine, Closed, Generation, Scheduler, Ticket

log = logging.getLogger(__name__)

MAX_DEPTH = 32                # JSON nesting a request may have (a chat request with content parts needs 4)
MAX_MESSAGES = 1024           # messages in one chat request
MAX_MODEL_ID = 256            # characters of a model id
SHOWN = 40                    # characters of a bad value shown in its error message
SEED_MAX = 2**63 - 1          # OpenAI's seed is an int64; numpy takes any non-negative integer


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

    app.add_middleware(CatchAll)


def server_error(message: str = "The server had an error while processing your request (see the server log)",
                 status: int = 500, code: str = "internal_error") -> ApiError:
    return ApiError(status, message, None, code, type="server_error")


class CatchAll:
    """The outermost middleware: an exception that escapes the app (a bug) is logged with its
    traceback and answered with an OpenAI-shaped 500, or, once a response has started, ends that
    response cleanly. Nothing reaches uvicorn, which would answer plain text and close the
    keep-alive connection (the client's next request on it would fail with a reset)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = complete = False

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started, complete
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            from starlette.requests import ClientDisconnect

            if isinstance(exc, (ClientDisconnect, OSError)):      # the client went away: nobody to answer
                return
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            try:
                if not started:
                    body = json.dumps(server_error().body).encode()
                    await send({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                elif not complete:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:
                pass


def model_not_found(model: Any) -> ApiError:
    return ApiError(404, f"The model {short(model)} does not exist or you do not have access to it", "model",
                    "model_not_found")


def busy(exc: Busy) -> ApiError:
    return ApiError(429, f"Server busy: {exc}", None, "rate_limit_exceeded", type="rate_limit_error",
                    headers={"Retry-After": "1"})


def shutting_down() -> ApiError:
    return server_error("The server is shutting down; retry on another replica or later", 503,
                        "server_shutting_down")


def admit(scheduler: Scheduler) -> Ticket:
    try:
        return scheduler.admit()
    except Busy as exc:
        raise busy(exc) from None
    except Closed:
        raise shutting_down() from None


def short(value: Any) -> str:
    """A bad value as its error message shows it: at most ``SHOWN`` characters of its repr (which
    escapes lone surrogates), or the type and size of a list / object."""
    if isinstance(value, (list, dict)):
        return f"a list of length {len(value)}" if isinstance(value, list) else f"an object with {len(value)} keys"
    text = repr(value)
    if len(text) <= SHOWN:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} digits"
    return f"{text[:SHOWN]}... ({size})"


# -- request bodies ----------------------------------------------------------------------------------

def max_request_bytes(settings: Any) -> int:
    return int(settings.max_request_mb * 2**20)


def too_large(settings: Any) -> ApiError:
    return ApiError(413, f"request body too large: at most {settings.max_request_mb:g} MB (serve.max_request_mb)",
                    None, "request_too_large")


async def read_body(request: Request, settings: Any) -> bytes:
    """The body, refused with 413 from its Content-Length before it is read, or as soon as a
    chunked (or lying) body passes ``serve.max_request_mb``."""
    limit = max_request_bytes(settings)
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise too_large(settings)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large(settings)
    return bytes(body)


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth(raw: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep ``raw`` nests arrays and objects (outside strings), counted up to ``limit + 1``,
    without parsing it (a parser recurses once per level)."""
    depth = deepest = 0
    for c in _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if c in (91, 123):          # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def parse_body(raw: bytes) -> Any:
    """The JSON body; 400 ``invalid_json`` for an empty, undecodable, malformed or too deeply nested one."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty: expected a JSON object", None, "invalid_json")
    if json_depth(raw) > MAX_DEPTH:
        raise ApiError(400, f"the request body nests JSON more than {MAX_DEPTH} levels deep", None, "invalid_json")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, f"the request body nests JSON more than {MAX_DEPTH} levels deep", None,
                       "invalid_json") from None
    except ValueError as exc:      # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise ApiError(400, f"the request body is not valid JSON: {str(exc)[:200]}", None, "invalid_json") from None


# -- request checks -----------------------------------------------------------------------------------

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
REFUSED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "audio", "prediction")
_SURROGATE = re.compile("[\ud800-\udfff]")


class BadValue(ValueError):
    """A bad value in a request: ``sub`` continues its param (``[1].text`` of a content part),
    ``code`` is the OpenAI-style code."""

    def __init__(self, message: str, sub: str = "", code: str = "invalid_value"):
        super().__init__(message)
        self.sub, self.code = sub, code


def _checked(text: str, sub: str = "") -> str:
    if _SURROGATE.search(text):
        raise BadValue("contains a lone UTF-16 surrogate: not valid Unicode text", sub)
    return text


def _text(content: Any) -> str:
    if isinstance(content, str):
        return _checked(content)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadValue('only text content parts ({"type": "text", "text": "..."}) are supported', f"[{j}]",
                               "invalid_content")
            parts.append(_checked(part["text"], f"[{j}].text"))
        return "".join(parts)
    if content is None:
        return ""
    raise BadValue(f"expected a string or a list of text parts (got {short(content)})", code="invalid_content")


def _number(value: Any, kind: type, low: float, high: float) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or not low <= value <= high:          # NaN is in no range
        bounds = f"[{low:g}, {high:g}]" if kind is float else f"[{int(low)}, {int(high)}]"
        raise BadValue(f"expected {'a number' if kind is float else 'an integer'} in {bounds} (got {short(value)})")
    return kind(value)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Any = Field(None, validate_default=True)
    content: Any = None

    @field_validator("role")
    @classmethod
    def _role(cls, v: Any) -> str:
        if not isinstance(v, str) or v not in ROLES:
            raise BadValue(f"expected one of {sorted(ROLES)} (got {short(v)})")
        return ROLES[v]

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str:
        return _text(v)


class ChatRequest(BaseModel):
    """A ``POST /v1/chat/completions`` body (fields in the order they are checked; other
    OpenAI fields are ignored). ``model_validate(body, context={"settings": serve})``."""

    model_config = ConfigDict(extra="ignore")

    model: Any = Field(None, validate_default=True)
    messages: list[ChatMessage] = Field(None, validate_default=True)
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    logit_bias: Any = None
    audio: Any = None
    prediction: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    response_format: Any = None
    n: Any = None
    max_tokens: Any = None
    max_completion_tokens: Any = None
    stop: Any = None
    seed: Any = None
    temperature: Any = None
    top_p: Any = None
    stream: Any = None
    stream_options: Any = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: Any) -> str:
        if v is None or v == "":
            raise BadValue("required (GET /v1/models lists them)")
        if not isinstance(v, str) or len(v) > MAX_MODEL_ID:
            raise BadValue(f"expected a model id of at most {MAX_MODEL_ID} characters (got {short(v)})")
        return _checked(v)

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise BadValue("expected a non-empty list of {role, content}")
        if len(v) > MAX_MESSAGES:
            raise BadValue(f"at most {MAX_MESSAGES} messages (got {len(v)})")
        return v

    @field_validator(*REFUSED, "logprobs", "top_logprobs")
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise BadValue("not supported by this server", code="unsupported_parameter")
        return v

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise BadValue(f'expected an object such as {{"type": "text"}} (got {short(v)})')
        if v.get("type", "text") != "text":
            raise BadValue("only 'text' is supported", code="unsupported_parameter")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or v != 1 or not isinstance(v, int)):
            raise BadValue(f"only n=1 is supported (got {short(v)})")
        return v

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _max_tokens(cls, v: Any, info: ValidationInfo) -> Any:
        return _number(v, int, 1, info.context["settings"].max_tokens)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (not isinstance(stops, list) or len(stops) > 4
                                  or not all(isinstance(s, str) for s in stops)):
            raise BadValue(f"expected a string or a list of up to 4 strings (got {short(v)})")
        return [_checked(s) for s in stops or []]

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: Any) -> Any:
        return _number(v, int, 0, SEED_MAX)

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: Any) -> Any:
        t = _number(v, float, 0, 2)
        return 0.0 if t is not None and t < MIN_TEMPERATURE else t     # greedy (see MIN_TEMPERATURE)

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: Any) -> Any:
        return _number(v, float, 0, 1)

    @field_validator("stream")
    @classmethod
    def _stream(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, bool):
            raise BadValue(f"expected a boolean (got {short(v)})")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise BadValue(f'expected an object such as {{"include_usage": true}} (got {short(v)})')
        usage = v.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise BadValue(f"expected a boolean (got {short(usage)})", ".include_usage")
        return v


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def chat_request(body: Any, settings: Any) -> dict[str, Any]:
    """The checked request: messages (plain role/content), max_tokens, sampling, stop, stream."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object (got {short(body)})", None, "invalid_request")
    try:
        r = ChatRequest.model_validate(body, context={"settings": settings})
    except ValidationError as err:
        e = err.errors()[0]
        exc = (e.get("ctx") or {}).get("error")
        param = _param(e["loc"]) + getattr(exc, "sub", "")
        if isinstance(exc, BadValue):
            msg = str(exc)
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"expected an object (got {short(e.get('input'))})"
        else:
            msg = e["msg"]
        raise ApiError(400, f"{param}: {msg}", param, getattr(exc, "code", "invalid_value")) from None
    max_tokens = next((t for t in (r.max_completion_tokens, r.max_tokens) if t is not None),
                      settings.default_max_tokens)
    return {"model": r.model, "messages": [{"role": m.role, "content": m.content} for m in r.messages],
            "max_tokens": max_tokens, "stop": r.stop or [], "seed": r.seed,
            "temperature": settings.temperature if r.temperature is None else r.temperature,
            "top_p": r.top_p or 1.0, "stream": bool(r.stream),
            "include_usage": bool(r.stream_options and r.stream_options.get("include_usage"))}


def prompt_of(engine: ChatEngine, req: dict[str, Any], settings: Any) -> list[int]:
    from ..chat import ChatFormatError

    try:
        ids = engine.prompt(req["messages"])
    except ChatFormatError as exc:
        raise ApiError(400, f"messages: {str(exc)[:500]}", "messages", "invalid_messages") from None
    if len(ids) > settings.max_input_tokens:
        raise ApiError(400, f"This model's maximum input length is {settings.max_input_tokens} tokens "
                            f"(serve.max_input_tokens); your messages are {len(ids)} tokens", "messages",
                       "context_length_exceeded")
    return ids


# -- running a request ----------------------------------------------------------------------------------

def run(ticket: Ticket, job: Callable[[Callable[[Any], None]], Any]) -> "asyncio.Queue[tuple[str, Any]]":
    """``job(put)`` in a thread of its own while it holds a slot (``ticket.running()``); the queue
    gets ``("start", None)`` when it has the slot, what it ``put``s, and last ``("done", value)``,
    ``("cancelled", reason)`` or ``("error", exc)``, always after the ticket is released."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:                  # the event loop is gone: nobody is waiting
            ticket.cancel("the server is shutting down")

    def work() -> None:
        end: tuple[str, Any] = ("error", None)
        try:
            with ticket.running():
                put(("start", None))
                end = ("done", job(put))
        except Cancelled:
            end = ("cancelled", ticket.reason)
        except Exception as exc:  # noqa: BLE001 - the client gets a server_error, the log the traceback
            log.exception("request failed")
            end = ("error", exc)
        finally:
            ticket.release()
        put(end)

    threading.Thread(target=work, name="tuneops-request", daemon=True).start()
    return queue


def generate(engine: ChatEngine, ids: list[int], req: dict[str, Any],
             ticket: Ticket) -> "asyncio.Queue[tuple[str, Any]]":
    """``run`` a generation: ``("piece", text)`` as it is decoded, then ``("done", Generation)``."""

    def job(put: Callable[[Any], None]) -> Generation:
        g = Generation()
        for piece in engine.deltas(ids, req["max_tokens"], result=g, cancel=ticket.cancelled, **_sample_kw(req)):
            ticket.beat()
            put(("piece", piece))
        return g
    return run(ticket, job)


def stopped(kind: str, value: Any, scheduler: Scheduler) -> ApiError:
    """The error of a request that did not finish: cancelled (client gone, or shutting down) or failed."""
    if kind == "cancelled":
        if scheduler.closed:
            return shutting_down()
        return ApiError(499, f"cancelled: {value}", None, "request_cancelled")
    return server_error()


async def finish(receive: Any, queue: "asyncio.Queue[tuple[str, Any]]", ticket: Ticket) -> Any:
    """The value of a ``run`` job; a client that goes away meanwhile cancels it."""
    import anyio

    kind, value = "cancelled", "the request was cancelled"
    try:
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                ticket.cancel("the client went away")

            tg.start_soon(watch)
            while True:
                kind, value = await queue.get()
                if kind not in ("start", "piece"):
                    break
            tg.cancel_scope.cancel()
    finally:
        ticket.cancel("the request was cancelled")        # nothing happens once it has finished
    if kind != "done":
        raise stopped(kind, value, ticket.scheduler)
    return value


# -- responses ------------------------------------------------------------------------------------------

def _usage(g: Generation) -> dict[str, int]:
    return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens}


def _sample_kw(req: dict[str, Any]) -> dict[str, Any]:
    return {"temperature": req["temperature"], "top_p": req["top_p"], "seed": req["seed"], "stop": req["stop"]}


def completion(model_id: str, g: Generation) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": g.text, "refusal": None},
                         "logprobs": None, "finish_reason": g.finish_reason}],
            "usage": _usage(g)}


def error_event(error: ApiError) -> str:
    return "data: " + json.dumps(error.body) + "\n\n"


async def chunks(model_id: str, queue: "asyncio.Queue[tuple[str, Any]]", req: dict[str, Any],
                 ticket: Ticket) -> AsyncIterator[str]:
    """Server-sent events of a ``generate`` queue: a role chunk, content chunks, the finish chunk
    (and usage), ``[DONE]``; a generation that fails or is cancelled after the stream started
    ends it with an error event and ``[DONE]``."""
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": model_id, "system_fingerprint": None, "choices": choices,
                                      **extra}) + "\n\n"

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    try:
        while True:
            kind, value = await queue.get()
            if kind == "start":
                yield event(choice({"role": "assistant", "content": ""}))
            elif kind == "piece":
                yield event(choice({"content": value}))
            else:
                break
        if kind == "done":
            yield event(choice({}, value.finish_reason))
            if req["include_usage"]:
                yield event([], usage=_usage(value))
        else:
            yield error_event(stopped(kind, value, ticket.scheduler))
    except Exception:  # noqa: BLE001 - a bug here still ends the stream the way clients expect
        log.exception("stream failed")
        yield error_event(server_error())
    finally:
        ticket.cancel("the client went away")             # nothing happens once it has finished
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """Server-sent events that cancel their request as soon as the client disconnects, on every
    ASGI server (it listens for ``http.disconnect`` itself), and at the latest when the response
    ends for any reason, so the ticket never waits for the generator to be garbage collected."""

    def __init__(self, events: AsyncIterator[str], ticket: Ticket):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.ticket = ticket

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        import anyio

        try:
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    await self.listen_for_disconnect(receive)
                    self.ticket.cancel("the client went away")
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:                   # the client went away (ASGI 2.4 servers say so here)
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.ticket.cancel("the client went away")
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


# -- health and shutdown -----------------------------------------------------------------------------

def not_ready(scheduler: Scheduler, settings: Any) -> ApiError | None:
    """Why ``GET /health`` should answer 503: shutting down, or every slot held with no token
    produced for over ``serve.stall_s`` (a wedged generation: no new request could run)."""
    if scheduler.closed:
        return shutting_down()
    stalled = scheduler.stalled_s()
    if stalled > settings.stall_s:
        return server_error(f"not ready: every generation slot has been busy for {stalled:.0f} s with no token "
                            f"produced (serve.stall_s = {settings.stall_s:g})", 503, "not_ready")
    return None


def run_server(app: Any, host: str, port: int, schedulers: list[Scheduler], settings: Any) -> None:
    """uvicorn until SIGINT / SIGTERM. At the signal every admitted request is cancelled (running
    generations stop at their next token, streams end with an error event and ``[DONE]``, new
    requests get 503), and responses still being written get ``serve.shutdown_s`` seconds (a
    client that stops reading cannot hold the server up longer)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # not in the signal handler itself: it may have interrupted a thread holding a scheduler lock
            threading.Thread(target=lambda: [s.close() for s in schedulers], daemon=True).start()
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                          timeout_graceful_shutdown=settings.shutdown_s)).run()


# -- the routes -------------------------------------------------------------------------------------------

def add_routes(router: Any, get_model: Callable[[str, Any], Any], scheduler: Scheduler, settings: Any,
               who: Callable[..., str]) -> None:
    """``POST /v1/chat/completions`` and ``POST /v1/classify`` on ``router``. ``get_model(owner,
    model_id)`` returns a loaded ChatEngine / Classifier or raises a 404 ``ApiError``; ``who`` is
    the auth dependency (it runs before the body is read)."""
    from starlette.concurrency import run_in_threadpool

    async def body_of(request: Request) -> Any:
        return await run_in_threadpool(parse_body, await read_body(request, settings))

    async def model_for(owner: str, model_id: Any, kind: str) -> Any:
        if not isinstance(model_id, str) or not model_id:
            raise ApiError(400, "model: required (GET /v1/models lists them)", "model", "invalid_value")
        model = await run_in_threadpool(get_model, owner, model_id)
        if model.kind != kind:
            other = "/v1/classify" if model.kind == "classify" else "/v1/chat/completions"
            raise ApiError(400, f"model {short(model_id)} is a {model.kind} model: use POST {other}", "model",
                           "wrong_endpoint")
        return model

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request, owner: str = Depends(who)) -> Any:
        req = chat_request(await body_of(request), settings)
        engine = await model_for(owner, req["model"], "chat")
        ids = await run_in_threadpool(prompt_of, engine, req, settings)      # tokenizing: off the event loop
        ticket = admit(scheduler)
        queue = generate(engine, ids, req, ticket)
        if req["stream"]:
            return EventStream(chunks(engine.id, queue, req, ticket), ticket)
        return completion(engine.id, await finish(request.receive, queue, ticket))

    @router.post("/v1/classify")
    async def classify(request: Request, owner: str = Depends(who)) -> Any:
        body = await body_of(request)
        texts = body.get("input") if isinstance(body, dict) else None
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts) \
                or len(texts) > settings.max_classify_inputs:
            raise ApiError(400, f"input: expected a non-empty string or a list of 1-{settings.max_classify_inputs} "
                                f"non-empty strings", "input", "invalid_value")
        for t in texts:
            try:
                _checked(t)
            except BadValue as exc:
                raise ApiError(400, f"input: {exc}", "input", "invalid_value") from None
        model = await model_for(owner, body.get("model"), "classify")
        ticket = admit(scheduler)
        rows = await finish(request.receive, run(ticket, lambda put: model.classify(texts)), ticket)
        return {"object": "list", "model": model.id, "data": [{"index": i, **r} for i, r in enumerate(rows)]}
