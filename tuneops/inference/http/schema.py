"""The request schema: the body (capped at ``serve.max_request_mb`` before it is read, JSON
nested deeper than ``MAX_DEPTH`` refused before it is parsed) and the chat request (``ChatRequest``,
a pydantic model; every bad value is a 400 naming its ``param``). The fields are listed in
``tuneops.inference.http.routes``."""
from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from ..logprobs import MAX_TOP
from ..sampling import MIN_TEMPERATURE
from .errors import ApiError, short

MAX_DEPTH = 32                # JSON nesting a request may have (a chat request with content parts needs 4)
MAX_MESSAGES = 1024           # messages in one chat request
MAX_MODEL_ID = 256            # characters of a model id
SEED_MAX = 2**63 - 1          # OpenAI's seed is an int64; numpy takes any non-negative integer
DECODABLE_MEMO = 256          # distinct schemas whose decodability check is remembered (a pure function of the schema)


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

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "function": "function"}    # a legacy function result: read as the tool result of the call before it
REFUSED = ("logit_bias", "audio", "prediction")
FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128
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


def _flag(value: Any) -> Any:
    """A boolean field (``stream``, ``logprobs`` of chat, ``echo``, ...): absent or true / false."""
    if value is not None and not isinstance(value, bool):
        raise BadValue(f"expected a boolean (got {short(value)})")
    return value


def _number(value: Any, kind: type, low: float, high: float) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) \
            or not low <= value <= high:          # NaN is in no range
        bounds = f"[{low:g}, {high:g}]" if kind is float else f"[{int(low)}, {int(high)}]"
        raise BadValue(f"expected {'a number' if kind is float else 'an integer'} in {bounds} (got {short(value)})")
    return kind(value)


def json_schema_of(value: Any, sub: str = "") -> dict[str, Any]:
    """``value`` if it is a valid JSON Schema (the metaschema of its ``$schema``, else 2020-12)."""
    import jsonschema

    if not isinstance(value, dict):
        raise BadValue(f"expected a JSON Schema object (got {short(value)})", sub)
    try:
        jsonschema.validators.validator_for(value, jsonschema.Draft202012Validator).check_schema(value)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        raise BadValue(f"not a valid JSON Schema: {exc.message[:120]} (at {where or 'the root'})", sub,
                       "invalid_schema") from None
    except Exception as exc:  # noqa: BLE001 - an unresolvable $schema, a metaschema that cannot be used
        raise BadValue(f"not a valid JSON Schema: {str(exc)[:120]}", sub, "invalid_schema") from None
    return value


def decodable(schema: dict[str, Any], sub: str = "") -> dict[str, Any]:
    """``schema`` if the constrained decoder (llguidance) compiles it: a dangling ``$ref``, an
    unsatisfiable schema or a regex it cannot parse is a 400, before any model is looked up."""
    from ..constrain import _key

    err = _DECODABLE.get(_key(schema), lambda: _decodable_error(schema))
    if err:
        raise BadValue(f"the constrained decoder cannot use this schema: {str(err)[:160]}", sub, "invalid_schema")
    return schema


def _decodable_error(schema: dict[str, Any]) -> str:
    import llguidance

    try:
        return str(llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema)) or "")
    except Exception as exc:  # noqa: BLE001 - llguidance's own errors
        return str(exc) or type(exc).__name__


def _lru(size: int) -> Any:
    from ..constrain import LRU

    return LRU(size)


_DECODABLE = _lru(DECODABLE_MEMO)       # schema -> why the decoder cannot use it ("" = it can): checked once


