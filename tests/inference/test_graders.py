"""Graders (tuneops/inference/graders.py): OpenAI grader JSON declared in params, checked when the
params load, scored per sample; and the tool rows' graded turns."""
from __future__ import annotations

import json

import pytest

from tuneops.config import ConfigError, load_config
from tuneops.inference import graders

TOOLS = [{"type": "function", "function": {"name": "translate", "parameters": {
    "type": "object", "properties": {"text": {"type": "string"}, "target_language": {"type": "string",
                                                                                      "enum": ["de", "pl"]}},
    "required": ["text", "target_language"], "additionalProperties": False}}}]
CALL = {"name": "translate", "arguments": {"text": "Save", "target_language": "pl"}}


def one(grader: dict, sample: dict, item: dict | None = None) -> float | None:
    spec = graders.check([grader])
    smp = {"output_text": "", "output_json": None, "output_tools": [], **sample}
    it = {"row": 0, "reference": "", "tool_calls": [], "tools": TOOLS, **(item or {})}
    return graders.score(spec, [it], [smp])["graders"][grader["name"]]["score"]


def sc(op: str, ref: str = "{{item.reference}}") -> dict:
    return {"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": ref,
            "operation": op}


@pytest.mark.parametrize("op,output,reference,expected", [
    ("eq", "Paris", "Paris", 1.0), ("eq", "paris", "Paris", 0.0),
    ("ne", "Rome", "Paris", 1.0), ("ne", "Paris", "Paris", 0.0),
    ("like", "It is Paris.", "Paris", 1.0), ("like", "It is paris.", "Paris", 0.0),
    ("ilike", "It is PARIS.", "paris", 1.0), ("ilike", "It is Rome.", "paris", 0.0),
])
def test_string_check_operations(op, output, reference, expected):
    assert one(sc(op), {"output_text": output}, {"reference": reference}) == expected


def test_templates_read_nested_item_fields_and_mix_text():
    g = sc("eq", "The capital is {{item.answer.city}}")
    assert one(g, {"output_text": "The capital is Paris"}, {"answer": {"city": "Paris"}}) == 1.0
    assert one(g, {"output_text": "The capital is Rome"}, {"answer": {"city": "Paris"}}) == 0.0
    with pytest.raises(graders.GraderError, match=r"row 0 has no item.answer"):
        one(g, {"output_text": "x"}, {})


