"""Tool calling in chat records: the checks of OpenAI's full fine-tuning row, one definition that
the chat format's checker (``formats._chat``) runs for every caller: the Great Expectations gate
(``validate``), ``tuneops data add``, ``ingest`` (bundled scenarios) and the jobs API upload.

A row may carry, besides ``messages``:

* ``tools``: ``[{"type": "function", "function": {"name", "description"?, "parameters"?: JSON Schema
  of an object, "strict"?}}]``; the legacy ``functions``: ``[{"name", "description"?, "parameters"?}]``;
* ``parallel_tool_calls``: a boolean (``false``: at most one call per assistant turn).

Messages: roles ``system``, ``user``, ``assistant``, ``tool`` and the legacy ``function``; an optional
``name`` on any of them. An assistant message may carry ``tool_calls`` (``[{"id", "type": "function",
"function": {"name", "arguments": a JSON string}}]``) or the legacy ``function_call`` (``{"name",
"arguments"}``), and then its ``content`` may be null or absent. A ``tool`` message answers one call
of the assistant turn right before it (``tool_call_id``; several results of one turn follow each
other); a ``function`` message answers the ``function_call`` before it (``name``).

Each problem is ``(FIELD, RULE, message)`` (the gate adds ``PATH:LINE``):

==============================================  ====================  =====================================
field                                           rule                  when
==============================================  ====================  =====================================
``tools`` / ``tools[k]...`` / ``functions[k]``  required, type, enum  malformed declarations
``tools[k].function.name``                      name, duplicate       not ``[A-Za-z0-9_-]{1,64}``; declared twice
``tools[k].function.parameters``                schema                not a valid JSON Schema, or not of an object
``messages[i].tool_calls[j].function.arguments`` json                 arguments are not JSON (strict: no NaN)
                                                max_depth             nested deeper than 64 levels
                                                type                  not a string / not a JSON object
                                                arguments_schema      do not satisfy the function's ``parameters``
``messages[i].tool_calls[j].function.name``     unknown_function      the function is not declared in ``tools``
``messages[i].tool_calls[j].id``                duplicate_id          the id is used by another call of the row
``messages[i].tool_calls``                      parallel_tool_calls   several calls, ``parallel_tool_calls: false``
``messages[i].role``                            tool_order            a tool result with no call right before it
``messages[i].tool_call_id``                    tool_call_id          no call with that id in the turn before it
                                                duplicate_result      that call already has a result
``messages[i].name`` (role ``function``)        function_name         answers another function than was called
==============================================  ====================  =====================================
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

Issue = tuple[str, str, str]

ROLES = ("system", "user", "assistant", "tool", "function")
RESULT_ROLES = ("tool", "function")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_ARGUMENT_DEPTH = 64        # JSON nesting of one call's arguments (as records.MAX_DEPTH)


@lru_cache(maxsize=4096)
def _compiled(schema_json: str) -> tuple[Any, str | None]:
    """(validator, None) for a valid JSON Schema text, else (None, the reason)."""
    from jsonschema import Draft202012Validator, exceptions, validators

    schema = json.loads(schema_json)
    cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except exceptions.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return None, f"{exc.message}" + (f" (at {where})" if where else "")
    return cls(schema), None


def _function(fn: Any, f: str, out: list[Issue], seen: dict[str, str], functions: dict[str, Any]) -> None:
    if not isinstance(fn, dict):
        out.append((f, "type", "a function must be an object with a 'name'"))
        return
    name = fn.get("name")
    if name is None:
        out.append((f"{f}.name", "required", "missing 'name'"))
    elif not isinstance(name, str) or not _NAME.match(name):
        out.append((f"{f}.name", "name", f"function name must be 1-64 letters, digits, '_' or '-' (got {name!r})"))
        name = None
    elif name in seen:
        out.append((f"{f}.name", "duplicate", f"function {name!r} is already declared in {seen[name]}"))
    if "description" in fn and fn["description"] is not None and not isinstance(fn["description"], str):
        out.append((f"{f}.description", "type", "description must be a string"))
    validator = None
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            out.append((f"{f}.parameters", "type", f"parameters must be a JSON Schema object "
                                                   f"(got {type(params).__name__})"))
            params = None
        else:
            validator, error = _compiled(json.dumps(params, sort_keys=True))
            if error:
                out.append((f"{f}.parameters", "schema", f"parameters is not a valid JSON Schema: {error}"))
            elif params.get("type", "object") != "object":
                out.append((f"{f}.parameters", "schema", f"parameters must describe the arguments object "
                                                         f"(type 'object'), got type {params.get('type')!r}"))
                validator = None
    if isinstance(name, str) and name not in seen:
        seen[name] = f
        functions[name] = validator


def check_declarations(obj: dict[str, Any], out: list[Issue]) -> dict[str, Any]:
    """Check ``tools``, ``functions`` and ``parallel_tool_calls``; the declared functions, name ->
    the argument validator (None when the function takes any object)."""
    functions: dict[str, Any] = {}
    seen: dict[str, str] = {}
    tools = obj.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            out.append(("tools", "type", "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}"))
        else:
            for k, tool in enumerate(tools):
                f = f"tools[{k}]"
                if not isinstance(tool, dict):
                    out.append((f, "type", "each tool must be an object"))
                    continue
                if tool.get("type") != "function":
                    out.append((f"{f}.type", "required" if "type" not in tool else "enum",
                                f"tool type must be 'function' (got {tool.get('type')!r})"))
                if "function" not in tool:
                    out.append((f"{f}.function", "required", "missing 'function'"))
                    continue
                _function(tool["function"], f"{f}.function", out, seen, functions)
    legacy = obj.get("functions")
    if legacy is not None:
        if not isinstance(legacy, list):
            out.append(("functions", "type", "'functions' must be a list of {\"name\", \"parameters\"}"))
        else:
            for k, fn in enumerate(legacy):
                _function(fn, f"functions[{k}]", out, seen, functions)
    ptc = obj.get("parallel_tool_calls")
    if ptc is not None and not isinstance(ptc, bool):
        out.append(("parallel_tool_calls", "type", f"parallel_tool_calls must be true or false (got {ptc!r})"))
    return functions


def _arguments(value: Any, f: str, name: str | None, functions: dict[str, Any], out: list[Issue]) -> None:
    from .records import decode_json_line

    if value is None:
        out.append((f, "required", "missing 'arguments' (a JSON string)"))
        return
    if not isinstance(value, str):
        out.append((f, "type", f"arguments must be a JSON string (got {type(value).__name__})"))
        return
    args, err = decode_json_line(value.encode("utf-8", "surrogatepass"), MAX_ARGUMENT_DEPTH)
    if err:
        if err[0] == "max_depth":
            out.append((f, "max_depth", f"arguments are {err[1]}"))
        else:
            out.append((f, "json", f"arguments are not JSON: {err[1].removeprefix('invalid JSON: ')}"))
        return
    if not isinstance(args, dict):
        out.append((f, "type", f"arguments must encode a JSON object (got {type(args).__name__})"))
        return
    validator = functions.get(name) if name is not None else None
    if validator is None:
        return
    try:
        from jsonschema.exceptions import best_match

        error = best_match(validator.iter_errors(args))
    except Exception as exc:  # noqa: BLE001 - e.g. an unresolvable $ref: the row cannot be checked
        out.append((f, "arguments_schema", f"arguments could not be checked against the parameters of "
                                           f"{name!r}: {type(exc).__name__}: {str(exc)[:200]}"))
        return
    if error is not None:
        where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        out.append((f, "arguments_schema", f"arguments do not match the parameters of {name!r}: "
                                           f"{error.message[:300]}" + (f" (at arguments{where})" if where else "")))


class CallTracker:
    """Follows a conversation's calls and results in order (``message`` per message)."""

    def __init__(self, functions: dict[str, Any], parallel: bool = True):
        self.functions, self.parallel = functions, parallel
        self.ids: dict[str, str] = {}              # call id -> the field that first used it
        self.group: dict[str, str] | None = None   # ids of the calls of the assistant turn being answered
        self.group_at = -1
        self.answered: dict[str, int] = {}
        self.legacy: str | None = None             # the function_call being answered (legacy)
        self.with_calls: set[int] = set()          # assistant messages with at least one call

    def called(self, i: int) -> bool:
        return i in self.with_calls

    def _call(self, name: Any, args: Any, f: str, out: list[Issue]) -> str | None:
        if name is None:
            out.append((f"{f}.name", "required", "missing 'name'"))
            return None
        if not isinstance(name, str):
            out.append((f"{f}.name", "type", f"name must be a string (got {type(name).__name__})"))
            return None
        if name not in self.functions:
            declared = ", ".join(self.functions) or "none"
            out.append((f"{f}.name", "unknown_function", f"calls {name!r}, which is not declared in tools "
                                                         f"(declared: {declared})"))
            _arguments(args, f"{f}.arguments", None, self.functions, out)
            return name
        _arguments(args, f"{f}.arguments", name, self.functions, out)
        return name

    def _tool_calls(self, i: int, calls: Any, out: list[Issue]) -> None:
        f = f"messages[{i}].tool_calls"
        if not isinstance(calls, list) or not calls:
            out.append((f, "type", "tool_calls must be a non-empty list"))
            return
        self.with_calls.add(i)
        if len(calls) > 1 and not self.parallel:
            out.append((f, "parallel_tool_calls", f"{len(calls)} calls in one turn, but parallel_tool_calls is false"))
        for j, tc in enumerate(calls):
            fj = f"{f}[{j}]"
            if not isinstance(tc, dict):
                out.append((fj, "type", "each tool call must be an object"))
                continue
            cid = tc.get("id")
            if cid is None:
                out.append((f"{fj}.id", "required", "missing 'id'"))
            elif not isinstance(cid, str) or not cid.strip():
                out.append((f"{fj}.id", "type", "id must be a non-empty string"))
            elif cid in self.ids:
                out.append((f"{fj}.id", "duplicate_id", f"call id {cid!r} is already used by {self.ids[cid]}"))
            else:
                self.ids[cid] = fj
                assert self.group is not None
                self.group[cid] = str(tc.get("function", {}).get("name") if isinstance(tc.get("function"), dict)
                                      else None)
            if "type" in tc and tc["type"] != "function":
                out.append((f"{fj}.type", "enum", f"tool call type must be 'function' (got {tc['type']!r})"))
            fn = tc.get("function")
            if fn is None:
                out.append((f"{fj}.function", "required", "missing 'function'"))
            elif not isinstance(fn, dict):
                out.append((f"{fj}.function", "type", "function must be an object with 'name' and 'arguments'"))
            else:
                self._call(fn.get("name"), fn.get("arguments"), f"{fj}.function", out)

    def message(self, i: int, m: dict[str, Any], role: Any, out: list[Issue]) -> None:
        f = f"messages[{i}]"
        if role == "assistant":
            self.group, self.legacy, self.group_at = None, None, i
            if "tool_calls" in m:
                self.group, self.answered = {}, {}
                self._tool_calls(i, m["tool_calls"], out)
            if "function_call" in m:
                fc = m["function_call"]
                if not isinstance(fc, dict):
                    out.append((f"{f}.function_call", "type", "function_call must be an object with 'name' and "
                                                              "'arguments'"))
                else:
                    self.with_calls.add(i)
                    self.legacy = self._call(fc.get("name"), fc.get("arguments"), f"{f}.function_call", out)
            return
        if role == "tool":
            if self.group is None:
                out.append((f"{f}.role", "tool_order", "a tool result must follow the assistant message whose "
                                                       "tool_calls it answers (or another result of that turn)"))
                return
            cid = m.get("tool_call_id")
            if cid is None:
                out.append((f"{f}.tool_call_id", "required", "missing 'tool_call_id'"))
            elif not isinstance(cid, str):
                out.append((f"{f}.tool_call_id", "type", "tool_call_id must be a string"))
            elif cid not in self.group:
                known = ", ".join(repr(c) for c in self.group) or "none"
                elsewhere = f"; {cid!r} is a call of {self.ids[cid].split('.tool_calls')[0]}" if cid in self.ids else ""
                out.append((f"{f}.tool_call_id", "tool_call_id", f"no call with id {cid!r} in messages[{self.group_at}] "
                                                                 f"(its call ids: {known}){elsewhere}"))
            elif cid in self.answered:
                out.append((f"{f}.tool_call_id", "duplicate_result", f"call {cid!r} already has a result in "
                                                                     f"messages[{self.answered[cid]}]"))
            else:
                self.answered[cid] = i
            return
        if role == "function":
            name = m.get("name")
            if self.legacy is None:
                out.append((f"{f}.role", "tool_order", "a function result must follow the assistant message "
                                                       "with its function_call"))
            elif name is None:
                out.append((f"{f}.name", "required", "a function result needs the 'name' of the function"))
            elif name != self.legacy:
                out.append((f"{f}.name", "function_name", f"result of {name!r}, but messages[{self.group_at}] "
                                                          f"called {self.legacy!r}"))
            self.group = None
            return
        self.group, self.legacy = None, None        # a user / system turn ends the results


