"""Tool calling in the chat format (issue 32): OpenAI's function-calling fine-tuning rows pass the
one record check every caller shares (tuneops/data/toolrows.py through formats._chat: the gate,
`tuneops data add`, ingest, the jobs API upload), and each bad input is named by line, field and
rule. Token lengths count the tools and tool calls as the model's template renders them."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from tests.family_models import CASES, build_tokenizer
from tuneops.data import formats, toolrows
from tuneops.data.gate import Settings, validate_dataset

FIXTURE = Path(__file__).parents[1] / "fixtures" / "openai" / "function_calling.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
WEATHER = ROWS[0]["tools"][0]


@pytest.fixture(scope="module")
def chatml_tokenizer():
    """Qwen2's ChatML template (no tool syntax: tuneops' default tool syntax is added to it)."""
    return build_tokenizer(CASES["qwen2"], vocab_size=512)


def _gate(tokenizer, rows: list, tmp_path: Path, **settings) -> tuple[list[str], object]:
    path = tmp_path / "train.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    result = validate_dataset({"train": path}, tokenizer,
                              Settings(format="chat", **{"max_seq_len": 100000, "min_rows": 1, **settings}))
    return [str(p).replace(str(path), "TRAIN") for p in result.problems], result


def test_openai_function_calling_file_passes_every_record_check():
    """The documented rows (tools + tool_calls with no content, tool results, parallel_tool_calls,
    legacy functions / function_call / function results, name, weight): no problem at all (the issue's
    upload of such a file got 216)."""
    shapes = {"tool_calls", "tool", "function_call", "function", "parallel", "weight0", "name"}
    seen = set()
    for r in ROWS:
        assert formats.record_issues("chat", r) == [], r
        for m in r["messages"]:
            seen |= {k for k in ("tool_calls", "function_call") if k in m} | ({m["role"]} & {"tool", "function"})
            seen |= {"weight0"} if m.get("weight") == 0 else set()
            seen |= {"name"} if m["role"] == "user" and "name" in m else set()
            seen |= {"parallel"} if len(m.get("tool_calls") or []) > 1 else set()
    assert shapes <= seen
    assert ROWS[0]["messages"][1].get("content", "absent") == "absent" and ROWS[0]["parallel_tool_calls"] is False


def test_openai_function_calling_file_passes_the_gate_and_counts_tool_tokens(chatml_tokenizer, tmp_path):
    """Through the whole gate (record checks + the GX suite) with a real template; the token length
    of each row is what training tokenizes, tools and calls included."""
    from tuneops.inference.chat import record_tools, tokenize

    problems, result = _gate(chatml_tokenizer, ROWS, tmp_path, min_rows=20)
    assert problems == [] and result.success
    lens = result.splits["train"].token_lens
    assert lens == [len(tokenize(r["messages"], chatml_tokenizer, 10**6, tools=record_tools(r))["input_ids"])
                    for r in ROWS]
    bare = [len(tokenize(r["messages"][:1] + [{"role": "assistant", "content": "x"}], chatml_tokenizer, 10**6)
                ["input_ids"]) for r in ROWS]
    assert all(n > b + 50 for n, b in zip(lens, bare))          # the declared tools are counted
    # and the max_seq_len rule sees them: a budget below the longest row rejects exactly the longer rows
    budget = sorted(lens)[len(lens) // 2]
    problems, _ = _gate(chatml_tokenizer, ROWS, tmp_path, max_seq_len=budget)
    over = [i + 1 for i, n in enumerate(lens) if n > budget]
    assert over and [p.split(":")[1] for p in problems] == [str(n) for n in over]
    assert all(f"tokens > max_seq_len {budget}" in p and ": messages: max_seq_len: " in p for p in problems)


def _row(*messages, tools=(WEATHER,), **extra) -> dict:
    row = {"messages": [{"role": "user", "content": "What is the weather in Oslo?"}, *messages], **extra}
    if tools is not None:
        row["tools"] = list(tools)
    return row


def _call(args, name="get_current_weather", cid="call_1") -> dict:
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)}}


OK_ARGS = {"location": "Oslo, Norway", "format": "celsius"}
BAD_SCHEMA_TOOL = copy.deepcopy(WEATHER)
BAD_SCHEMA_TOOL["function"]["parameters"]["properties"]["format"]["type"] = "colour"
ARRAY_TOOL = copy.deepcopy(WEATHER)
ARRAY_TOOL["function"]["parameters"] = {"type": "array"}

# rule -> (bad row, the exact problem line; TRAIN:2 is the bad row after one good row)
RULES = {
    "json": (_row({"role": "assistant", "tool_calls": [_call('{"location": "Oslo", "format": ')]}),
             "TRAIN:2: messages[1].tool_calls[0].function.arguments: json: arguments are not JSON: "
             "unexpected end of data at column 32"),
    "arguments_schema (required)": (
        _row({"role": "assistant", "tool_calls": [_call({"location": "Oslo, Norway"})]}),
        "TRAIN:2: messages[1].tool_calls[0].function.arguments: arguments_schema: arguments do not match the "
        "parameters of 'get_current_weather': 'format' is a required property"),
    "arguments_schema (enum)": (
        _row({"role": "assistant", "tool_calls": [_call({**OK_ARGS, "format": "kelvin"})]}),
        "TRAIN:2: messages[1].tool_calls[0].function.arguments: arguments_schema: arguments do not match the "
        "parameters of 'get_current_weather': 'kelvin' is not one of ['celsius', 'fahrenheit'] (at arguments.format)"),
    "arguments type": (
        _row({"role": "assistant", "tool_calls": [{**_call(OK_ARGS), "function": {
            "name": "get_current_weather", "arguments": OK_ARGS}}]}),
        "TRAIN:2: messages[1].tool_calls[0].function.arguments: type: arguments must be a JSON string (got dict)"),
    "schema": (_row({"role": "assistant", "tool_calls": [_call(OK_ARGS)]}, tools=[BAD_SCHEMA_TOOL]),
               "TRAIN:2: tools[0].function.parameters: schema: parameters is not a valid JSON Schema: 'colour' is "
               "not valid under any of the given schemas (at properties/format/type)"),
    "schema (not an object)": (_row({"role": "assistant", "content": "Sunny."}, tools=[ARRAY_TOOL]),
                               "TRAIN:2: tools[0].function.parameters: schema: parameters must describe the arguments "
                               "object (type 'object'), got type 'array'"),
    "unknown_function": (_row({"role": "assistant", "tool_calls": [_call(OK_ARGS, name="get_forecast")]}),
                         "TRAIN:2: messages[1].tool_calls[0].function.name: unknown_function: calls 'get_forecast', "
                         "which is not declared in tools (declared: get_current_weather)"),
    "unknown_function (no tools)": (_row({"role": "assistant", "tool_calls": [_call(OK_ARGS)]}, tools=None),
                                    "TRAIN:2: messages[1].tool_calls[0].function.name: unknown_function: calls "
                                    "'get_current_weather', which is not declared in tools (declared: none)"),
    "tool_call_id": (_row({"role": "assistant", "tool_calls": [_call(OK_ARGS)]},
                          {"role": "tool", "tool_call_id": "call_9", "content": "3.5"},
                          {"role": "assistant", "content": "It is 3.5 degrees."}),
                     "TRAIN:2: messages[2].tool_call_id: tool_call_id: no call with id 'call_9' in messages[1] "
                     "(its call ids: 'call_1')"),
    "tool_order": (_row({"role": "tool", "tool_call_id": "call_1", "content": "3.5"},
                        {"role": "assistant", "content": "It is 3.5 degrees."}),
                   "TRAIN:2: messages[1].role: tool_order: a tool result must follow the assistant message whose "
                   "tool_calls it answers (or another result of that turn)"),
    "duplicate_id": (_row({"role": "assistant", "tool_calls": [_call(OK_ARGS), _call(OK_ARGS)]}),
                     "TRAIN:2: messages[1].tool_calls[1].id: duplicate_id: call id 'call_1' is already used by "
                     "messages[1].tool_calls[0]"),
    "duplicate_result": (_row({"role": "assistant", "tool_calls": [_call(OK_ARGS)]},
                              {"role": "tool", "tool_call_id": "call_1", "content": "3.5"},
                              {"role": "tool", "tool_call_id": "call_1", "content": "3.6"},
                              {"role": "assistant", "content": "It is 3.5 degrees."}),
                         "TRAIN:2: messages[3].tool_call_id: duplicate_result: call 'call_1' already has a result in "
                         "messages[2]"),
    "parallel_tool_calls": (_row({"role": "assistant", "tool_calls": [_call(OK_ARGS), _call(OK_ARGS, cid="c2")]},
                                 parallel_tool_calls=False),
                            "TRAIN:2: messages[1].tool_calls: parallel_tool_calls: 2 calls in one turn, but "
                            "parallel_tool_calls is false"),
    "function_name": (_row({"role": "assistant", "function_call": {"name": "get_current_weather",
                                                                   "arguments": json.dumps(OK_ARGS)}},
                           {"role": "function", "name": "get_time", "content": "3.5"},
                           {"role": "assistant", "content": "It is 3.5 degrees."}, tools=None,
                           functions=[WEATHER["function"]]),
                      "TRAIN:2: messages[2].name: function_name: result of 'get_time', but messages[1] called "
                      "'get_current_weather'"),
    "duplicate (function)": (_row({"role": "assistant", "content": "Sunny."}, tools=[WEATHER, WEATHER]),
                             "TRAIN:2: tools[1].function.name: duplicate: function 'get_current_weather' is already "
                             "declared in tools[0].function"),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_bad_tool_row_is_named_by_line_field_and_rule(rule, chatml_tokenizer, tmp_path):
    bad, expected = RULES[rule]
    problems, result = _gate(chatml_tokenizer, [ROWS[1], bad], tmp_path)
    assert problems == [expected]
    assert list(result.splits["train"].rejected) == [2]


def test_the_data_and_training_sides_read_the_same_tools():
    from tuneops.inference.chat import record_tools

    legacy = {"functions": [WEATHER["function"]], "messages": []}
    for r in ROWS + [legacy, {"messages": []}]:
        assert toolrows.record_tools(r) == record_tools(r) == formats.get("chat").tools(r)
    assert record_tools(legacy) == [WEATHER] and record_tools({"messages": []}) is None


def test_tool_rows_keep_the_existing_chat_rules():
    """Content is still required where there is no call; roles outside the five are refused."""
    issues = formats.record_issues("chat", _row({"role": "assistant", "content": None}))
    assert ("messages[1].content", "required", "missing 'content'") in issues
    issues = formats.record_issues("chat", _row({"role": "robot", "content": "x"}))
    assert ("messages[1].role", "enum", "role must be one of system, user, assistant, tool, function (got 'robot')") \
        in issues
    # a reply that is only tool calls counts as the assistant turn to train on
    assert formats.record_issues("chat", ROWS[0]) == [] and toolrows.replies(ROWS[0]["messages"]) == 1


def test_hostile_arguments_are_problems_not_crashes():
    """Arguments are parsed as strictly as records are (orjson; depth measured before parsing)."""
    cases = {'{"a": NaN}': ("json", "unexpected character, expected a JSON value at column 7"),
             '{"a": "\\ud800"}': ("json", "no low surrogate in string at column 8"),
             '{"a": 1e999}': ("json", "number is infinity when parsed as double at column 7"),
             "[" * 5000 + "]" * 5000: ("max_depth", "arguments are JSON nested 5000 levels deep, limit 64"),
             "[1, 2]": ("type", "arguments must encode a JSON object (got list)")}
    for args, (rule, message) in cases.items():
        issues = formats.record_issues("chat", _row({"role": "assistant", "tool_calls": [_call(args)]}, tools=[
            {"type": "function", "function": {"name": "get_current_weather"}}]))
        assert [(r, m.removeprefix("arguments are not JSON: ")) for _, r, m in issues] == [(rule, message)], args


def test_duplicate_keys_see_the_calls():
    """Two rows that differ only in the call's arguments are not duplicates; the same row twice is."""
    spec = formats.get("chat")
    a = _row({"role": "assistant", "tool_calls": [_call(OK_ARGS)]})
    b = _row({"role": "assistant", "tool_calls": [_call({**OK_ARGS, "location": "Bergen, Norway"})]})
    assert spec.exact_key(a) != spec.exact_key(b) and spec.near_key(a) != spec.near_key(b)
    assert spec.exact_key(a) == spec.exact_key(copy.deepcopy(a))
    assert spec.size(a) > len("What is the weather in Oslo?") + len(json.dumps(OK_ARGS))
    # rows without tools keep their keys (duplicate detection of existing data is unchanged)
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert spec.exact_key(plain) == "user\x1f1\x1fHi\x1eassistant\x1f1\x1fHello."


def test_the_jobs_api_upload_accepts_the_file_and_names_a_bad_row(tmp_path):
    """The upload's gate (tuneops/service/app.py `_validate_upload`) is the same check: the documented
    file is accepted; a bad call is a 400 listing FILE:LINE: FIELD: RULE."""
    from tests.conftest import make_project
    from tuneops.config import load_config
    from tuneops.service.app import ApiError, _validate_upload

    cfg = load_config(make_project("upload-tools", ("model.max_seq_len=1024",)) / "params.yaml")
    accepted, details = _validate_upload(cfg, FIXTURE, "function_calling.jsonl")
    assert (accepted, details) == (len(ROWS), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3] + [RULES["json"][0]] + ROWS[3:]), encoding="utf-8")
    with pytest.raises(ApiError) as err:
        _validate_upload(cfg, bad, "train.jsonl")
    assert err.value.status_code == 400
    assert RULES["json"][1].replace("TRAIN:2:", "train.jsonl:4:") in err.value.body["error"]["message"]
