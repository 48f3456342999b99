"""tuneops/inference/toolcalls.py: tool-call formats of real chat templates (tests/fixtures/chat_templates/, the
``*-tools.jinja`` files name their sources in a header comment), rendered through
``apply_chat_template(..., tools=...)`` with tiny byte-level BPE tokenizers trained here (no weights),
parsed back, tokenized and decoded, and streamed character by character."""
from __future__ import annotations

import json

import pytest

from tests.family_models import CASES, FamilyCase, build_tokenizer
from tuneops.inference import toolcalls
from tuneops.inference.chat import CHATML

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add_todo", "description": "Add a todo item",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"},
                                                        "tags": {"type": "array", "items": {"type": "string"}}},
                       "required": ["title"]}}},
]
CALL_A = {"name": "get_weather", "arguments": {"city": "Zürich \"old town\"", "unit": "celsius"}}
CALL_B = {"name": "add_todo", "arguments": {"title": "buy milk", "tags": ["home", "x<y>z"]}}


def openai_calls(*calls: dict) -> list[dict]:
    """Calls as OpenAI writes them: ids, type, arguments as a JSON string."""
    return [{"id": f"call_{i}_abcdefgh", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}} for i, c in enumerate(calls)]


def conversation(*calls: dict) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Zurich?"},
            {"role": "assistant", "content": None, "tool_calls": openai_calls(*calls)}]


# tiny tokenizers with each family's special tokens (markers that are special tokens in the real
# vocabularies are special here too) and the real template
LLAMA31 = FamilyCase("llama", "llama31-tools", CASES["llama3"].specials + ("<|python_tag|>", "<|eom_id|>"),
                     "<|begin_of_text|>", "<|eot_id|>", None, "<|eot_id|>", ("<|end_of_text|>", "<|eot_id|>"))
QWEN25 = FamilyCase("qwen2", "qwen25-tools", CASES["qwen2"].specials + ("<tool_call>", "</tool_call>"),
                    None, "<|im_end|>", "<|endoftext|>", "<|im_end|>", ("<|im_end|>", "<|endoftext|>"))
MISTRAL = FamilyCase("mistral", "mistral", CASES["mistral"].specials + (
    "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
    "<s>", "</s>", None, "</s>", ("</s>",))
PHI4 = FamilyCase("phi3", "phi4mini-tools", ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                               "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>"),
                  None, "<|endoftext|>", "<|endoftext|>", "<|end|>", ("<|endoftext|>", "<|end|>"))
SMOLLM2 = FamilyCase("llama", "smollm2", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                     "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|im_end|>", ("<|im_end|>",))
LLAMA32 = CASES["llama3"]

# (case, format, the template's own format found by detect)
FAMILIES = {
    "llama3.1": (LLAMA31, toolcalls.LLAMA3, toolcalls.LLAMA3),
    "llama3.2": (LLAMA32, toolcalls.LLAMA3, toolcalls.LLAMA3),
    "qwen2.5": (QWEN25, toolcalls.HERMES, toolcalls.HERMES),
    "mistral-v0.3": (MISTRAL, toolcalls.MISTRAL, toolcalls.MISTRAL),
    "phi4-mini": (PHI4, toolcalls.PHI4_MINI, None),
    "smollm2 (default)": (SMOLLM2, toolcalls.DEFAULT, None),
}
_TOKENIZERS: dict[str, object] = {}


def tokenizer(key: str):
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = build_tokenizer(FAMILIES[key][0])
    return _TOKENIZERS[key]


def test_fixtures_name_their_source_and_render_like_the_template_without_the_header():
    """Each new fixture starts with a comment naming where it was read; the comment renders nothing."""
    from tests.family_models import TEMPLATES

    for stem in ("llama31-tools", "qwen25-tools", "phi4mini-tools", "smollm2"):
        text = (TEMPLATES / f"{stem}.jinja").read_text(encoding="utf-8")
        header, _, body = text.partition("\n")
        assert header.startswith("{#-") and header.endswith("-#}") and "verbatim" in header
        tok = build_tokenizer(SMOLLM2)
        msgs = [{"role": "user", "content": "hi"}]
        assert tok.apply_chat_template(msgs, tokenize=False, chat_template=text) == \
            tok.apply_chat_template(msgs, tokenize=False, chat_template=body)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detect_finds_the_format_of_the_template_by_round_trip(family):
    tok = tokenizer(family)
    _, _, own = FAMILIES[family]
    assert toolcalls.detect(tok) is own


