"""The ``preference`` format (issue 33): one definition of a preference row's checks (each side is a
chat record: the chat checks, with the row's own field names), used by the gate, ingest and
``training/preference.py``; token rules with the model's tokenizer; the bundled ``preference``
scenario. Unit tier: the tokenizer comes from the shared cache, no project or stages."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneops.data import formats
from tuneops.data.gate import Settings, validate_dataset

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".tuneops" / "pytest" / "state" / "cache"


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def row(prompt, chosen, rejected, **inp):
    return {"input": {"messages": prompt, **inp}, "preferred_output": [chosen], "non_preferred_output": [rejected]}


@pytest.fixture(scope="module")
def tok():
    from tuneops.models import gemma_tokenizer

    return gemma_tokenizer(CACHE)


@pytest.mark.parametrize("obj,expected", [
    ({"input": {"messages": [U("Hi")]}, "preferred_output": [A("Hello."), A("Again")],
      "non_preferred_output": [A("Go away.")]},
     ("preferred_output", "one_assistant", "needs exactly one assistant message (got 2 message(s), "
                                           "roles ['assistant', 'assistant'])")),
    (row([U("Hi")], A("Hello."), A(" Hello. ")),
     ("non_preferred_output", "identical", "the non_preferred_output reply is the same as the preferred_output one: "
                                           "no preference to learn")),
    ({"chosen": [U("Hi"), A("Hello.")], "rejected": [U("Hey"), A("Go away.")]},
     ("rejected[0]", "prompt_prefix", "chosen and rejected must share every turn but the last (they differ here)")),
    # the chat record's checks, named by the row's fields
    (row([U("Hi"), U("Again")], A("a"), A("b")),
     ("input.messages[1].role", "order", "two user turns in a row (messages[0] and messages[1]): turns must "
                                         "alternate")),
    (row([{"role": "bot", "content": "Hi"}], A("a"), A("b")),
     ("input.messages[0].role", "enum", "role must be one of system, user, assistant, tool, function (got 'bot')")),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "b"}, ("chosen", "non_empty", "chosen is empty or whitespace")),
    ({"prompt": [U("Hi")], "chosen": [A("")], "rejected": [A("b")]},
     ("chosen[0].content", "non_empty", "content is empty or whitespace")),
    (row([U("Hi")], A("a"), A("b"), tools="x"),
     ("input.tools", "type", "'tools' must be a list of {\"type\": \"function\", \"function\": {...}}")),
    (row([U("Hi"), A("Hey")], A("a"), A("b")),
     ("input.messages[1].role", "prompt_end", "the prompt must end with a user (or tool) turn, not an assistant turn")),
    ({"text": "x"}, ("(record)", "format", "not a preference row: expected OpenAI's 'input' / 'preferred_output' / "
                                           "'non_preferred_output' or TRL's 'prompt' / 'chosen' / 'rejected'")),
])
def test_bad_rows_name_field_and_rule(obj, expected):
    assert formats.record_issues("preference", obj)[0] == expected


def test_every_form_is_one_pair_and_one_key():
    """OpenAI DPO, TRL text, TRL messages and TRL implicit prompt: the same pair, so the same
    duplicate key (a pair repeated in another form is a duplicate)."""
    spec = formats.get("preference")
    forms = [row([U("Hi")], A("Hello."), A("Go away.")),
             {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
             {"prompt": [U("Hi")], "chosen": [A("Hello.")], "rejected": [A("Go away.")]},
             {"chosen": [U("Hi"), A("Hello.")], "rejected": [U("Hi"), A("Go away.")]}]
    assert all(formats.record_issues("preference", f) == [] for f in forms)
    assert len({spec.exact_key(f) for f in forms}) == 1 and len({spec.near_key(f) for f in forms}) == 1
    assert spec.to_chat(forms[1]) == [U("Hi"), A("Hello.")]                       # SFT on preference data: chosen
    assert spec.sides(forms[3]) == [[U("Hi"), A("Hello.")], [U("Hi"), A("Go away.")]]
    # the pair form training reads is the same for all
    assert len({json.dumps(formats.preference_openai(f), sort_keys=True) for f in forms}) == 1


def test_training_parses_rows_with_the_same_checks():
    from tuneops.training import preference

    bad = row([U("Hi")], A("Hello."), A("Hello."))
    assert preference.parse(bad)[1] == formats.record_issues("preference", bad)
    pair, issues = preference.parse(row([U("Hi")], A("Hello."), A("Go away.")), 3)
    assert issues == [] and pair.line == 3 and pair.chosen == A("Hello.")


def _gate(tok, tmp_path, lines, **kw):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return validate_dataset({"train": p}, tok, Settings(format="preference", **kw))


def test_gate_rejects_a_long_side_and_duplicates_naming_line_field_and_rule(tok, tmp_path):
    good = [row([U(f"Do you like {w}?")], A(f"Yes, {w}."), A("No.")) for w in ("tea", "cake", "rain")]
    long = row([U("Tell me more.")], A("Sure."), A("word " * 300))           # only the rejected side is long
    res = _gate(tok, tmp_path, good + [long, {"prompt": "Do you like tea?", "chosen": "Yes, tea.", "rejected": "No."}],
                max_seq_len=64)
    problems = [(p.line, p.field, p.rule) for p in res.problems]
    assert (4, "non_preferred_output", "max_tokens") in problems
    assert (5, "(record)", "duplicate") in problems                  # line 1's pair, in TRL's text form
    assert len(res.splits["train"].accepted) == 3


def test_bundled_preference_scenario_passes_its_gate(tok, tmp_path):
    from tuneops.config import load_config
    from tuneops.data import scenarios

    cfg = load_config(REPO / "params.yaml", ["data.scenario=preference", "ingest.max_conversations=200"])
    train, eval_, manifest = scenarios.build("preference", cfg.ingest)
    assert manifest["format"] == "preference" and manifest["license"] == "BSD-3-Clause"
    assert len(train) + len(eval_) == 200
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_))
    res = validate_dataset({"train": tmp_path / "t.jsonl", "eval": tmp_path / "e.jsonl"}, tok,
                           Settings(format="preference", max_seq_len=256, min_rows=5))
    assert res.success, [str(p) for p in res.problems[:5]]
    # honest pairs: the rejected reply answers a prompt of another category, never this prompt's own reply
    for r in train:
        assert r["preferred_output"][0]["content"] != r["non_preferred_output"][0]["content"]
