"""Training on tool-calling rows (issue 32), per family, with tiny tokenizers and the real chat
templates (tests/fixtures/chat_templates/): each model renders with its own template and tool format
(``Family.tool_format``, else the template's own, else tuneops' default syntax written into it), and
the labels cover exactly the assistant's text and tool-call tokens with their closing end-of-turn
marker: nothing of the tool definitions or of the tool results."""
from __future__ import annotations

import json

import pytest

from tests.family_models import CASES, build_model, build_tokenizer
from tests.inference.test_toolcalls import CALL_A, CALL_B, LLAMA31, MISTRAL, PHI4, QWEN25, SMOLLM2, TOOLS
from tests.test_families import _labelled_runs, _local_params
from tuneops.families import for_model_type
from tuneops.inference import chat, toolcalls

RESULT = "21 C and sunny, wind 3 m/s"
ANSWER = "It is 21 C in Zurich."

# family case -> (tokenizer case, the model_type whose Family spec applies, the format used, syntax added?)
FAMILIES = {
    "llama3.1": (LLAMA31, "llama", "llama3", False),
    "llama3.2": (CASES["llama3"], "llama", "llama3", False),
    "qwen2.5": (QWEN25, "qwen2", "hermes", False),
    "mistral-v0.3": (MISTRAL, "mistral", "mistral", False),
    "phi4-mini": (PHI4, "phi3", "phi4-mini", False),
    # templates without tool syntax: tuneops' default (Hermes blocks in the model's own turns)
    "smollm2": (SMOLLM2, "llama", "hermes", True),
    "qwen2": (CASES["qwen2"], "qwen2", "hermes", True),
    "phi3.5": (CASES["phi3"], "phi3", "hermes", True),
    "gemma3": (CASES["gemma3"], "gemma3_text", "hermes", True),
}


def prepared(key: str):
    """A fresh tokenizer, prepared as the model stage prepares it (tool format recorded)."""
    case, model_type, _, _ = FAMILIES[key]
    tok = build_tokenizer(case)
    fmt, added = chat.ensure_tool_format(tok, for_model_type(model_type).tool_format)
    return tok, fmt, added


def openai_call(call: dict, i: int = 0) -> dict:
    return {"id": f"call_{i}_abcdefgh", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}


def conversation(*calls: dict, weight: int = 1) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the weather in Zurich?"},
            {"role": "assistant", "content": None, "weight": weight,
             "tool_calls": [openai_call(c, i) for i, c in enumerate(calls)]},
            *[{"role": "tool", "tool_call_id": f"call_{i}_abcdefgh", "content": f"{RESULT} ({i})"}
              for i in range(len(calls))],
            {"role": "assistant", "content": ANSWER}]


def call_text(fmt: toolcalls.ToolFormat, calls: list[dict]) -> str:
    """What the model writes for ``calls`` in its format (Mistral: with the template's 9-char ids)."""
    if fmt.id_chars:
        objs = [{"name": c["name"], "arguments": c["arguments"], "id": fmt.call_id(f"call_{i}_abcdefgh")}
                for i, c in enumerate(calls)]
        return f"{fmt.start} {json.dumps(objs, ensure_ascii=False)}"
    return fmt.format_calls(calls)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_family_spec_and_the_template_decide_the_tool_format(family):
    case, model_type, name, added = FAMILIES[family]
    tok = build_tokenizer(case)
    own = tok.chat_template
    fmt, was_added = chat.ensure_tool_format(tok, for_model_type(model_type).tool_format)
    assert (fmt.name, was_added) == (name, added)
    assert tok.init_kwargs[chat.TOOL_FORMAT_KEY] == name                 # recorded for serving
    assert tok.chat_template == (toolcalls.with_default_tools(own) if added else own)
    assert chat.ensure_tool_format(tok) == (fmt, False)                  # recorded: read back, nothing redone
    assert toolcalls.detect(tok) in (fmt, None)                          # (Phi-4-mini's cannot be detected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_cover_exactly_the_calls_and_the_reply_with_their_end_markers(family):
    tok, fmt, _ = prepared(family)
    stop = FAMILIES[family][0].stop
    enc = chat.tokenize(conversation(CALL_A), tok, 4096, tools=TOOLS)
    runs = [r.lstrip(" ") for r in _labelled_runs(enc, tok)]
    assert runs == [call_text(fmt, [CALL_A]) + stop, ANSWER + stop]
    labelled = "".join(runs)
    # nothing of the tool definitions, nor of the tool result, carries loss
    for prompt_only in ("Current weather in a city", "add_todo", RESULT, "What is the weather", "Be brief."):
        assert prompt_only not in labelled
    # the ids are the template's own rendering with the tools, tokenized as a whole
    text = chat.render(tok, conversation(CALL_A), tools=TOOLS)
    assert enc["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert "Current weather in a city" in text and RESULT in text           # (declared and fed back: as prompt)
    # the calls the labels teach parse back to what the row asked for
    assert fmt.parse(toolcalls._strip_turn_end(runs[0], tok)) == [CALL_A]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("llama3.1", "llama3.2")])
