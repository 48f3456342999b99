"""OpenAI-compatible inference endpoints, shared by ``tuneops serve`` (one model) and the jobs
API (each token's own fine-tuned models): ``POST /v1/chat/completions``, ``POST /v1/completions`` and
``POST /v1/classify``.

Chat request fields: ``model``, ``messages`` (roles system / developer / user / assistant; content
a string or a list of text parts), ``max_tokens`` or ``max_completion_tokens``, ``temperature``
(0 = greedy), ``top_p``, ``seed``, ``stop`` (a string or up to 4), ``n`` (1 only), ``stream``
(server-sent ``chat.completion.chunk`` events ending in ``data: [DONE]``) with
``stream_options.include_usage``, ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` (calls come back as
``message.tool_calls`` with ``finish_reason: "tool_calls"``; streamed as OpenAI streams them), and
``response_format`` (``json_object``, ``json_schema``). A forced tool call (``tool_choice`` ``required``
or a named function) and a JSON response format are decoded under a grammar
(``tuneops.inference.constrain``, llguidance; each distinct schema / tool set compiled once per model,
``serve.grammar_cache``): valid by construction. The legacy ``functions`` / ``function_call`` are read as
``tools`` / ``tool_choice`` and answered in their shape (``message.function_call``, ``finish_reason:
"function_call"``). ``logprobs`` / ``top_logprobs`` (0-20) add ``choices[].logprobs.content`` (each chunk's
tokens when streaming; ``tuneops.inference.logprobs``). Other OpenAI fields are ignored, except the ones
that would change the answer (``logit_bias``, ``audio``, ``prediction``), which are refused with 400.

``POST /v1/completions`` (legacy completions, lm-evaluation-harness's ``local-completions``): ``prompt``
(a string, strings, token ids or lists of them, up to ``serve.max_prompts``: one choice each),
``max_tokens`` (0: no generation), sampling as above, ``stop``, ``echo``, ``logprobs`` (an integer
0-20) giving ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``; with ``echo`` the prompt's
own tokens are scored (``logprobs.prompt_logprobs``; the first is ``null``). ``stream``: server-sent
``text_completion`` chunks (``text_chunks``: the echoed prompts, the pieces of each prompt's choice by
``index``, a finish chunk per choice, usage with ``stream_options.include_usage``, ``[DONE]``);
``logprobs`` is not streamed (a 400 naming it).
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
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import Depends, Request
from starlette.responses import StreamingResponse

from ..engine import ChatEngine, Generation
from ..scheduler import Busy, Cancelled, Closed, Scheduler, Ticket
from .errors import ApiError, busy, server_error, short, shutting_down
from .schema import BadValue, chat_request, completion_request, parse_body, read_body, valid_text

log = logging.getLogger(__name__)


def admit(scheduler: Scheduler) -> Ticket:
    try:
        return scheduler.admit()
    except Busy as exc:
        raise busy(exc) from None
    except Closed:
        raise shutting_down() from None



def tool_mode(req: dict[str, Any]) -> bool:
    """Whether the reply is read for tool calls (``tools`` given and ``tool_choice`` is not ``none``)."""
    return bool(req["tools"]) and req["tool_choice"] != "none"


def constraint_of(engine: ChatEngine, req: dict[str, Any], cache: int = 0) -> Any:
    """The decoding constraint of a request: the tool-call format's grammar when ``tool_choice`` is
    ``required`` or names a function, the JSON schema of ``response_format``; else ``None``. A schema
    llguidance cannot compile is a 400 naming it."""
    from .. import constrain
    from ..chat import ChatFormatError, tool_format

    choice, rf = req["tool_choice"], req["response_format"]
    forced = bool(req["tools"]) and (choice == "required" or isinstance(choice, dict))
    param = ("functions" if req.get("legacy") else "tools") if forced else "response_format.json_schema.schema"
    try:
        if forced:
            fns = [t["function"] for t in req["tools"]
                   if choice == "required" or t["function"]["name"] == choice["function"]["name"]]
            return constrain.tool_calls(tool_format(engine.tokenizer), fns, req["parallel_tool_calls"]
                                        and choice == "required", engine.tokenizer, engine.stop, cache)
        if rf and rf["type"] == "json_schema":
            return constrain.json_schema(rf["schema"], engine.tokenizer, engine.stop, cache)
        if rf and rf["type"] == "json_object":
            return constrain.json_object(engine.tokenizer, engine.stop, cache)
    except constrain.GrammarError as exc:
        raise ApiError(400, f"{param}: the constrained decoder cannot compile this schema: {str(exc)[:300]}",
                       param, "invalid_schema") from None
    except ChatFormatError as exc:
        raise ApiError(400, f"{param}: {str(exc)[:500]}", param, "invalid_messages") from None
    return None


def tool_calls_of(engine: ChatEngine, req: dict[str, Any], text: str) -> tuple[str, list[dict[str, Any]]]:
    """``(content, calls)`` of a finished reply; calls in OpenAI's shape (ids ``call_<random>``,
    arguments a JSON string). A reply whose call is malformed stays content."""
    from ..chat import tool_format
    from ..toolcalls import ToolCallError

    if not tool_mode(req):
        return text, []
    try:
        content, calls = tool_format(engine.tokenizer).split(text)
    except ToolCallError:
        return text, []
    names = {t["function"]["name"] for t in req["tools"]}
    if not calls or any(c["name"] not in names for c in calls):
        return text, []
    return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
                     for c in calls]


def prompt_of(engine: ChatEngine, req: dict[str, Any], settings: Any) -> tuple[list[int], Any]:
    """The prompt's token ids (tools declared in the model's tool format) and the decoding constraint."""
    from ..chat import ChatFormatError

    try:
        ids = engine.prompt(req["messages"], req["tools"])
    except ChatFormatError as exc:
        raise ApiError(400, f"messages: {str(exc)[:500]}", "messages", "invalid_messages") from None
    if len(ids) > settings.max_input_tokens:
        raise ApiError(400, f"This model's maximum input length is {settings.max_input_tokens} tokens "
                            f"(serve.max_input_tokens); your messages are {len(ids)} tokens", "messages",
                       "context_length_exceeded")
    return ids, constraint_of(engine, req, getattr(settings, "grammar_cache", 0))


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


def generate(engine: ChatEngine, ids: list[int], req: dict[str, Any], ticket: Ticket,
             constraint: Any = None) -> "asyncio.Queue[tuple[str, Any]]":
    """``run`` a generation: ``("piece", (text, logprob entries since the last piece))`` as it is
    decoded, then ``("done", Generation)``."""

    texts = texts_of(engine) if req.get("logprobs") is not None else None

    def known(entries: list[Any]) -> list[Any]:
        """The entries, their token texts looked up here (off the event loop: the first lookup of a
        model builds llguidance's view of its tokenizer)."""
        for e in entries if texts is not None else ():
            texts(e.token)
            for t, _ in e.top:
                texts(t)
        return entries

    def job(put: Callable[[Any], None]) -> Generation:
        g, sent = Generation(), 0
        for piece in engine.deltas(ids, req["max_tokens"], result=g, cancel=ticket.cancelled,
                                   constraint=constraint, logprobs=req.get("logprobs"), **_sample_kw(req)):
            ticket.beat()
            entries = known(g.logprobs[sent:]) if g.logprobs is not None else []
            sent += len(entries)
            put(("piece", (piece, entries)))
        if g.logprobs is not None:
            known(g.logprobs[sent:])
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


def texts_of(engine: ChatEngine) -> Any:
    """The engine's token id -> (text, bytes) table (``tuneops.inference.logprobs.Texts``), made once."""
    from ..logprobs import Texts

    texts = getattr(engine, "_token_texts", None)
    if texts is None:
        texts = engine._token_texts = Texts(engine.tokenizer, engine.stop)    # type: ignore[attr-defined]
    return texts


def chat_logprobs(engine: ChatEngine | None, entries: list[Any] | None) -> dict[str, Any] | None:
    """``choices[].logprobs`` of a chat completion (or chunk) for these token entries."""
    if entries is None or engine is None:
        return None
    from ..logprobs import chat_content

    return {"content": chat_content(entries, texts_of(engine)), "refusal": None}


def completion(model_id: str, g: Generation, engine: ChatEngine | None = None,
               req: dict[str, Any] | None = None) -> dict[str, Any]:
    content, calls = tool_calls_of(engine, req, g.text) if req is not None else (g.text, [])
    message: dict[str, Any] = {"role": "assistant", "content": content or (None if calls else ""), "refusal": None}
    finish = g.finish_reason
    if calls and req.get("legacy"):          # asked with functions / function_call: answered in that shape
        message["function_call"], finish = calls[0]["function"], "function_call"
    elif calls:
        message["tool_calls"], finish = calls, "tool_calls"
    entries = g.logprobs[:g.completion_tokens] if g.logprobs is not None else None
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(engine, entries),
                         "finish_reason": finish}],
            "usage": _usage(g)}