def test_detect_says_no_tool_syntax_for_plain_chat_templates():
    for key in ("qwen2", "phi3", "gemma3"):
        assert toolcalls.detect(build_tokenizer(CASES[key])) is None
    assert toolcalls.detect(tokenizer("smollm2 (default)"), chat_template=toolcalls.DEFAULT_TEMPLATE) is toolcalls.HERMES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_render_a_call_with_the_real_template_and_parse_it_back(family):
    tok = tokenizer(family)
    _, fmt, _ = FAMILIES[family]
    reply = toolcalls.assistant_text(fmt, tok, conversation(CALL_A), TOOLS)
    # the template declared the tools in the prompt (Phi-4-mini: through the system message's field)
    prompt = fmt.render(tok, conversation(CALL_A)[:-1], TOOLS, add_generation_prompt=True)
    assert "get_weather" in prompt and "add_todo" in prompt and "Current weather in a city" in prompt
    # what the template wrote parses back to the call, arguments as a dict (not double-encoded)
    text = toolcalls._strip_turn_end(reply, tok)
    assert fmt.parse(text) == [CALL_A]
    # and survives tokenization: encoded and decoded with special tokens kept, EOS dropped
    ids = tok.encode(reply, add_special_tokens=False)
    assert fmt.parse(toolcalls.reply_text(tok, ids)) == [CALL_A]
    # what the format writes is what the template writes (modulo whitespace between JSON tokens)
    assert fmt.parse(fmt.format_calls([CALL_A])) == [CALL_A]


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILIES[f][1].parallel])
def test_parallel_calls_round_trip(family):
    tok = tokenizer(family)
    _, fmt, _ = FAMILIES[family]
    reply = toolcalls.assistant_text(fmt, tok, conversation(CALL_A, CALL_B), TOOLS)
    assert fmt.parse(toolcalls._strip_turn_end(reply, tok)) == [CALL_A, CALL_B]


def test_llama31_template_refuses_parallel_calls_and_the_format_says_so():
    tok = tokenizer("llama3.1")
    with pytest.raises(Exception, match="single tool-calls"):
        toolcalls.LLAMA3.render(tok, conversation(CALL_A, CALL_B), TOOLS)
    with pytest.raises(toolcalls.ToolCallError, match="one call per reply"):
        toolcalls.LLAMA3.format_calls([CALL_A, CALL_B])


def test_openai_arguments_string_would_be_double_encoded_without_normalising():
    """Qwen2.5 and Llama 3.1 print ``arguments | tojson``: OpenAI's JSON string comes out as a quoted
    string unless normalised into a dict first."""
    tok = tokenizer("qwen2.5")
    raw = tok.apply_chat_template(conversation(CALL_A), tools=TOOLS, tokenize=False)
    assert '"arguments": "{\\"city\\"' in raw
    assert '"arguments": {"city"' in toolcalls.HERMES.render(tok, conversation(CALL_A), TOOLS)


def test_mistral_ids_are_made_nine_alphanumerics_consistently_for_call_and_result():
    tok = tokenizer("mistral-v0.3")
    msgs = conversation(CALL_A) + [{"role": "tool", "tool_call_id": "call_0_abcdefgh", "content": '{"temp": 21}'}]
    with pytest.raises(Exception, match="length 9"):
        tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    text = toolcalls.MISTRAL.render(tok, msgs, TOOLS)
    cid = toolcalls.MISTRAL.call_id("call_0_abcdefgh")
    assert len(cid) == 9 and cid.isalnum()
    assert f'"id": "{cid}"' in text and f'"call_id": "{cid}"' in text
    assert '[TOOL_RESULTS] {"content": {"temp": 21}' in text


def test_tool_results_are_fed_back_in_each_family_syntax():
    result = {"role": "tool", "tool_call_id": "call_0_abcdefgh", "content": "21 C"}
    expect = {"qwen2.5": "<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>",
              "llama3.1": "<|start_header_id|>ipython<|end_header_id|>\n\n",
              "smollm2 (default)": "<|im_start|>user\n<tool_response>\n21 C\n</tool_response><|im_end|>",
              "phi4-mini": "<|tool|>21 C<|end|>"}
    for family, marker in expect.items():
        _, fmt, _ = FAMILIES[family]
        text = fmt.render(tokenizer(family), conversation(CALL_A) + [result], TOOLS)
        assert marker in text, family


def test_default_template_renders_plain_conversations_exactly_as_chatml():
    tok = tokenizer("smollm2 (default)")
    for msgs in ([{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "yo"}]):
        for gen in (False, True):
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                           chat_template=toolcalls.DEFAULT_TEMPLATE) == \
                tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=CHATML)


