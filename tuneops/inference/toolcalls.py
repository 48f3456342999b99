"""Tool-call formats of real chat templates: how a model is told about tools, how it writes a call,
and how tuneops reads the call back out of generated text (issue 32). Training renders tool rows
through it (``tuneops.inference.chat``); the model stage records each model's format
(``chat.ensure_tool_format``).

A ``ToolFormat`` is data plus three operations:

* ``render(tokenizer, messages, tools)``: the conversation as the model's own template writes it, with
  ``tools`` (OpenAI ``tools[]``) and OpenAI-shaped assistant ``tool_calls`` / ``tool`` messages. The
  messages are normalised first: ``function.arguments`` (a JSON *string* in OpenAI's format) becomes a
  dict, because the templates print it with ``| tojson`` (a string would come out double-encoded), a
  ``None`` content becomes ``""``, and call ids become what the template insists on (Mistral: 9
  alphanumerics, derived deterministically from the OpenAI id). A format whose template has no tool
  syntax renders with ``template`` (``DEFAULT.template``, ChatML plus Hermes-style calls).
* ``parse(text) -> [{"name", "arguments"}]``: the calls in a reply (``arguments`` a dict; ``[]`` when
  it holds none), and ``split(text) -> (content, calls)``.
* ``content_prefix(text)``: while streaming, the part of the reply so far that is plain content for
  sure (before any call marker, less a tail that may still grow into one); ``may_call(text)`` says
  whether the text so far is, or may still become, a tool call.

Formats (``FORMATS``; ``bench/results/tool-templates.md`` has the template findings):

========== ============================================ ======================================================
name       families / templates                         a call as the model writes it
========== ============================================ ======================================================
hermes     Qwen2.5-Instruct, Hermes; tuneops default    ``<tool_call>\\n{"name": n, "arguments": {...}}\\n</tool_call>``
                                                        (one block per call, parallel = several blocks)
llama3     Llama 3.1 / 3.2 / 3.3 Instruct (JSON calls)  the whole reply ``{"name": n, "parameters": {...}}``
                                                        (one call; ``<|python_tag|>`` may precede it)
mistral    Mistral-7B-Instruct-v0.3 (and Nemo)          ``[TOOL_CALLS] [{"name": n, "arguments": {...}, "id": "abcdefgh1"}]``
phi4-mini  Phi-4-mini-instruct                          ``<|tool_call|>[{"name": n, "arguments": {...}}]<|/tool_call|>``
                                                        (its template renders neither tools nor calls: tools go in
                                                        the system message's ``tools`` field, calls in ``content``)
========== ============================================ ======================================================

``detect(tokenizer)`` finds the format of a tokenizer's own template by round trip (render a probe
call, see which format parses it back), without reading the template's text for family markers;
``None`` means the template has no tool syntax and the documented default applies.
``supports(fmt, tokenizer)`` checks a format a family spec names (Phi-4-mini's cannot be detected: its
template takes no ``tools``).

The default for a template without tool syntax, as the model stage writes it into a model's saved
template: ``with_default_tools(template)``, the model's own template behind a Jinja preamble that
rewrites the conversation into plain turns in the Hermes syntax (tools in the system message, calls as
``<tool_call>`` blocks in the assistant's content, results as ``<tool_response>`` blocks in a user
turn), so every family keeps its own turn markers (Gemma ``<start_of_turn>``, Phi-3 ``<|user|>``, ChatML)
and the calls parse with ``HERMES`` (``DEFAULT_SYNTAX``). Over ChatML it writes exactly what
``DEFAULT_TEMPLATE`` writes; a conversation without tools renders exactly as the template did.

Decoding note: several markers are special tokens (Llama's ``<|python_tag|>``, Mistral's
``[TOOL_CALLS]``, Phi-4's ``<|tool_call|>``); text handed to ``parse`` must be decoded with
``skip_special_tokens=False`` (less the end-of-turn token), or the marker is lost.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any

Call = dict[str, Any]   # {"name": str, "arguments": dict}

# The documented default for a template without tool syntax: ChatML (as tuneops.inference.chat.CHATML) plus
# Qwen2.5's Hermes-style tool syntax (tools in the system turn inside <tools></tools>, calls in
# <tool_call></tool_call>, results in a user turn inside <tool_response></tool_response>). A
# conversation without tools renders exactly as tuneops.inference.chat.CHATML does (no default system prompt).
DEFAULT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] + '\\n\\n' }}\n"
    "    {%- endif %}\n"
    "    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- '\\n' }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}\n"
    "{%- elif messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.role == 'system' and loop.first %}\n"
    "    {%- elif message.role == 'assistant' and message.tool_calls %}\n"
    "        {{- '<|im_start|>assistant' }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == 'tool' %}\n"
    "        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}\n"
    "        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# The preamble of with_default_tools: the conversation rewritten into plain turns (the same text as
# DEFAULT_TEMPLATE writes), then `messages` rebound and `tools` cleared for the model's own template.
_DEFAULT_TOOLS_PREAMBLE = (
    "{%- set _tuneops = namespace(msgs=[], tools='', last_tool=false, text='') -%}"
    "{%- if tools -%}"
    "{%- set _tuneops.tools = '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -%}"
    "{%- for _tool in tools -%}{%- set _tuneops.tools = _tuneops.tools + '\\n' + (_tool | tojson) -%}{%- endfor -%}"
    "{%- set _tuneops.tools = _tuneops.tools + '\\n</tools>\\n\\nFor each function call, return a json object with "
    "function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call>' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set _tuneops.msgs = [{'role': 'system', 'content': messages[0]['content'] + '\\n\\n' + _tuneops.tools}] -%}"
    "{%- else -%}{%- set _tuneops.msgs = [{'role': 'system', 'content': _tuneops.tools}] -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- for _m in messages -%}"
    "{%- if tools and loop.first and _m['role'] == 'system' -%}"
    "{%- elif _m['role'] == 'assistant' and _m.tool_calls -%}"
    "{%- set _tuneops.text = _m['content'] if _m['content'] else '' -%}"
    "{%- for _c in _m.tool_calls -%}"
    "{%- set _f = _c.function if _c.function is defined else _c -%}"
    "{%- set _a = _f.arguments if _f.arguments is string else (_f.arguments | tojson) -%}"
    "{%- set _tuneops.text = _tuneops.text + ('\\n' if _tuneops.text else '') + '<tool_call>\\n{\"name\": \"' + "
    "_f.name + '\", \"arguments\": ' + _a + '}\\n</tool_call>' -%}"
    "{%- endfor -%}"
    "{%- set _tuneops.msgs = _tuneops.msgs + [{'role': 'assistant', 'content': _tuneops.text}] -%}"
    "{%- elif _m['role'] == 'tool' -%}"
    "{%- set _r = '<tool_response>\\n' + _m['content'] + '\\n</tool_response>' -%}"
    "{%- if _tuneops.last_tool -%}"
    "{%- set _tuneops.msgs = _tuneops.msgs[:-1] + [{'role': 'user', 'content': _tuneops.msgs[-1]['content'] + "
    "'\\n' + _r}] -%}"
    "{%- else -%}{%- set _tuneops.msgs = _tuneops.msgs + [{'role': 'user', 'content': _r}] -%}{%- endif -%}"
    "{%- else -%}{%- set _tuneops.msgs = _tuneops.msgs + [_m] -%}"
    "{%- endif -%}"
    "{%- set _tuneops.last_tool = _m['role'] == 'tool' -%}"
    "{%- endfor -%}"
    "{%- set messages = _tuneops.msgs -%}{%- set tools = none %}"
)
DEFAULT_TOOLS_MARK = "{#- tuneops default tool syntax (tuneops.inference.toolcalls.with_default_tools) -#}"


def with_default_tools(template: str) -> str:
    """``template`` with tuneops' default tool syntax (the module doc): what the model stage writes
    into a model whose template has none. Idempotent."""
    if template.startswith(DEFAULT_TOOLS_MARK):
        return template
    return DEFAULT_TOOLS_MARK + _DEFAULT_TOOLS_PREAMBLE + template


PROBE_TOOL = {"type": "function", "function": {
    "name": "tuneops_probe_fn", "description": "probe",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}
PROBE_CALL: Call = {"name": "tuneops_probe_fn", "arguments": {"q": "probe value"}}


class ToolCallError(ValueError):
    """Text that claims a tool call (its marker is there) but does not hold a well-formed one."""


def _arguments(value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ToolCallError(f"{where}: arguments are not JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ToolCallError(f"{where}: arguments must be a JSON object, got {type(value).__name__}")
    return value


def _json_at(text: str, pos: int, where: str) -> tuple[Any, int]:
    """The JSON value starting at ``pos`` (after whitespace) and the index after it."""
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    try:
        return json.JSONDecoder().raw_decode(text, pos)
    except json.JSONDecodeError as exc:
        raise ToolCallError(f"{where}: not a JSON value at character {pos} ({exc.msg})") from None


def _tail_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str                 # marker opening a call block ("" = the whole reply is the call)
    end: str                   # marker closing a block ("" = none: the block runs to the end of the reply)
    arguments_key: str         # "arguments" | "parameters"
    many: bool                 # a block holds a JSON array of calls (else one object)
    parallel: bool             # the template can write more than one call in a reply
    template_renders_calls: bool = True   # False: the caller writes calls into content (format_calls)
    tools_in_system_field: bool = False   # tools go in the system message's "tools" field (Phi-4-mini)
    id_chars: int = 0          # call ids the template requires (Mistral: 9 alphanumerics)
    template: str | None = None  # the chat template to render with when the model's own has no tool syntax
    lead_markers: tuple[str, ...] = ()    # optional tokens a bare-JSON call may start with (<|python_tag|>)
    end_tokens: tuple[str, ...] = ()      # special tokens other than the end-of-turn marker that end a reply in
                                          # this format where the template writes them (Llama 3.1's <|eom_id|>:
                                          # a turn that waits for a tool result); chat.stop_ids adds them
    doc: str = ""

    # -- writing ------------------------------------------------------------------------------------
    def format_calls(self, calls: list[Call]) -> str:
        """The text a model writes for ``calls`` in this format (what ``parse`` reads back)."""
        if not calls:
            return ""
        if not self.parallel and len(calls) > 1:
            raise ToolCallError(f"{self.name}: the format writes one call per reply, got {len(calls)}")
        objs = [{"name": c["name"], self.arguments_key: _arguments(c["arguments"], c["name"])} for c in calls]
        if self.many:
            return f"{self.start}{json.dumps(objs, ensure_ascii=False)}{self.end}"
        if self.start:
            return "\n".join(f"{self.start}\n{json.dumps(o, ensure_ascii=False)}\n{self.end}" for o in objs)
        return json.dumps(objs[0], ensure_ascii=False)

    def normalise(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                  ) -> list[dict[str, Any]]:
        """OpenAI chat messages as the templates want them (see the module doc)."""
        out = []
        for i, msg in enumerate(copy.deepcopy(messages)):
            if msg.get("content") is None:
                msg["content"] = ""
            if "tool_calls" in msg and not msg["tool_calls"]:
                del msg["tool_calls"]        # Llama's template tests for the key, not its value
            if msg.get("role") == "assistant" and msg.get("tool_calls"):
                calls = []
                for j, tc in enumerate(msg["tool_calls"]):
                    fn = tc.get("function", tc)
                    call = {"type": "function", "function": {
                        "name": fn["name"], "arguments": _arguments(fn.get("arguments", {}), f"messages[{i}].tool_calls[{j}]")}}
                    if tc.get("id") is not None:
                        call["id"] = self.call_id(tc["id"])
                    calls.append(call)
                msg["tool_calls"] = calls
                if not self.template_renders_calls:
                    text = self.format_calls([c["function"] for c in calls])
                    msg["content"] = f"{msg['content']}{text}" if msg["content"] else text
                    del msg["tool_calls"]
            if msg.get("role") == "tool" and msg.get("tool_call_id") is not None:
                msg["tool_call_id"] = self.call_id(msg["tool_call_id"])
            out.append(msg)
        if self.tools_in_system_field and tools:
            declared = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
            if out and out[0]["role"] == "system":
                out[0]["tools"] = declared
            else:
                out.insert(0, {"role": "system", "content": "", "tools": declared})
        return out

    def call_id(self, openai_id: str) -> str:
        """The id as the template wants it (unchanged unless the format fixes its shape)."""
        if not self.id_chars:
            return openai_id
        if len(openai_id) == self.id_chars and openai_id.isalnum():
            return openai_id
        return hashlib.sha256(openai_id.encode()).hexdigest()[:self.id_chars]

    def render(self, tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = False, chat_template: str | None = None) -> str:
        """The conversation as text, through ``tokenizer.apply_chat_template(..., tools=...)``
        (``chat_template``, else this format's ``template`` when it has one, else the tokenizer's own)."""
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        template = chat_template or self.template
        if template:
            kwargs["chat_template"] = template
        if tools and not self.tools_in_system_field:
            kwargs["tools"] = tools
        return tokenizer.apply_chat_template(self.normalise(messages, tools), **kwargs)

    # -- reading ------------------------------------------------------------------------------------
    def _lead(self, text: str) -> str:
        s = text.lstrip()
        for m in self.lead_markers:
            if s.startswith(m):
                return s[len(m):].lstrip()
        return s

    def split(self, text: str) -> tuple[str, list[Call]]:
        """``(content, calls)`` of a complete reply; raises ``ToolCallError`` for a malformed call."""
        if not self.start:
            body = self._lead(text)
            if not body.startswith(("{", "[")):
                return text, []
            value, end = _json_at(body, 0, f"{self.name} call")
            if body[end:].strip():
                return text, []          # JSON followed by prose: an answer that happens to start with JSON
            return "", self._calls(value, f"{self.name} call")
        content: list[str] = []
        calls: list[Call] = []
        pos = 0
        while True:
            at = text.find(self.start, pos)
            if at < 0:
                content.append(text[pos:])
                break
            content.append(text[pos:at])
            where = f"{self.name} call {len(calls) + 1}"
            value, after = _json_at(text, at + len(self.start), where)
            calls += self._calls(value, where)
            pos = after
            rest = text[pos:]
            stripped = rest.lstrip()
            if self.end and stripped.startswith(self.end):
                pos += len(rest) - len(stripped) + len(self.end)
        return "".join(content).strip(), calls

    def parse(self, text: str) -> list[Call]:
        return self.split(text)[1]

    def _calls(self, value: Any, where: str) -> list[Call]:
        items = value if isinstance(value, list) else [value]
        if not self.many and isinstance(value, list) and self.start:
            raise ToolCallError(f"{where}: expected one JSON object per block, got an array")
        out = []
        for k, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ToolCallError(f"{where}[{k}]: a call is an object with a string 'name'")
            key = self.arguments_key if self.arguments_key in item else "arguments" if "arguments" in item else "parameters"
            out.append({"name": item["name"], "arguments": _arguments(item.get(key, {}), f"{where}[{k}]")})
        return out

    def content_prefix(self, text: str) -> str:
        """Streaming: the part of ``text`` that is plain content for sure."""
        if not self.start:
            s = text.lstrip()
            if not s:
                return ""
            if s.startswith(("{", "[")) or any(s.startswith(m) or m.startswith(s) for m in self.lead_markers):
                return ""                # may be (the start of) a call: hold it back until the reply ends
            return text
        at = text.find(self.start)
        if at >= 0:
            return text[:at]
        return text[:len(text) - _tail_prefix(text, self.start)]

    def may_call(self, text: str) -> bool:
        """Streaming: the reply so far is, or may still become, a tool call."""
        return self.content_prefix(text) != text

    # -- constrained decoding -----------------------------------------------------------------------
    def call_schema(self, functions: list[dict[str, Any]], parallel: bool = False) -> dict[str, Any]:
        """JSON schema of the JSON this format writes for a call to one of ``functions`` (OpenAI
        ``tools[].function``), for a grammar that wraps it in ``start`` / ``end``."""
        def one(f: dict[str, Any]) -> dict[str, Any]:
            props = {"name": {"const": f["name"]},
                     self.arguments_key: f.get("parameters") or {"type": "object", "properties": {}}}
            if self.id_chars:
                props["id"] = {"type": "string", "pattern": f"^[a-zA-Z0-9]{{{self.id_chars}}}$"}
            return {"type": "object", "properties": props, "required": ["name", self.arguments_key],
                    "additionalProperties": False}
        call = one(functions[0]) if len(functions) == 1 else {"anyOf": [one(f) for f in functions]}
        if self.many:
            return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}
        return call


HERMES = ToolFormat(
    "hermes", "<tool_call>", "</tool_call>", "arguments", many=False, parallel=True,
    doc="Qwen2.5-Instruct / Hermes: tools as JSON lines in <tools></tools> in the system turn; each call a "
        "<tool_call>\\n{json}\\n</tool_call> block; results in a user turn as <tool_response> blocks.")
LLAMA3 = ToolFormat(
    "llama3", "", "", "parameters", many=False, parallel=False, lead_markers=("<|python_tag|>",),
    end_tokens=("<|eom_id|>",),
    doc="Llama 3.1/3.2/3.3 Instruct JSON tool calling: tools as indented JSON in the first user turn "
        "(or the system turn); the reply is one JSON object {\"name\", \"parameters\"} ending with <|eot_id|>; "
        "results in an ipython turn.")
MISTRAL = ToolFormat(
    "mistral", "[TOOL_CALLS]", "", "arguments", many=True, parallel=True, id_chars=9,
    doc="Mistral-7B-Instruct-v0.3: [AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS] before the last user turn; "
        "calls as [TOOL_CALLS] [{name, arguments, id}] then </s>; results as "
        "[TOOL_RESULTS] {\"content\": ..., \"call_id\": ...}[/TOOL_RESULTS].")
PHI4_MINI = ToolFormat(
    "phi4-mini", "<|tool_call|>", "<|/tool_call|>", "arguments", many=True, parallel=True,
    template_renders_calls=False, tools_in_system_field=True,
    doc="Phi-4-mini-instruct: tools as a JSON string in the system message's 'tools' field, rendered as "
        "<|tool|>[...]<|/tool|>; calls written by the model as <|tool_call|>[...]<|/tool_call|>; the template "
        "renders tool results as an ordinary <|tool|> turn.")
DEFAULT = ToolFormat(
    "chatml-hermes", "<tool_call>", "</tool_call>", "arguments", many=False, parallel=True,
    template=DEFAULT_TEMPLATE,
    doc="tuneops' documented default for a template without tool syntax: ChatML plus the Hermes syntax "
        "(DEFAULT_TEMPLATE); a conversation without tools renders as tuneops.inference.chat.CHATML.")

FORMATS: dict[str, ToolFormat] = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, PHI4_MINI, DEFAULT)}
DEFAULT_SYNTAX = HERMES     # the format of a template given tuneops' default syntax (with_default_tools)


def get(name: str) -> ToolFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown tool format {name!r} (known: {', '.join(FORMATS)})") from None


def probe_messages() -> list[dict[str, Any]]:
    return [{"role": "user", "content": "Call the probe."},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call0probe", "type": "function",
                 "function": {"name": PROBE_CALL["name"], "arguments": json.dumps(PROBE_CALL["arguments"])}}]}]


def assistant_text(fmt: ToolFormat, tokenizer: Any, messages: list[dict[str, Any]],
                   tools: list[dict[str, Any]] | None = None, chat_template: str | None = None) -> str:
    """What the template writes for the conversation's last (assistant) message: the full render less
    the render of the conversation before it with the generation prompt. Mistral v0.3's template puts
    the system prompt into the *last* user turn only, so a conversation that ends with a reply is not its
    prompt plus that reply; then the reply is what differs from the same conversation ending with a
    placeholder reply."""
    import os

    full = fmt.render(tokenizer, messages, tools, chat_template=chat_template)
    head = fmt.render(tokenizer, messages[:-1], tools, add_generation_prompt=True, chat_template=chat_template)
    if full.startswith(head):
        return full[len(head):]
    other = fmt.render(tokenizer, messages[:-1] + [{"role": messages[-1]["role"], "content": "\x00"}], tools,
                       chat_template=chat_template)
    return full[len(os.path.commonprefix([full, other])):]


def supports(fmt: ToolFormat, tokenizer: Any, chat_template: str | None = None) -> bool:
    """The template writes ``fmt``: a probe conversation's prompt declares the probe tool, and the
    reply it renders parses back to the probe call."""
    try:
        prompt = fmt.render(tokenizer, probe_messages()[:-1], [PROBE_TOOL], add_generation_prompt=True,
                            chat_template=chat_template)
        text = assistant_text(fmt, tokenizer, probe_messages(), [PROBE_TOOL], chat_template=chat_template)
        return PROBE_TOOL["function"]["name"] in prompt and fmt.parse(_strip_turn_end(text, tokenizer)) == [PROBE_CALL]
    except Exception:  # noqa: BLE001 - a template that cannot render it does not write this format
        return False


def detect(tokenizer: Any, chat_template: str | None = None) -> ToolFormat | None:
    """The format of the tokenizer's template (or ``chat_template``): the one whose ``parse`` reads back a
    probe call the template rendered; ``None`` when the template writes no tool call (no tool syntax)."""
    for fmt in (HERMES, MISTRAL, LLAMA3):
        try:
            text = assistant_text(fmt, tokenizer, probe_messages(), [PROBE_TOOL], chat_template=chat_template)
        except Exception:  # noqa: BLE001 - a template that cannot render a tool call has no tool syntax
            continue
        if PROBE_CALL["name"] not in text:
            return None
        try:
            if fmt.parse(_strip_turn_end(text, tokenizer)) == [PROBE_CALL]:
                return fmt
        except ToolCallError:
            continue
    return None


def _strip_turn_end(text: str, tokenizer: Any) -> str:
    """The reply less the end-of-turn / EOS text a template appends after it."""
    ends = {t for t in (getattr(tokenizer, "eos_token", None),) if t}
    ends |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    s = text.rstrip()
    changed = True
    while changed:
        changed = False
        for e in ends:
            if s.endswith(e) and not any(m and s.endswith(m) for f in FORMATS.values() for m in (f.end,)):
                s = s[:-len(e)].rstrip()
                changed = True
    return s


def reply_text(tokenizer: Any, token_ids: list[int]) -> str:
    """Generated ids as the text ``parse`` expects: special tokens kept (markers are special tokens in
    several families), the trailing end-of-turn / EOS removed."""
    return _strip_turn_end(tokenizer.decode(token_ids, skip_special_tokens=False), tokenizer)