def _tool_calls(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise BadValue(f"expected a list of tool calls (got {short(v)})")
    out = []
    for j, tc in enumerate(v):
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict):
            raise BadValue('expected {"id", "type": "function", "function": {"name", "arguments"}}', f"[{j}]")
        name, args = fn.get("name"), fn.get("arguments", "{}")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise BadValue(f"expected a function name of 1-64 letters, digits, _ or - (got {short(name)})",
                           f"[{j}].function.name")
        if not isinstance(args, str):
            raise BadValue(f"expected the arguments as a JSON string (got {short(args)})", f"[{j}].function.arguments")
        try:
            parsed = json.loads(args)
        except ValueError:
            raise BadValue(f"not JSON: {short(args)}", f"[{j}].function.arguments") from None
        if not isinstance(parsed, dict):
            raise BadValue(f"expected a JSON object (got {short(args)})", f"[{j}].function.arguments")
        call_id = tc.get("id", f"call_{j}")
        if not isinstance(call_id, str) or not call_id:
            raise BadValue(f"expected a string (got {short(call_id)})", f"[{j}].id")
        out.append({"id": valid_text(call_id, f"[{j}].id"), "type": "function",
                    "function": {"name": name, "arguments": valid_text(args, f"[{j}].function.arguments")}})
    return out


def _functions(v: Any, legacy: bool) -> Any:
    """OpenAI ``tools`` (``[{"type": "function", "function": {...}}]``), or with ``legacy`` the
    ``functions`` list (``[{...}]``), as clean ``tools``; a bad entry names its place."""
    if v is None:
        return v
    shape = '{"name", "description", "parameters"}' if legacy else '{"type": "function", "function": {...}}'
    if not isinstance(v, list) or len(v) > MAX_TOOLS:
        raise BadValue(f"expected a list of up to {MAX_TOOLS} {shape} (got {short(v)})")
    seen: set[str] = set()
    out = []
    for i, tool in enumerate(v):
        if legacy:
            fn, at = tool, f"[{i}]"
        else:
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                raise BadValue(f'expected {{"type": "function", "function": {{"name", "parameters"}}}} '
                               f"(got {short(tool)})", f"[{i}]")
            fn, at = tool.get("function"), f"[{i}].function"
        if not isinstance(fn, dict):
            raise BadValue(f"expected an object with a name (got {short(fn)})", at)
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise BadValue(f"expected a function name of 1-64 letters, digits, _ or - (got {short(name)})",
                           f"{at}.name")
        if name in seen:
            raise BadValue(f"function {name!r} is declared twice", f"{at}.name")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise BadValue(f"expected a string (got {short(desc)})", f"{at}.description")
        params = fn.get("parameters")
        if params is not None:
            json_schema_of(params, f"{at}.parameters")
            if params.get("type", "object") != "object":
                raise BadValue("the parameters of a function are an object schema (\"type\": \"object\")",
                               f"{at}.parameters", "invalid_schema")
        clean = {"name": name, **({"description": valid_text(desc)} if desc else {}),
                 "parameters": params if params is not None else {"type": "object", "properties": {}}}
        out.append({"type": "function", "function": clean})
    return out or None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Any = Field(None, validate_default=True)
    content: Any = None
    tool_calls: Any = None
    function_call: Any = None
    tool_call_id: Any = None

    @field_validator("tool_calls")
    @classmethod
    def _calls(cls, v: Any) -> Any:
        return None if v is None else _tool_calls(v) or None

    @field_validator("function_call")
    @classmethod
    def _function_call(cls, v: Any) -> Any:
        """A legacy assistant ``function_call`` ``{"name", "arguments"}``: one tool call."""
        if v is None:
            return v
        if not isinstance(v, dict):
            raise BadValue(f'expected {{"name", "arguments"}} (got {short(v)})')
        try:
            return _tool_calls([{"function": v}])[0]["function"]
        except BadValue as exc:
            raise BadValue(str(exc), exc.sub.replace("[0].function", ""), exc.code) from None

    @field_validator("tool_call_id")
    @classmethod
    def _call_id(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or not v):
            raise BadValue(f"expected a string (got {short(v)})")
        return None if v is None else valid_text(v)

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


