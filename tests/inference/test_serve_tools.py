"""Tool calling and structured outputs on `tuneops serve`, with the official ``openai`` client
against the tiny random chat model served in-process: forced tool calls and ``json_schema`` replies
are valid by construction (llguidance), streamed tool calls accumulate with the client's stream
helpers, and bad tools / tool_choice / response_format values are 400s naming their ``param``."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from .conftest import InProcess

pytestmark = pytest.mark.pipeline          # a server in a thread

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["n"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "count", "parameters": COUNT}}]
PARAMS = {"get_weather": WEATHER, "count": COUNT}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(chat_model_dir):
    srv = InProcess.serving("serve-tools", chat_model_dir)
    yield srv.client()
    srv.stop()


def _valid_calls(calls, names=PARAMS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "count"}}])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_tool_calls_are_valid(client, choice, seed):
    r = client.chat.completions.create(model="tiny-chat", messages=ASK, tools=TOOLS, tool_choice=choice,
                                       max_tokens=200, temperature=1.0, seed=seed)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    _valid_calls(c.message.tool_calls, PARAMS if choice == "required" else {"count"})


def test_tool_history_is_accepted(client):
    first = client.chat.completions.create(model="tiny-chat", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=200)
    msg = first.choices[0].message
    history = [*ASK, msg.model_dump(exclude_none=True),
               *({"role": "tool", "tool_call_id": tc.id, "content": "18 C"} for tc in msg.tool_calls)]
    r = client.chat.completions.create(model="tiny-chat", messages=history, tools=TOOLS, tool_choice="none",
                                       max_tokens=5)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"


def test_auto_and_none_answer_text_from_a_random_model(client):
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model="tiny-chat", messages=ASK, tools=TOOLS, tool_choice=choice,
                                           max_tokens=8)
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content


def test_streamed_tool_calls_accumulate(client):
    with client.beta.chat.completions.stream(model="tiny-chat", messages=ASK, tools=TOOLS, tool_choice="required",
                                             max_tokens=200, temperature=1.0, seed=5) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    c = final.choices[0]
    assert c.finish_reason == "tool_calls"
    _valid_calls(c.message.tool_calls)
    plain = client.chat.completions.create(model="tiny-chat", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=200, temperature=1.0, seed=5)
    assert [(t.function.name, t.function.arguments) for t in plain.choices[0].message.tool_calls] == \
        [(t.function.name, t.function.arguments) for t in c.message.tool_calls]


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_replies_are_valid(client, stream):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    for seed in range(3):
        kw = dict(model="tiny-chat", messages=ASK, response_format=fmt, max_tokens=200, temperature=1.0, seed=seed)
        if stream:
            text = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(stream=True, **kw)
                           if ch.choices)
        else:
            text = client.chat.completions.create(**kw).choices[0].message.content
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("kw,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": 7}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": {"$ref": "#/nowhere"}}}},
     "response_format.json_schema.schema"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[0].tool_call_id"),
])
def test_bad_tool_values_are_400s_naming_their_param(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": "tiny-chat", "messages": ASK, "max_tokens": 3, **kw})
    assert err.value.body["param"] == param, err.value.body
    print(err.value.body["message"])