def error_event(error: ApiError) -> str:
    return "data: " + json.dumps(error.body) + "\n\n"


ARGUMENT_PIECE = 16          # characters of a streamed tool call's arguments per chunk


async def chunks(model_id: str, queue: "asyncio.Queue[tuple[str, Any]]", req: dict[str, Any],
                 ticket: Ticket, engine: ChatEngine | None = None) -> AsyncIterator[str]:
    """Server-sent events of a ``generate`` queue: a role chunk, content chunks, the finish chunk
    (and usage; ``ended`` adds ``[DONE]``); a generation that fails or is cancelled after the stream started
    ends it with an error event and ``[DONE]``. With tools, text that is or may become a tool call
    is held back; the calls are streamed at the end as OpenAI streams them: per call a delta with
    its ``index``, ``id``, ``type``, ``function.name`` and empty ``arguments``, then the arguments
    in pieces; the finish reason is ``tool_calls``."""
    tools = engine is not None and tool_mode(req)
    fmt = None
    if tools:
        from ..chat import tool_format

        fmt = tool_format(engine.tokenizer)
    text, sent = "", 0
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                      "model": model_id, "system_fingerprint": None, "choices": choices,
                                      **extra}) + "\n\n"

    with_logprobs = req.get("logprobs") is not None
    held: list[Any] = []                     # logprob entries of tokens whose text is not sent yet
    received = 0

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
        nonlocal held
        lp = None
        if with_logprobs and "role" not in delta:
            lp, held = chat_logprobs(engine, held), []
        return [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]

    while True:
        kind, value = await queue.get()
        if kind == "start":
            yield event(choice({"role": "assistant", "content": ""}))
        elif kind == "piece":
            piece, entries = value
            held += entries
            received += len(entries)
            if not tools:
                yield event(choice({"content": piece}))
                continue
            text += piece
            safe = len(fmt.content_prefix(text))
            if safe > sent:
                yield event(choice({"content": text[sent:safe]}))
                sent = safe
        else:
            break
    if kind == "done":
        finish_reason = value.finish_reason
        if value.logprobs is not None:   # the tokens after the last piece, less the stop token
            held += value.logprobs[received:value.completion_tokens]
        if tools:
            content, calls = tool_calls_of(engine, req, value.text)
            if not calls and len(value.text) > sent:
                yield event(choice({"content": value.text[sent:]}))
            legacy = bool(req.get("legacy"))
            for k, call in enumerate(calls[:1] if legacy else calls):
                fn = call["function"]
                if legacy:                   # the legacy shape: one function_call, streamed the same way
                    yield event(choice({"function_call": {"name": fn["name"], "arguments": ""}}))
                else:
                    yield event(choice({"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                        "function": {"name": fn["name"], "arguments": ""}}]}))
                for at in range(0, len(fn["arguments"]), ARGUMENT_PIECE):
                    piece = fn["arguments"][at:at + ARGUMENT_PIECE]
                    yield event(choice({"function_call": {"arguments": piece}} if legacy else
                                       {"tool_calls": [{"index": k, "function": {"arguments": piece}}]}))
            finish_reason = ("function_call" if legacy else "tool_calls") if calls else finish_reason
        yield event(choice({}, finish_reason))
        if req["include_usage"]:
            yield event([], usage=_usage(value))
    else:
        yield error_event(stopped(kind, value, ticket.scheduler))


async def ended(events: AsyncIterator[str], ticket: Ticket) -> AsyncIterator[str]:
    """``events`` (``chunks``, ``text_chunks``), then ``[DONE]``: a bug in them still ends the stream
    the way clients expect (a server_error event); the ticket is cancelled however it ends (nothing
    happens once it has finished)."""
    try:
        async for e in events:
            yield e
    except Exception:  # noqa: BLE001
        log.exception("stream failed")
        yield error_event(server_error())
    finally:
        ticket.cancel("the client went away")
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


# -- legacy completions -----------------------------------------------------------------------------------

def prompt_ids_of(engine: ChatEngine, req: dict[str, Any], settings: Any) -> list[tuple[list[int], str]]:
    """Each prompt's token ids (a string is tokenized as plain text, with the special tokens the
    tokenizer adds itself, its BOS) and its text (what ``echo`` writes back)."""
    from ..chat import raw_ids

    vocab = len(engine.tokenizer)
    out = []
    for i, p in enumerate(req["prompts"]):
        param = "prompt" if len(req["prompts"]) == 1 else f"prompt[{i}]"
        if isinstance(p, str):
            ids, text = raw_ids(engine.tokenizer, p), p
        else:
            bad = next((t for t in p if t >= vocab), None)
            if bad is not None:
                raise ApiError(400, f"{param}: token id {bad} is not in the model's vocabulary of {vocab}", param,
                               "invalid_value")
            ids, text = list(p), engine.tokenizer.decode(p)
        if not ids:
            raise ApiError(400, f"{param}: the prompt has no tokens", param, "invalid_value")
        if len(ids) > settings.max_input_tokens:
            raise ApiError(400, f"This model's maximum input length is {settings.max_input_tokens} tokens "
                                f"(serve.max_input_tokens); {param} is {len(ids)} tokens", param,
                           "context_length_exceeded")
        out.append((ids, text))
    return out


def complete_prompts(engine: ChatEngine, prompts: list[tuple[list[int], str]], req: dict[str, Any],
                     ticket: Ticket) -> "asyncio.Queue[tuple[str, Any]]":
    """``run`` every prompt in turn: with ``echo`` and ``logprobs`` its own tokens are scored (one
    forward over the runtime, ``logprobs.prompt_logprobs``), then ``max_tokens`` are generated (none
    for 0) by the engine's decode loop; ``("done", [(Generation, prompt entries or None), ...])``."""
    from ..logprobs import prompt_logprobs

    lp = req["logprobs"]

    def job(put: Callable[[Any], None]) -> list[tuple[Generation, Any]]:
        out = []
        for k, (ids, _) in enumerate(prompts):
            if ticket.cancelled.is_set():
                raise Cancelled("cancelled")
            g = Generation(prompt_tokens=len(ids), finish_reason="length")
            scored = prompt_logprobs(engine.lm, ids, lp) if req["echo"] and lp is not None else None
            ticket.beat()
            if req["max_tokens"] > 0:
                for piece in engine.deltas(ids, req["max_tokens"], result=g, cancel=ticket.cancelled, logprobs=lp,
                                           **_sample_kw(req)):
                    ticket.beat()
                    put(("piece", (k, piece)))
            elif lp is not None:
                g.logprobs = []
            out.append((g, scored))
        return out
    return run(ticket, job)


async def text_chunks(model_id: str, queue: "asyncio.Queue[tuple[str, Any]]", req: dict[str, Any],
                      prompts: list[tuple[list[int], str]], ticket: Ticket) -> AsyncIterator[str]:
    """Server-sent events of a ``complete_prompts`` queue, as OpenAI streams legacy completions: each
    prompt's text first with ``echo``, then the pieces of choice ``index`` as they are decoded, a
    finish chunk per choice (its ``finish_reason``), usage (with ``include_usage``; ``ended`` adds
    ``[DONE]``); a
    generation that fails or is cancelled after the stream started ends with an error event."""
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                      "model": model_id, "system_fingerprint": None, "choices": choices,
                                      **extra}) + "\n\n"

    def choice(k: int, text: str, finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": k, "text": text, "logprobs": None, "finish_reason": finish}]

    while True:
        kind, value = await queue.get()
        if kind == "start":
            for k, (_, text) in enumerate(prompts if req["echo"] else ()):
                yield event(choice(k, text))
        elif kind == "piece":
            yield event(choice(*value))
        else:
            break
    if kind == "done":
        for k, (g, _) in enumerate(value):
            yield event(choice(k, "", g.finish_reason))
        if req["include_usage"]:
            gens = [g for g, _ in value]
            prompt, completion_ = sum(g.prompt_tokens for g in gens), sum(g.completion_tokens for g in gens)
            yield event([], usage={"prompt_tokens": prompt, "completion_tokens": completion_,
                                   "total_tokens": prompt + completion_})
    else:
        yield error_event(stopped(kind, value, ticket.scheduler))


def text_completion(model_id: str, engine: ChatEngine, prompts: list[tuple[list[int], str]],
                    results: list[tuple[Generation, Any]], req: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``text_completion``: per prompt a choice with its text (after the prompt's with
    ``echo``) and, with ``logprobs``, ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
    ``text_offset`` over the echoed prompt tokens (the first has none: ``null``) and the generated ones
    (the stop token last when the reply ended on one, as its text does not show it)."""
    from ..logprobs import legacy

    choices = []
    for k, ((ids, prompt_text), (g, scored)) in enumerate(zip(prompts, results)):
        logprobs = None
        if req["logprobs"] is not None:
            gen = g.logprobs or []
            tokens = (ids if req["echo"] else []) + [e.token for e in gen]
            entries = (scored if req["echo"] else []) + gen
            logprobs = legacy(entries, tokens, texts_of(engine), 0 if req["echo"] else len(prompt_text))
        choices.append({"text": (prompt_text if req["echo"] else "") + g.text, "index": k, "logprobs": logprobs,
                        "finish_reason": g.finish_reason})
    prompt_tokens = sum(g.prompt_tokens for g, _ in results)
    completion_tokens = sum(g.completion_tokens for g, _ in results)
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "system_fingerprint": None, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


# -- the routes -------------------------------------------------------------------------------------------

def add_routes(router: Any, get_model: Callable[[str, Any], Any], scheduler: Scheduler, settings: Any,
               who: Callable[..., str]) -> None:
    """``POST /v1/chat/completions``, ``POST /v1/completions`` and ``POST /v1/classify`` on ``router``. ``get_model(owner,
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
        ids, constraint = await run_in_threadpool(prompt_of, engine, req, settings)   # off the event loop
        ticket = admit(scheduler)
        queue = generate(engine, ids, req, ticket, constraint)
        if req["stream"]:
            return EventStream(ended(chunks(engine.id, queue, req, ticket, engine), ticket), ticket)
        return completion(engine.id, await finish(request.receive, queue, ticket), engine, req)

    @router.post("/v1/completions")
    async def completions(request: Request, owner: str = Depends(who)) -> Any:
        req = completion_request(await body_of(request), settings)
        if req["stream"] and req["logprobs"] is not None:
            raise ApiError(400, "logprobs: not streamed on /v1/completions (drop stream, or logprobs)",
                           "logprobs", "unsupported_parameter")
        engine = await model_for(owner, req["model"], "chat")
        prompts = await run_in_threadpool(prompt_ids_of, engine, req, settings)
        ticket = admit(scheduler)
        queue = complete_prompts(engine, prompts, req, ticket)
        if req["stream"]:
            return EventStream(ended(text_chunks(engine.id, queue, req, prompts, ticket), ticket), ticket)
        results = await finish(request.receive, queue, ticket)
        return await run_in_threadpool(text_completion, engine.id, engine, prompts, results, req)

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
                valid_text(t)
            except BadValue as exc:
                raise ApiError(400, f"input: {exc}", "input", "invalid_value") from None
        model = await model_for(owner, body.get("model"), "classify")
        ticket = admit(scheduler)
        rows = await finish(request.receive, run(ticket, lambda put: model.classify(texts)), ticket)
        return {"object": "list", "model": model.id, "data": [{"index": i, **r} for i, r in enumerate(rows)]}