class _Sampling(BaseModel):
    """The checks ``ChatRequest`` and ``CompletionRequest`` share (model id, stop, seed, temperature,
    top_p, stream_options): validators only; each request declares its fields, in the order they are
    checked."""

    @field_validator("model", check_fields=False)
    @classmethod
    def _model(cls, v: Any) -> str:
        if v is None or v == "":
            raise BadValue("required (GET /v1/models lists them)")
        if not isinstance(v, str) or len(v) > MAX_MODEL_ID:
            raise BadValue(f"expected a model id of at most {MAX_MODEL_ID} characters (got {short(v)})")
        return valid_text(v)

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (not isinstance(stops, list) or len(stops) > 4
                                  or not all(isinstance(s, str) for s in stops)):
            raise BadValue(f"expected a string or a list of up to 4 strings (got {short(v)})")
        return [valid_text(s) for s in stops or []]

    @field_validator("seed", check_fields=False)
    @classmethod
    def _seed(cls, v: Any) -> Any:
        return _number(v, int, 0, SEED_MAX)

    @field_validator("temperature", check_fields=False)
    @classmethod
    def _temperature(cls, v: Any) -> Any:
        t = _number(v, float, 0, 2)
        return 0.0 if t is not None and t < MIN_TEMPERATURE else t     # greedy (see MIN_TEMPERATURE)

    @field_validator("top_p", check_fields=False)
    @classmethod
    def _top_p(cls, v: Any) -> Any:
        return _number(v, float, 0, 1)

    @field_validator("stream_options", check_fields=False)
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


