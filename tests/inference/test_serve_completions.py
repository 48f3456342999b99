"""Log-probabilities, the legacy ``functions`` / ``function_call`` and ``/v1/completions`` on `tuneops
serve`, with the official ``openai`` client against the tiny random chat model served in-process
(tests/inference/conftest.py): what a chat reply's ``logprobs`` report is what scoring the same tokens
with ``/v1/completions`` (``echo``, ``max_tokens=0``) reports, streamed or not; the legacy function
fields answer in the legacy shape; bad values are 400s naming their ``param``."""
from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest

from .conftest import InProcess

pytestmark = pytest.mark.pipeline          # a server in a thread

ASK = [{"role": "user", "content": "Hello there, how are you?"}]
COUNT = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["n"], "additionalProperties": False}
FUNCTIONS = [{"name": "count", "description": "Count", "parameters": COUNT},
             {"name": "noop", "parameters": {"type": "object", "properties": {}}}]


@pytest.fixture(scope="module")
def served(chat_model_dir):
    srv = InProcess.serving("serve-completions", chat_model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(served):
    return served.client()


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_model_dir))


# -- logprobs ---------------------------------------------------------------------------------------

def test_chat_logprobs_are_the_scored_tokens(client, tokenizer):
    r = client.chat.completions.create(model="tiny-chat", messages=ASK, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=4)
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens == 12
    assert b"".join(bytes(t.bytes) for t in content).decode("utf-8", "replace") == c.message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 4
        tops = [x.logprob for x in t.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob   # greedy: the argmax
        assert sum(math.exp(x) for x in tops) <= 1 + 1e-6
    # the same tokens scored after the prompt by /v1/completions (echo, max_tokens=0): the same numbers
    from tuneops.inference.chat import prompt_ids

    prompt = prompt_ids(tokenizer, ASK)
    ids = prompt + [_id_of(tokenizer, t) for t in content]
    scored = client.completions.create(model="tiny-chat", prompt=ids, max_tokens=0, echo=True, logprobs=4)
    lp = scored.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(ids)
    for t, got in zip(content, lp.token_logprobs[len(prompt):]):
        assert got == pytest.approx(t.logprob, abs=2e-4)


def _id_of(tokenizer, entry) -> int:
    """The token id of a chat logprobs entry (its bytes in the byte-level vocabulary)."""
    from tuneops.inference.logprobs import token_bytes

    want = bytes(entry.bytes)
    for i in range(len(tokenizer)):
        if token_bytes(tokenizer, [], i) == want:
            return i
    raise AssertionError(f"no token has the bytes {want!r}")


def test_streamed_logprobs_are_the_same(client):
    kw = dict(model="tiny-chat", messages=ASK, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2)
    plain = client.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = []
    text = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
            streamed += chunk.choices[0].logprobs.content
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    assert [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in streamed] == \
        [(t.token, t.logprob, [x.token for x in t.top_logprobs]) for t in plain]
    assert text == client.chat.completions.create(**kw).choices[0].message.content


def test_no_logprobs_unless_asked(client):
    r = client.chat.completions.create(model="tiny-chat", messages=ASK, max_tokens=3, temperature=0)
    assert r.choices[0].logprobs is None
    r = client.chat.completions.create(model="tiny-chat", messages=ASK, max_tokens=3, temperature=0, logprobs=True)
    assert [t.top_logprobs for t in r.choices[0].logprobs.content] == [[], [], []]


def test_sampled_logprobs_are_the_models_not_the_samplers(client):
    """Sampled at temperature 2 the picked token is often not the argmax; its logprob is still the
    model's (temperature 1) log-probability, the same as greedy decoding reports for the same prefix."""
    kw = dict(model="tiny-chat", messages=ASK, max_tokens=1, logprobs=True, top_logprobs=20)
    greedy = client.chat.completions.create(temperature=0, **kw).choices[0].logprobs.content[0]
    by_token = {t.token: t.logprob for t in greedy.top_logprobs}
    for seed in range(4):
        hot = client.chat.completions.create(temperature=2, seed=seed, **kw).choices[0].logprobs.content[0]
        assert [t.logprob for t in hot.top_logprobs] == [t.logprob for t in greedy.top_logprobs]
        if hot.token in by_token:
            assert hot.logprob == pytest.approx(by_token[hot.token], abs=1e-9)


# -- legacy functions ------------------------------------------------------------------------------------

def test_legacy_function_call_answers_in_the_legacy_shape(client):
    r = client.chat.completions.create(model="tiny-chat", messages=ASK, functions=FUNCTIONS,
                                       function_call={"name": "count"}, max_tokens=60, temperature=1, seed=3)
    c = r.choices[0]
    assert c.finish_reason == "function_call" and c.message.tool_calls is None
    assert c.message.function_call.name == "count"
    jsonschema.validate(json.loads(c.message.function_call.arguments), COUNT)
    history = [*ASK, {"role": "assistant", "content": None, "function_call": c.message.function_call.model_dump()},
               {"role": "function", "name": "count", "content": "3"}]
    r = client.chat.completions.create(model="tiny-chat", messages=history, functions=FUNCTIONS,
                                       function_call="none", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.function_call is None


def test_legacy_function_call_streams(client):
    kw = dict(model="tiny-chat", messages=ASK, functions=FUNCTIONS, function_call={"name": "count"}, max_tokens=60,
              temperature=1, seed=3)
    name, args, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            d = chunk.choices[0].delta
            assert not d.tool_calls
            if d.function_call:
                name += d.function_call.name or ""
                args += d.function_call.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    plain = client.chat.completions.create(**kw).choices[0].message.function_call
    assert (name, args, finish) == (plain.name, plain.arguments, "function_call")


# -- /v1/completions --------------------------------------------------------------------------------------

def test_completions_echo_scores_the_prompt(client, tokenizer):
    text = "Hi there! Hello, how are you?"
    r = client.completions.create(model="tiny-chat", prompt=text, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    ids = tokenizer(text)["input_ids"]
    assert c.text == text and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == text
    assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    # lm-evaluation-harness's request: token ids, max_tokens=1, echo, logprobs=1; a batch of two prompts
    a, b = ids, tokenizer("Why did the chicken cross the road?")["input_ids"]
    r = client.completions.create(model="tiny-chat", prompt=[a, b], max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1]
    first = r.choices[0].logprobs
    assert len(first.tokens) == len(a) + 1
    assert first.token_logprobs[0] is None
    assert first.token_logprobs[1:len(a)] == pytest.approx(lp.token_logprobs[1:], abs=1e-5)
    assert max(first.top_logprobs[-1].values()) == first.token_logprobs[-1]       # greedy: the argmax
    assert len(r.choices[1].logprobs.tokens) == len(b) + 1


def test_completions_generate_like_chat_does(client):
    r = client.completions.create(model="tiny-chat", prompt="Tell me a joke.", max_tokens=6, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 6 and c.logprobs is None and c.text
    again = client.completions.create(model="tiny-chat", prompt="Tell me a joke.", max_tokens=6, temperature=0,
                                      logprobs=0)
    assert again.choices[0].text == c.text
    lp = again.choices[0].logprobs
    assert len(lp.tokens) == 6 and lp.text_offset[0] == len("Tell me a joke.") and lp.top_logprobs[0] == {}
    stopped = client.completions.create(model="tiny-chat", prompt="Tell me a joke.", max_tokens=6, temperature=0,
                                        stop=[c.text[2:4]])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == c.text[:2]


def test_completions_stream_the_same_text_per_prompt(client):
    """``stream``: the openai client's stream of ``text_completion`` chunks adds up, per ``index``, to
    the unstreamed choices (greedy), with ``echo`` first; one finish chunk per choice; usage last."""
    kw = {"model": "tiny-chat", "prompt": ["Tell me a joke.", "Hello there"], "max_tokens": 5, "temperature": 0,
          "echo": True}
    whole = client.completions.create(**kw)
    texts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        assert chunk.object == "text_completion"
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                assert c.index not in finish
                finish[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert [texts[k] for k in (0, 1)] == [c.text for c in whole.choices]
    assert texts[0].startswith("Tell me a joke.") and texts[1].startswith("Hello there")
    assert finish == {k: c.finish_reason for k, c in enumerate(whole.choices)} and finish[0] == "length"
    assert usage.completion_tokens == whole.usage.completion_tokens > 0


# -- bad values -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,param", [
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"functions": [{"name": "a b"}]}, "functions[0].name"),
    ({"functions": [{"name": "f", "parameters": {"type": "nonsense"}}]}, "functions[0].parameters"),
    ({"functions": FUNCTIONS, "function_call": {"name": "missing"}}, "function_call"),
    ({"functions": FUNCTIONS, "function_call": "always"}, "function_call"),
    ({"functions": FUNCTIONS, "tools": [{"type": "function", "function": FUNCTIONS[0]}]}, "functions"),
    ({"messages": [*ASK, {"role": "function", "name": "count", "content": "3"}]}, "messages[1].role"),
    ({"messages": [*ASK, {"role": "assistant", "function_call": {"name": "count", "arguments": "{x"}}]},
     "messages[1].function_call.arguments"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "count", "arguments": "{}"}}]}, {"role": "user", "content": "and?"}]}, "messages[1].tool_calls"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "count", "arguments": "{}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "1"},
        {"role": "tool", "tool_call_id": "c1", "content": "2"}]}, "messages[3].tool_call_id"),
])
def test_bad_chat_values_are_400s_naming_their_param(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": "tiny-chat", "messages": ASK, "max_tokens": 3, **kw})
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body


@pytest.mark.parametrize("kw,param", [
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt[0]"),
    ({"prompt": [[1, -2]]}, "prompt[0]"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": ["a", 5]}, "prompt[1]"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": True}, "logprobs"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**6}, "max_tokens"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "best_of": 3}, "best_of"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream": True, "logprobs": 1}, "logprobs"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "word " * 5000}, "prompt"),
    ({"prompt": ["x"] * 65}, "prompt"),
])
def test_bad_completion_values_are_400s_naming_their_param(client, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**{"model": "tiny-chat", "max_tokens": 2, **kw})
    assert err.value.status_code == 400 and err.value.body["param"] == param, err.value.body