def test_default_format_declares_tools_in_the_system_turn_and_keeps_the_system_prompt():
    tok = tokenizer("smollm2 (default)")
    text = toolcalls.DEFAULT.render(tok, conversation(CALL_A)[:-1], TOOLS, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert text.count("<|im_start|>system") == 1
    assert json.dumps(TOOLS[0]) in text and text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fmt", [toolcalls.HERMES, toolcalls.MISTRAL, toolcalls.PHI4_MINI, toolcalls.LLAMA3])
def test_streaming_never_releases_part_of_a_call_and_ends_with_the_same_parse(fmt):
    calls = [CALL_A] if not fmt.parallel else [CALL_A, CALL_B]
    lead = "" if not fmt.start else "Let me check. "
    reply = lead + fmt.format_calls(calls)
    released = ""
    for i in range(1, len(reply) + 1):
        so_far = reply[:i]
        safe = fmt.content_prefix(so_far)
        assert so_far.startswith(safe) and len(safe) >= len(released)
        assert not any(m and m[:2] in safe for m in (fmt.start,)), safe   # no piece of the marker leaks out
        released = safe
        if i > len(lead):
            assert fmt.may_call(so_far)
    assert released.strip() == lead.strip()
    content, parsed = fmt.split(reply)
    assert parsed == calls and content == lead.strip()


def test_plain_answers_stream_through_and_parse_to_no_calls():
    for fmt in toolcalls.FORMATS.values():
        text = "It is sunny, 21 C."
        assert fmt.content_prefix(text) == text and not fmt.may_call(text)
        assert fmt.split(text) == (text, [])
    # a llama reply that starts like JSON but goes on in prose is an answer, not a call
    assert toolcalls.LLAMA3.split('{"a": 1} is a JSON object.')[1] == []
    # a prefix of a marker is held back until it is decided
    assert toolcalls.HERMES.content_prefix("Sure <tool_") == "Sure "
    assert toolcalls.HERMES.content_prefix("Sure <tool_x") == "Sure <tool_x"
    assert toolcalls.LLAMA3.content_prefix("<|python") == ""


def test_malformed_calls_raise_a_clear_error():
    with pytest.raises(toolcalls.ToolCallError, match="not a JSON value"):
        toolcalls.HERMES.parse('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>')
    with pytest.raises(toolcalls.ToolCallError, match="string 'name'"):
        toolcalls.MISTRAL.parse('[TOOL_CALLS] [{"arguments": {}}]')
    with pytest.raises(toolcalls.ToolCallError, match="arguments are not JSON"):
        toolcalls.HERMES.parse('<tool_call>\n{"name": "f", "arguments": "{oops"}\n</tool_call>')
    with pytest.raises(toolcalls.ToolCallError, match="must be a JSON object"):
        toolcalls.LLAMA3.parse('{"name": "f", "parameters": [1, 2]}')
    # arguments given as a JSON string (as some models write them) are decoded
    assert toolcalls.MISTRAL.parse('[TOOL_CALLS] [{"name": "f", "arguments": "{\\"x\\": 1}"}]') == \
        [{"name": "f", "arguments": {"x": 1}}]
    with pytest.raises(ValueError, match="unknown tool format 'nope'"):
        toolcalls.get("nope")


def test_call_schema_accepts_what_the_format_writes_and_rejects_other_functions():
    jsonschema = pytest.importorskip("jsonschema")
    functions = [t["function"] for t in TOOLS]
    for fmt in toolcalls.FORMATS.values():
        schema = fmt.call_schema(functions, parallel=fmt.parallel)
        body = fmt.format_calls([CALL_A])[len(fmt.start):len(fmt.format_calls([CALL_A])) - len(fmt.end) or None]
        value = json.loads(body)
        jsonschema.validate(value, schema)
        bad = json.loads(body.replace("get_weather", "rm_rf"))
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


@pytest.mark.parametrize("case,stops", [
    (LLAMA31, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),    # 3.1's template writes <|eom_id|>
    (LLAMA32, ("<|eot_id|>", "<|end_of_text|>")),                  # 3.2's writes none
    (QWEN25, ("<|im_end|>", "<|endoftext|>")),
    (SMOLLM2, ("<|im_end|>",)),
])
def test_stop_ids_add_the_formats_other_end_tokens_only_where_the_template_writes_them(case, stops):
    from transformers import GenerationConfig

    from tuneops.inference.chat import stop_ids

    tok = build_tokenizer(case)
    gen = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(t) for t in case.gen_eos])
    assert sorted(tok.convert_ids_to_tokens(stop_ids(tok, gen))) == sorted(stops)
    bare = build_tokenizer(CASES["llama3"])           # a vocabulary with <|eom_id|> but a template without it
    bare.add_special_tokens({"additional_special_tokens": ["<|eom_id|>"]})
    assert "<|eom_id|>" not in bare.convert_ids_to_tokens(stop_ids(bare))