class ChatRequest(_Sampling):
    """A ``POST /v1/chat/completions`` body (fields in the order they are checked; other
    OpenAI fields are ignored). ``model_validate(body, context={"settings": serve})``."""

    model_config = ConfigDict(extra="ignore")

    model: Any = Field(None, validate_default=True)
    messages: list[ChatMessage] = Field(None, validate_default=True)
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
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

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, v: Any) -> Any:
        if not isinstance(v, list) or not v:
            raise BadValue("expected a non-empty list of {role, content}")
        if len(v) > MAX_MESSAGES:
            raise BadValue(f"at most {MAX_MESSAGES} messages (got {len(v)})")
        return v

    @field_validator(*REFUSED)
    @classmethod
    def _refused(cls, v: Any, info: ValidationInfo) -> Any:
        if v:
            raise BadValue("not supported by this server", code="unsupported_parameter")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: Any) -> Any:
        return _functions(v, legacy=False)

    @field_validator("functions")
    @classmethod
    def _legacy_functions(cls, v: Any) -> Any:
        return _functions(v, legacy=True)

    @field_validator("function_call")
    @classmethod
    def _function_call(cls, v: Any) -> Any:
        """Legacy ``function_call``: ``"none"``, ``"auto"`` or ``{"name": ...}``, as a ``tool_choice``."""
        if v is None or v in ("none", "auto"):
            return v
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise BadValue(f'expected "none", "auto" or {{"name": ...}} (got {short(v)})')
        return {"type": "function", "function": {"name": v["name"]}}

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: Any) -> Any:
        return _number(v, int, 0, MAX_TOP)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v is None or v in ("none", "auto", "required"):
            return v
        fn = v.get("function") if isinstance(v, dict) and v.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadValue('expected "none", "auto", "required" or {"type": "function", "function": {"name": ...}} '
                           f"(got {short(v)})")
        return {"type": "function", "function": {"name": fn["name"]}}

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, dict):
            raise BadValue(f'expected an object such as {{"type": "json_object"}} (got {short(v)})')
        kind = v.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind != "json_schema":
            raise BadValue(f'expected "text", "json_object" or "json_schema" (got {short(kind)})', ".type")
        spec = v.get("json_schema")
        if not isinstance(spec, dict):
            raise BadValue(f'expected {{"name", "schema", "strict"}} (got {short(spec)})', ".json_schema")
        name = spec.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise BadValue(f"expected a name of 1-64 letters, digits, _ or - (got {short(name)})", ".json_schema.name")
        if "schema" not in spec:
            raise BadValue("required: the JSON Schema the reply must satisfy", ".json_schema.schema")
        schema = decodable(json_schema_of(spec["schema"], ".json_schema.schema"), ".json_schema.schema")
        strict = spec.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise BadValue(f"expected a boolean (got {short(strict)})", ".json_schema.strict")
        return {"type": "json_schema", "name": name, "schema": schema, "strict": bool(strict)}

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

    @field_validator("stream", "parallel_tool_calls", "logprobs")
    @classmethod
    def _boolean(cls, v: Any) -> Any:
        return _flag(v)

    @model_validator(mode="after")
    def _consistent(self) -> "ChatRequest":
        legacy = self.functions is not None or self.function_call is not None
        fns, choice_param = ("functions", "function_call") if legacy else ("tools", "tool_choice")
        if legacy:                   # the legacy fields, read as tools / tool_choice (replies in the legacy shape)
            if self.tools is not None or self.tool_choice is not None:
                raise BadValue("use tools / tool_choice or the legacy functions / function_call, not both",
                               "functions" if self.functions is not None else "function_call")
            self.tools, self.tool_choice = self.functions, self.function_call
        choice = self.tool_choice
        if isinstance(choice, dict):
            name = choice["function"]["name"]
            if name not in {t["function"]["name"] for t in self.tools or []}:
                raise BadValue(f"function {short(name)} is not in {fns}", choice_param)
        elif choice == "required" and not self.tools:
            raise BadValue('"required" needs tools to call', "tool_choice")
        if choice == "required" or isinstance(choice, dict):         # the calls are decoded under a grammar
            for i, t in enumerate(self.tools or []):
                if choice == "required" or t["function"]["name"] == choice["function"]["name"]:
                    decodable(t["function"]["parameters"],
                              f"functions[{i}].parameters" if legacy else f"tools[{i}].function.parameters")
        if self.tools and self.response_format and choice not in (None, "none", "auto"):
            raise BadValue("a forced tool call and a response_format cannot both constrain the reply",
                           "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise BadValue("needs logprobs: true", "top_logprobs")
        calls: dict[str, int] = {}           # the ids of the latest assistant's calls -> its index
        pending: dict[str, int] = {}         # those not answered yet
        for i, m in enumerate(self.messages or []):
            if m.function_call is not None:
                if m.role != "assistant" or m.tool_calls:
                    raise BadValue("only an assistant message without tool_calls has a function_call",
                                   f"messages[{i}].function_call")
                m.tool_calls = [{"id": f"call_{i}", "type": "function", "function": m.function_call}]
            if m.role == "function":         # a legacy result: the tool result of the function_call before it
                if len(pending) != 1:
                    raise BadValue("a function message answers the assistant function_call right before it; "
                                   "there is none", f"messages[{i}].role")
                m.role, m.tool_call_id = "tool", next(iter(pending))
            if m.role == "tool":
                if m.tool_call_id is None:
                    raise BadValue("required: the id of the call this message answers", f"messages[{i}].tool_call_id")
                if m.tool_call_id not in calls:
                    raise BadValue(f"no preceding assistant tool call has id {short(m.tool_call_id)}",
                                   f"messages[{i}].tool_call_id")
                if m.tool_call_id not in pending:
                    raise BadValue(f"the call {short(m.tool_call_id)} is answered twice", f"messages[{i}].tool_call_id")
                del pending[m.tool_call_id]
            else:
                if pending:
                    raise BadValue(f"the tool call {short(next(iter(pending)))} has no tool message answering it "
                                   f"before messages[{i}]", f"messages[{next(iter(pending.values()))}].tool_calls")
                calls = {tc["id"]: i for tc in m.tool_calls} if m.role == "assistant" and m.tool_calls else {}
                pending = dict(calls)
            if m.role != "assistant" and m.tool_calls:
                raise BadValue("only assistant messages have tool calls", f"messages[{i}].tool_calls")
        if pending:
            raise BadValue(f"the tool call {short(next(iter(pending)))} has no tool message answering it",
                           f"messages[{next(iter(pending.values()))}].tool_calls")
        return self


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def chat_request(body: Any, settings: Any) -> dict[str, Any]:
    """The checked request: messages (plain role/content), max_tokens, sampling, stop, stream."""
    r = _validated(ChatRequest, body, settings)
    max_tokens = next((t for t in (r.max_completion_tokens, r.max_tokens) if t is not None),
                      settings.default_max_tokens)
    messages = []
    for m in r.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        messages.append(msg)
    choice = r.tool_choice or ("auto" if r.tools else "none")
    legacy = r.functions is not None or r.function_call is not None
    return {"model": r.model, "messages": messages, "tools": r.tools, "tool_choice": choice, "legacy": legacy,
            "parallel_tool_calls": r.parallel_tool_calls is not False and not legacy,
            "response_format": r.response_format, "logprobs": (r.top_logprobs or 0) if r.logprobs else None,
            "max_tokens": max_tokens, "stop": r.stop or [], "seed": r.seed,
            "temperature": settings.temperature if r.temperature is None else r.temperature,
            "top_p": r.top_p or 1.0, "stream": bool(r.stream),
            "include_usage": bool(r.stream_options and r.stream_options.get("include_usage"))}


# -- legacy completions ---------------------------------------------------------------------------------

COMPLETION_REFUSED = ("suffix", "logit_bias")    # they would change the answer: refused, not ignored


def _prompts(v: Any, most: int) -> list[str | list[int]]:
    """A prompt (a string or token ids) or a list of them, as a list of prompts."""
    if isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool)
                                                                 for t in v)):
        v = [v]
    if not isinstance(v, list) or not v:
        raise BadValue(f"expected a string, a list of strings, a list of token ids or a list of token-id lists "
                       f"(got {short(v)})")
    if len(v) > most:
        raise BadValue(f"at most {most} prompts per request (serve.max_prompts; got {len(v)})")
    out: list[str | list[int]] = []
    for i, p in enumerate(v):
        if isinstance(p, str):
            out.append(valid_text(p, f"[{i}]"))
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p):
            out.append(p)
        else:
            raise BadValue(f"expected a string or a non-empty list of token ids >= 0 (got {short(p)})", f"[{i}]")
    return out