def test_text_similarity_metrics():
    same, other = "the cat sat on the mat", "a dog ran in the park"
    for metric in graders.METRICS:
        g = {"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
             "reference": "{{item.reference}}", "evaluation_metric": metric}
        assert one(g, {"output_text": same}, {"reference": same}) == pytest.approx(1.0), metric
        assert one(g, {"output_text": other}, {"reference": same}) < 0.5, metric
    assert graders.rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 5 / 11)
    assert graders.rouge_n("the cat", "the dog", 1) == pytest.approx(0.5)
    assert graders.gleu("a b c d", "a b c e") == pytest.approx(6 / 10)
    # BLEU: 3 of 4 unigrams, 2 of 3 bigrams, 1 of 2 trigrams, the 4-gram smoothed (1 / (2 * 1)); no brevity penalty
    assert graders.bleu("a b c d", "a b c e") == pytest.approx((3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25)
    assert graders.fuzzy_match("kitten", "sitting") == pytest.approx(2 * 4 / 13)


def test_pass_threshold_gives_a_pass_rate():
    g = graders.check([{"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}",
                        "reference": "{{item.reference}}", "evaluation_metric": "rouge_1", "pass_threshold": 0.9}])
    items = [{"reference": "a b", "tools": None}, {"reference": "a b", "tools": None}]
    samples = [{"output_text": "a b"}, {"output_text": "a c"}]
    res = graders.score(g, items, samples)["graders"]["t"]
    assert res["score"] == pytest.approx(0.75) and res["pass_rate"] == 0.5 and res["n"] == 2


@pytest.mark.parametrize("match,calls,expected", [
    ("arguments", [CALL], 1.0),
    ("arguments", [{"name": "translate", "arguments": json.dumps(CALL["arguments"])}], 1.0),   # JSON string = dict
    ("arguments", [{"name": "translate", "arguments": {"text": "Save", "target_language": "de"}}], 0.0),
    ("arguments", [], 0.0), ("arguments", None, 0.0),                                 # no call / unparsable call
    ("arguments", [CALL, CALL], 0.0),
    ("name", [{"name": "translate", "arguments": {"text": "other", "target_language": "de"}}], 1.0),
    ("name", [{"name": "define_word", "arguments": {}}], 0.0),
    ("schema", [{"name": "translate", "arguments": {"text": "other", "target_language": "de"}}], 1.0),
    ("schema", [{"name": "translate", "arguments": {"text": "other", "target_language": "fr"}}], 0.0),
    ("schema", [{"name": "translate", "arguments": {"text": "other"}}], 0.0),
])
def test_tool_call_grader(match, calls, expected):
    g = {"type": "tool_call", "name": "tc", "match": match}
    assert one(g, {"output_tools": calls}, {"tool_calls": [CALL]}) == expected


def test_tool_call_grader_items_and_abstention():
    every, calls = ({"type": "tool_call", "name": "tc", "match": "arguments", **x} for x in ({}, {"items": "calls"}))
    # a turn with tools but no reference call: passes only without a call; items=calls does not grade it
    assert one(every, {"output_tools": []}) == 1.0
    assert one(every, {"output_tools": [CALL]}) == 0.0
    assert one(calls, {"output_tools": []}) is None
    # a row without tools: not graded by a tool_call grader
    assert one(every, {"output_tools": []}, {"tools": None}) is None


@pytest.mark.parametrize("grader,field", [
    ({"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "reference": "x", "operation": "eqq"},
     r"graders\[0\] \(s\)\.operation: must be one of eq, ne, like, ilike"),
    ({"type": "string_check", "name": "s", "input": "{{sample.output_text}}", "operation": "eq"},
     r"graders\[0\] \(s\)\.reference: required field is missing"),
    ({"type": "string_check", "name": "s", "input": "{{sample.text}}", "reference": "x", "operation": "eq"},
     r"graders\[0\] \(s\)\.input: sample\.text is not a sample field"),
    ({"type": "string_check", "name": "s", "input": "{{output}}", "reference": "x", "operation": "eq"},
     r"graders\[0\] \(s\)\.input: .* must name sample"),
    ({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}", "reference": "x",
      "evaluation_metric": "meteor"}, r"graders\[0\] \(t\)\.evaluation_metric: 'meteor' needs WordNet"),
    ({"type": "text_similarity", "name": "t", "input": "{{sample.output_text}}", "reference": "x",
      "evaluation_metric": "bleu", "pass_threshold": 2}, r"graders\[0\] \(t\)\.pass_threshold: must be a number"),
    ({"type": "tool_call", "name": "c", "match": "exact"}, r"graders\[0\] \(c\)\.match: must be one of name"),
    ({"type": "tool_call", "name": "c", "match": "name", "operation": "eq"}, r"graders\[0\] \(c\)\.operation: unknown"),
    ({"type": "python", "name": "p"}, r"graders\[0\]\.type: must be one of string_check, text_similarity, tool_call"),
    ({"type": "tool_call", "name": "has space", "match": "name"}, r"graders\[0\]\.name: must be letters"),
])
def test_a_bad_grader_names_its_field(tmp_path, grader, field):
    with pytest.raises(graders.GraderError, match=field):
        graders.check([grader])
    # through params.yaml: one line naming the file and evaluate.graders
    with pytest.raises(ConfigError, match=r"params\.yaml: evaluate\.graders: " + field):
        load_config(_params(tmp_path), [f"evaluate.graders={json.dumps([grader])}"])


def test_primary_grader_must_name_a_declared_grader(tmp_path):
    with pytest.raises(ConfigError, match=r"evaluate: primary_grader: 'nope' is not the name of one of "
                                          r"evaluate.graders \(tool_call_exact, tool_use_exact\)"):
        load_config(_params(tmp_path), ["evaluate.primary_grader=nope"])
    cfg = load_config(_params(tmp_path), ["evaluate.primary_grader=tool_call_exact"])
    assert cfg.evaluate.graders[0]["reference"] == "{{item.tool_calls}}"     # defaults filled in


def test_the_tools_scenario_raises_max_seq_len_to_what_its_rows_need(tmp_path):
    assert load_config(_params(tmp_path), ["data.scenario=tools"]).model.max_seq_len == 640
    assert load_config(_params(tmp_path), ["data.scenario=tools", "model.max_seq_len=1024"]).model.max_seq_len == 1024
    assert load_config(_params(tmp_path)).model.max_seq_len == 256


def _params(tmp_path):
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "params.yaml"
    dst = tmp_path / "params.yaml"
    dst.write_text(src.read_text())
    return dst


def test_graded_turns_of_tool_rows():
    row = {"tool": "translate", "tools": TOOLS, "messages": [
        {"role": "user", "content": "Translate Save into Polish"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "translate", "arguments": json.dumps(CALL["arguments"])}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Zapisz"},
        {"role": "assistant", "content": "In Polish: Zapisz"}]}
    chat_row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "bye"}, {"role": "assistant", "content": "bye!"}]}
    items = graders.items([row, chat_row])
    assert [(it["row"], it["turn"]) for it in items] == [(0, 1), (0, 3), (1, 3)]
    assert items[0]["tool_calls"] == [CALL] and items[0]["messages"] == row["messages"][:1]
    assert items[0]["tool"] == "translate" and items[0]["tools"] == TOOLS
    assert items[1]["tool_calls"] == [] and items[1]["reference"] == "In Polish: Zapisz"
    assert items[2]["tools"] is None and items[2]["reference"] == "bye!"