def replies(messages: list[Any]) -> int:
    """Assistant turns with something to learn: non-empty content or tool calls."""
    return sum(isinstance(m, dict) and m.get("role") == "assistant"
               and (bool(m.get("tool_calls")) or bool(m.get("function_call"))
                    or (isinstance(m.get("content"), str) and bool(m["content"].strip())))
               for m in messages)


# -- what the duplicate keys and sizes see of tool rows --------------------------------------------

def key_text(m: Any) -> str:
    """A message's tool part (calls, result id, name) as text: "" for a plain message, so the
    duplicate keys of rows without tools are what they always were."""
    if not isinstance(m, dict):
        return ""
    parts = []
    for key in ("tool_calls", "function_call", "tool_call_id"):
        if key in m:
            parts.append(json.dumps(m[key], ensure_ascii=False, sort_keys=True, default=str))
    if m.get("role") in RESULT_ROLES and "name" in m:
        parts.append(str(m["name"]))
    return (" " + " ".join(parts)) if parts else ""


def declared_text(r: dict[str, Any]) -> str:
    """The row's declarations (tools, functions, parallel_tool_calls) as text ("" when none)."""
    decl = {k: r[k] for k in ("tools", "functions", "parallel_tool_calls") if r.get(k) is not None}
    return (" \x1d" + json.dumps(decl, ensure_ascii=False, sort_keys=True, default=str)) if decl else ""


def record_tools(r: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The functions a row may call, as OpenAI ``tools`` (legacy ``functions`` wrapped): what the
    conversation is rendered with (the same as ``tuneops.inference.chat.record_tools``, which the
    training side uses; the data layer does not import the chat layer here)."""
    tools = [t for t in r.get("tools") or [] if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    tools += [{"type": "function", "function": f} for f in r.get("functions") or [] if isinstance(f, dict)]
    return tools or None