class CompletionRequest(_Sampling):
    """A ``POST /v1/completions`` body (OpenAI's legacy completions; other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: Any = Field(None, validate_default=True)
    prompt: Any = Field(None, validate_default=True)
    suffix: Any = None
    logit_bias: Any = None
    best_of: Any = None
    n: Any = None
    echo: Any = None
    logprobs: Any = None
    max_tokens: Any = None
    stop: Any = None
    seed: Any = None
    temperature: Any = None
    top_p: Any = None
    stream: Any = None
    stream_options: Any = None

    @field_validator("n", "best_of")
    @classmethod
    def _n(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or v != 1 or not isinstance(v, int)):
            raise BadValue(f"only 1 is supported (got {short(v)})")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any, info: ValidationInfo) -> Any:
        return _prompts(v, info.context["settings"].max_prompts)

    @field_validator(*COMPLETION_REFUSED)
    @classmethod
    def _refused(cls, v: Any) -> Any:
        if v:
            raise BadValue("not supported by this server", code="unsupported_parameter")
        return v

    @field_validator("echo", "stream")
    @classmethod
    def _boolean(cls, v: Any) -> Any:
        return _flag(v)

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: Any) -> Any:
        return _number(v, int, 0, MAX_TOP)

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, v: Any, info: ValidationInfo) -> Any:
        return _number(v, int, 0, info.context["settings"].max_tokens)      # 0: score the prompt only (echo)


def _validated(model: type[BaseModel], body: Any, settings: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object (got {short(body)})", None, "invalid_request")
    try:
        return model.model_validate(body, context={"settings": settings})
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


def completion_request(body: Any, settings: Any) -> dict[str, Any]:
    """The checked ``/v1/completions`` request: prompts (strings or token-id lists), max_tokens (0 with
    ``echo`` scores the prompt only), sampling, stop, echo, logprobs (alternatives per token, or None)."""
    r = _validated(CompletionRequest, body, settings)
    return {"model": r.model, "prompts": r.prompt, "echo": bool(r.echo), "logprobs": r.logprobs,
            "max_tokens": settings.default_max_tokens if r.max_tokens is None else r.max_tokens,
            "stop": r.stop or [], "seed": r.seed,
            "temperature": settings.temperature if r.temperature is None else r.temperature,
            "top_p": r.top_p or 1.0, "stream": bool(r.stream),
            "include_usage": bool(r.stream_options and r.stream_options.get("include_usage"))}