class Scripted:
    """A runtime (``tuneops.inference.runtimes`` protocol, no cache) that writes a fixed reply after
    each known prompt: what a model that learnt the calls would write, token by token."""
    has_cache = False

    def __init__(self, prompts: list[list[int]], replies: list[list[int]], vocab: int):
        self.script = list(zip(prompts, replies))
        self.vocab = vocab

    def __call__(self, ids, mask):
        import numpy as np

        out = np.zeros((ids.shape[0], ids.shape[1], self.vocab), np.float32)
        for k in range(ids.shape[0]):
            seq = [int(t) for t, m in zip(ids[k], mask[k]) if m]
            prompt, reply = next((p, r) for p, r in self.script if seq[:len(p)] == p)
            out[k, len(seq) - 1, reply[len(seq) - len(prompt)]] = 1.0
        return out

    def step(self, *args):                 # never called: no cache (decode recomputes the sequences)
        raise AssertionError("no cache")

    def empty_cache(self, batch: int):
        raise AssertionError("no cache")


@pytest.mark.parametrize("family", ["mistral-v0.3", "llama3.1", "smollm2"])
def test_samples_keep_the_call_markers_and_parse_the_calls(family):
    """The replies graded are the model's own text: a marker that is a special token (Mistral's
    ``[TOOL_CALLS]``, Llama's ``<|python_tag|>``) is kept, so the call parses; decoding with the
    special tokens skipped (what evaluate did) loses Mistral's marker and with it the call."""
    from tests.inference.test_tool_training import call_text, prepared
    from tests.inference.test_toolcalls import CALL_A, TOOLS as WEATHER
    from tuneops.inference import chat

    tok, fmt, _ = prepared(family)
    convs = [[{"role": "user", "content": "What is the weather in Zurich?"}], [{"role": "user", "content": "Hi"}]]
    text = call_text(fmt, [CALL_A])
    if family == "llama3.1":
        text = "<|python_tag|>" + text
    stop = chat.stop_ids(tok)[0]
    replies = [tok(text, add_special_tokens=False)["input_ids"] + [stop],
               tok("Hello there.", add_special_tokens=False)["input_ids"] + [stop]]
    prompts = [chat.prompt_ids(tok, convs[0], tools=WEATHER), chat.prompt_ids(tok, convs[1])]
    runtime = Scripted(prompts, replies, len(tok))
    samples = graders.sample_replies(runtime, tok, convs, [WEATHER, None], 200, 2)
    assert samples[0]["output_tools"] == [CALL_A] and samples[0]["output_text"] == ""
    assert (fmt.start or "<|python_tag|>") in samples[0]["text"]
    assert samples[1] == {"text": "Hello there.", "output_text": "Hello there.", "output_tools": [],
                          "output_json": None}
    if family == "mistral-v0.3":
        skipped = tok.decode(replies[0], skip_special_tokens=True).strip()
        assert fmt.parse(skipped) == []              # the marker is gone: no call would be graded
    g = graders.check([{"type": "tool_call", "name": "exact", "match": "arguments"}])
    items = [{"row": 0, "tools": WEATHER, "tool_calls": [CALL_A], "reference": ""},
             {"row": 1, "tools": None, "tool_calls": [], "reference": "Hello"}]
    assert graders.score(g, items, samples)["graders"]["exact"] == {"type": "tool_call", "n": 1, "score": 1.0}