def test_parallel_calls_are_labelled_as_one_reply(family):
    tok, fmt, _ = prepared(family)
    stop = FAMILIES[family][0].stop
    enc = chat.tokenize(conversation(CALL_A, CALL_B), tok, 4096, tools=TOOLS)
    runs = [r.lstrip(" ") for r in _labelled_runs(enc, tok)]
    assert runs == [call_text(fmt, [CALL_A, CALL_B]) + stop, ANSWER + stop]


@pytest.mark.parametrize("family", ["qwen2.5", "mistral-v0.3", "gemma3"])
def test_a_weight_0_tool_call_turn_carries_no_loss(family):
    tok, _, _ = prepared(family)
    enc = chat.tokenize(conversation(CALL_A, weight=0), tok, 4096, tools=TOOLS)
    assert [r.lstrip(" ") for r in _labelled_runs(enc, tok)] == [ANSWER + FAMILIES[family][0].stop]


def test_llama31_refuses_parallel_calls_as_a_chat_format_error():
    """The template raises on two calls in one turn: the gate reports it (rule chat_template)."""
    tok, _, _ = prepared("llama3.1")
    with pytest.raises(chat.ChatFormatError, match="single tool-calls"):
        chat.tokenize(conversation(CALL_A, CALL_B), tok, 4096, tools=TOOLS)


def test_legacy_function_call_rows_train_like_tool_calls():
    """``functions`` / ``function_call`` / ``function`` results render as tools / tool_calls / tool."""
    tok, fmt, _ = prepared("qwen2.5")
    args = {"city": "Zurich"}
    legacy = [{"role": "user", "content": "Weather?"},
              {"role": "assistant", "function_call": {"name": "get_weather", "arguments": json.dumps(args)}},
              {"role": "function", "name": "get_weather", "content": RESULT},
              {"role": "assistant", "content": ANSWER}]
    tools = chat.record_tools({"functions": [TOOLS[0]["function"]]})
    assert tools == [TOOLS[0]]
    enc = chat.tokenize(legacy, tok, 4096, tools=tools)
    assert _labelled_runs(enc, tok) == [fmt.format_calls([{"name": "get_weather", "arguments": args}]) + "<|im_end|>",
                                        ANSWER + "<|im_end|>"]
    assert RESULT in chat.render(tok, legacy, tools=tools)


def test_default_tool_syntax_over_chatml_is_the_documented_default_template():
    """Over ChatML, with_default_tools writes exactly what toolcalls.DEFAULT_TEMPLATE writes, and a
    conversation without tools renders exactly as the template did (for every template without tool
    syntax)."""
    tok = build_tokenizer(SMOLLM2)
    conv = conversation(CALL_A, CALL_B)
    ours = toolcalls.HERMES.render(tok, conv, TOOLS, chat_template=toolcalls.with_default_tools(chat.CHATML))
    assert ours == toolcalls.DEFAULT.render(tok, conv, TOOLS)
    assert toolcalls.with_default_tools(toolcalls.with_default_tools(chat.CHATML)) == \
        toolcalls.with_default_tools(chat.CHATML)
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    for case in (SMOLLM2, CASES["qwen2"], CASES["phi3"], CASES["gemma3"]):
        tok = build_tokenizer(case)
        for msgs, gen in ((plain, True), (plain[1:3], False)):
            assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                           chat_template=toolcalls.with_default_tools(tok.chat_template)) == \
                tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("key,family,expected", [("llama3.1", "llama3", ("llama3", "the model's template")),
                                                 ("phi3.5", "phi3", ("hermes", "tuneops default "
                                                                               "(toolcalls.with_default_tools)"))])
def test_the_model_stage_records_the_tool_format_in_the_saved_tokenizer(key, family, expected, tmp_path):
    """``tuneops model`` (source local): the saved tokenizer names its tool format, and a template
    without tool syntax is saved with the default syntax, so serving renders and parses as training."""
    from tuneops.models import load_tokenizer, prepare, provenance

    case = FAMILIES[key][0]
    tok = build_tokenizer(case)
    own = tok.chat_template
    src = tmp_path / "src"
    build_model(family, tok).save_pretrained(src)
    tok.save_pretrained(src)
    out = prepare(_local_params(str(src)), tmp_path / "base", tmp_path / "cache")
    info = provenance(out)
    assert (info["tool_format"], info["tool_syntax"]) == expected
    ready = load_tokenizer(out)
    assert ready.init_kwargs[chat.TOOL_FORMAT_KEY] == expected[0]
    assert ready.chat_template == (own if expected[0] != "hermes" else toolcalls.with_default_tools(own))
    assert chat.tool_format(ready).name == expected[0]
    runs = _labelled_runs(chat.tokenize(conversation(CALL_A), ready, 4096, tools=TOOLS), ready)
    assert runs[0] == call_text(chat.tool_format(ready), [CALL_A]) + case.stop
