"""The request schema: the body (capped at ``serve.max_request_mb`` before it is read, JSON
nested deeper than ``MAX_DEPTH`` refused before it is parsed) and the chat request (``ChatRequest``,
a pydantic model; every bad value is a 400 naming its ``param``). The fields are listed in
``tuneops.inference.http.routes``."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from ..sampling import MIN_TEMPERATURE
from .errors import ApiError, short

MAX_DEPTH = 32                # JSON nesting a request may have (a chat request with content parts needs 4)
MAX_MESSAGES = 1024           # messages in one chat request
MAX_MODEL_ID = 256            # characters of a model id
SEED_MAX = 2**63 - 1          # OpenAI's seed is an int64; numpy takes any non-negative integer


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


def valid_text(text: str, sub: str = "") -> str:
    if _SURROGATE.search(text):
        raise BadValue("contains a lone UTF-16 surrogate: not valid Unicode text", sub)
    return text


def _text(content: Any) -> str:
    if isinstance(content, str):
        return valid_text(content)
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadValue('only text content parts ({"type": "text", "text": "..."}) are supported', f"[{j}]",
                               "invalid_content")
            parts.append(valid_text(part["text"], f"[{j}].text"))
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
        return valid_text(v)

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
        return [valid_text(s) for s in stops or []]

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
