"""Every record format: a good file passes; each bad record is reported with its exact
line, field and rule; CSV/Parquet where natural; token lengths equal training's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneops.data import formats
from tuneops.data.gate import Settings, segment_texts, validate_dataset

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines),
                    encoding="utf-8")
    return path


def _gate(tokenizer, fmt: str, files: dict[str, Path], **settings) -> tuple[list[str], object]:
    result = validate_dataset(files, tokenizer, Settings(format=fmt, **settings))
    out = []
    for p in result.problems:
        line = str(p)
        for name, path in files.items():
            line = line.replace(str(path), name.upper())
        out.append(line)
    return out, result


def _chat(*turns, **extra) -> dict:
    return {"messages": [dict(zip(("role", "content"), t)) if isinstance(t, tuple) else t for t in turns], **extra}


# (format, good records, bad records, exact problem lines; TRAIN:<n> is the 1-based line in good+bad)
CASES = {
    "chat": (
        [CHAT, _chat(("system", "Be brief."), ("user", "2+2?"), {"role": "assistant", "content": "4", "weight": 1},
                     id=7, meta={"src": "x"})],
        [_chat(("user", "Hi"), ("user", "Again"), ("assistant", "Yes")),
         _chat(("user", "Q"), ("assistant", "A"), ("system", "late")),
         _chat({"role": "user", "content": "Q", "weight": 1}, ("assistant", "A1")),
         _chat(("user", "Q2"), {"role": "assistant", "content": "A2", "weight": 0}),
         _chat(("user", "Q3"), ("assistant", "  ")),
         {"msgs": []},
         _chat(("bot", "Q4"), ("assistant", "A4"))],
        ["TRAIN:3: messages[1].role: order: two user turns in a row (messages[0] and messages[1]): turns must alternate",
         "TRAIN:4: messages[2].role: order: a system message may only come first",
         "TRAIN:5: messages[0].weight: enum: weight is allowed on assistant turns only, as 0 or 1",
         "TRAIN:6: messages: assistant_turn: every assistant turn has weight 0: nothing to train on",
         "TRAIN:7: messages[1].content: non_empty: content is empty or whitespace",
         "TRAIN:7: messages: assistant_turn: needs at least one assistant turn with non-empty content or tool calls",
         "TRAIN:8: messages: required: missing 'messages'",
         "TRAIN:9: messages[0].role: enum: role must be one of system, user, assistant, tool, function (got 'bot')"],
    ),
    "instruction": (
        [{"prompt": "Write a haiku.", "completion": "Old pond, frog jumps in."}, {"prompt": "Say hi", "completion": "Hi"}],
        [{"prompt": "Hi", "completion": 5}, {"prompt": "  "}],
        ["TRAIN:3: completion: type: completion must be a string (got int)",
         "TRAIN:4: prompt: non_empty: prompt is empty or whitespace",
         "TRAIN:4: completion: required: missing 'completion'"],
    ),
    "text": (
        [{"text": "Django is a web framework."}, {"text": "Models map to tables.", "source": "docs"}],
        [{"text": ""}, {"txt": "a"}, ["text"]],
        ["TRAIN:3: text: non_empty: text is empty or whitespace",
         "TRAIN:4: text: required: missing 'text'",
         "TRAIN:5: (record): type: expected a JSON object, got list"],
    ),
    "classification": (
        [{"text": "great film", "label": "pos"}, {"text": "awful film", "label": "neg"}, {"text": "fine", "label": 1}],
        [{"text": "meh", "label": True}, {"text": "x"}, {"text": "ok", "label": " "}],
        ["TRAIN:4: label: type: label must be a string or an integer (got bool)",
         "TRAIN:5: label: required: missing 'label'",
         "TRAIN:6: label: non_empty: label is empty or whitespace"],
    ),
    "ner": (
        [{"tokens": ["Ada", "Lovelace", "was", "born", "in", "London"],
          "tags": ["B-PER", "I-PER", "O", "O", "O", "B-LOC"]}, {"tokens": ["Hi"], "tags": ["O"]}],
        [{"tokens": ["in", "Paris"], "tags": ["O", "I-LOC"]},
         {"tokens": ["New", "York", "Times"], "tags": ["B-ORG", "I-ORG"]},
         {"tokens": ["Bob", "Paris"], "tags": ["B-PER", "I-LOC"]},
         {"tokens": ["x", " "], "tags": ["PER", "O"]}],
        ["TRAIN:3: tags[1]: bio: I-LOC follows O (an entity starts with B-LOC)",
         "TRAIN:4: tags: length: 2 tags for 3 tokens",
         "TRAIN:5: tags[1]: bio: I-LOC follows B-PER (an entity starts with B-LOC)",
         "TRAIN:6: tokens[1]: non_empty: token is empty or whitespace",
         "TRAIN:6: tags[0]: tag_format: tag must be O, B-TYPE or I-TYPE (got 'PER')"],
    ),
    "translation": (
        [{"source": "Save %(name)s", "target": "Zapisz %(name)s", "source_lang": "en", "target_lang": "pl"},
         {"source": "Delete", "target": "Usuń", "source_lang": "en", "target_lang": "pl"}],
        [{"source": "Hello %(name)s", "target": "Cześć", "source_lang": "en", "target_lang": "pl"},
         {"source": "Yes", "target": "Yes", "source_lang": "en", "target_lang": "EN"},
         {"source": "No", "target": "Nie", "source_lang": "english", "target_lang": "pl"}],
        ["TRAIN:3: target: placeholders: placeholders differ: source ['%(name)s'], target []",
         "TRAIN:4: target_lang: language_pair: source and target language are both 'en'",
         "TRAIN:5: source_lang: language: source_lang must be a language code like 'en' or 'pt_BR' (got 'english')"],
    ),
    "qa": (
        [{"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France", "answer_start": 12},
         {"question": "What is 2+2?", "answer": "4"}],
        [{"context": "Paris is in France.", "question": "Where?", "answer": "France", "answer_start": 3},
         {"question": "Q?", "answer": "A", "answer_start": 0},
         {"context": "c", "question": "Q2?", "answer": "c", "answer_start": -1},
         {"context": 5, "question": "Q3?", "answer": "A3"}],
        ["TRAIN:3: answer_start: answer_span: context[3:9] is 'is is ', not the answer 'France'",
         "TRAIN:4: context: required: an answer span (answer_start) needs a non-empty context",
         "TRAIN:5: answer_start: type: answer_start must be an integer >= 0 (got -1)",
         "TRAIN:6: context: type: context must be a string (got int)"],
    ),
    "preference": (
        [{"input": {"messages": [{"role": "user", "content": "Do you like tea?"}]},
          "preferred_output": [{"role": "assistant", "content": "Yes, with milk."}],
          "non_preferred_output": [{"role": "assistant", "content": "The train leaves at six."}]},
         {"prompt": "Say hi", "chosen": "Hi!", "rejected": "Goodbye forever."}],
        [{"input": {"messages": [{"role": "user", "content": "Hi"}]},
          "preferred_output": [{"role": "assistant", "content": "Hello."}, {"role": "assistant", "content": "Again."}],
          "non_preferred_output": [{"role": "assistant", "content": "Bye."}]},
         {"prompt": "Hi", "chosen": "Hello.", "rejected": " Hello. "},
         {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
          "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Bye."}]}],
        ["TRAIN:3: preferred_output: one_assistant: needs exactly one assistant message (got 2 message(s), "
         "roles ['assistant', 'assistant'])",
         "TRAIN:4: rejected: identical: the rejected reply is the same as the chosen one: no preference to learn",
         "TRAIN:5: rejected[0]: prompt_prefix: chosen and rejected must share every turn but the last (they differ "
         "here)"],
    ),
}


@pytest.mark.parametrize("fmt", list(CASES))
def test_good_records_pass(fmt, tmp_path, tokenizer):
    good, _, _ = CASES[fmt]
    problems, result = _gate(tokenizer, fmt, {"train": _write(tmp_path / "good.jsonl", good)})
    assert problems == [] and result.success
    assert result.counts()["train"] == {"read": len(good), "accepted": len(good), "rejected": 0, "rejected_by_rule": {}}


@pytest.mark.parametrize("fmt", list(CASES))
def test_each_bad_record_names_line_field_and_rule(fmt, tmp_path, tokenizer):
    good, bad, expected = CASES[fmt]
    problems, result = _gate(tokenizer, fmt, {"train": _write(tmp_path / "bad.jsonl", good + bad)})
    assert problems == expected
    assert not result.success and result.counts()["train"]["rejected"] == len(bad)


def test_token_length_is_what_training_sees(tmp_path, tokenizer):
    """The max_seq_len rule counts tokens exactly as training tokenizes (chat.tokenize)."""
    from tuneops.inference.chat import render, tokenize

    rec = {"text": "word " * 40}
    expected = len(tokenize(formats.get("text").to_chat(rec), tokenizer, 10**6)["input_ids"])
    problems, _ = _gate(tokenizer, "text", {"train": _write(tmp_path / "long.jsonl", [{"text": "short"}, rec])},
                        max_seq_len=16)
    assert problems == [f"TRAIN:2: text: max_seq_len: {expected} tokens > max_seq_len 16 (model tokenizer)"]
    conv = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
            {"role": "assistant", "content": "A", "weight": 0}, {"role": "user", "content": "V"},
            {"role": "assistant", "content": "B"}]
    assert segment_texts(conv, tokenizer) == [render(tokenizer, conv)]


def test_duplicates_near_duplicates_and_leakage(tmp_path, tokenizer):
    t = {"text": "Hello, World!"}
    train = _write(tmp_path / "train.jsonl", [t, {"text": "other"}, t, {"text": "hello world"}])
    eval_ = _write(tmp_path / "eval.jsonl", [{"text": "fresh"}, {"text": "other"}, {"text": "Hello world."}])
    problems, result = _gate(tokenizer, "text", {"train": train, "eval": eval_}, max_near_duplicate_fraction=0.0)
    assert problems == [
        "TRAIN:3: text: duplicate: same record as line 1 (validate.max_duplicate_fraction 0.0)",
        "TRAIN:4: text: near_duplicate: same as line 1 after normalising case, punctuation and spacing "
        "(validate.max_near_duplicate_fraction 0.0)",
        "EVAL:2: text: leakage: same record as TRAIN:2 (train/eval leakage)",
        "EVAL:3: text: near_leakage: same as TRAIN:1 after normalising case, punctuation and spacing "
        "(validate.max_near_duplicate_fraction 0.0)",
    ]
    # Within the tolerance, near duplicates pass (and are counted in the expectation results).
    problems, result = _gate(tokenizer, "text", {"train": train}, max_duplicate_fraction=0.3,
                             max_near_duplicate_fraction=0.3)
    assert problems == [] and result.success
    near = next(e for e in result.splits["train"].expectations if e["rule"] == "near_duplicate")
    assert near["success"] and near["unexpected_count"] == 1 and near["unexpected_lines"] == [4]


def test_dataset_level_rules(tmp_path, tokenizer):
    rows = [{"text": f"text {i}", "label": "a"} for i in range(30)] + [{"text": "lonely", "label": "b"}]
    f = _write(tmp_path / "cls.jsonl", rows)
    problems, _ = _gate(tokenizer, "classification", {"train": f}, max_label_imbalance=10, min_rows=40)
    assert problems == ["TRAIN:0: (dataset): min_rows: 31 rows, need at least 40 (validate.min_rows)",
                        "TRAIN:0: label: balance: label 'b' has 1 rows, 'a' has 30: imbalance 30.0 > 10 "
                        "(validate.max_label_imbalance)"]
    problems, _ = _gate(tokenizer, "classification", {"train": f}, labels=("a", "c"))
    assert problems == ["TRAIN:31: label: label_set: label 'b' is not in data.labels"]
    ev = _write(tmp_path / "ev.jsonl", [{"text": "new one", "label": "z"}])
    problems, _ = _gate(tokenizer, "classification", {"train": f, "eval": ev})
    assert problems == ["EVAL:1: label: label_set: label 'z' is not in the labels seen in train"]
    only_o = _write(tmp_path / "o.jsonl", [{"tokens": ["a", str(i)], "tags": ["O", "O"]} for i in range(3)])
    problems, _ = _gate(tokenizer, "ner", {"train": only_o})
    assert problems == ["TRAIN:0: tags: entities: no entities in the dataset (every tag is O)"]
    rows = CASES["ner"][0] + [{"tokens": ["Bob", "left"], "tags": ["B-PER", "O"]}]
    problems, _ = _gate(tokenizer, "ner", {"train": _write(tmp_path / "t.jsonl", rows)}, entity_types=("PER",))
    assert problems == ["TRAIN:1: tags[5]: entity_type: entity type 'LOC' is not in data.entity_types ['PER']"]
    tr = _write(tmp_path / "tr.jsonl", [{"source": "OK", "target": "x" * 200, "source_lang": "en", "target_lang": "pl"}])
    problems, _ = _gate(tokenizer, "translation", {"train": tr})
    assert problems == ["TRAIN:1: target: length_ratio: target/source length ratio 20.80 is outside 1/4.0..4.0 "
                        "(validate.max_length_ratio)"]


def test_csv_records_start_at_their_first_line(tmp_path, tokenizer):
    f = tmp_path / "cls.csv"
    f.write_text('text,label\n"hello\nworld",pos\nbad row,neg,extra\n,neg\ngreat,neg\n', encoding="utf-8")
    problems, result = _gate(tokenizer, "classification", {"train": f})
    assert problems == ["TRAIN:4: (line): csv: 3 cells, header has 2 columns",
                        "TRAIN:5: text: required: missing 'text'"]
    assert [r.obj for r in result.splits["train"].accepted] == [{"text": "hello\nworld", "label": "pos"},
                                                                {"text": "great", "label": "neg"}]
    qa = tmp_path / "qa.csv"
    qa.write_text("context,question,answer,answer_start\nParis is in France.,Where?,France,12\n,Q?,A,\n")
    assert _gate(tokenizer, "qa", {"train": qa})[0] == []
    ner = tmp_path / "ner.csv"
    ner.write_text("tokens,tags\na,O\n")
    assert _gate(tokenizer, "ner", {"train": ner})[0] == [
        "TRAIN:0: (file): format: CSV cannot hold format 'ner' (nested lists): use JSONL or Parquet"]


def test_parquet_rows_are_numbered(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = CASES["ner"][0]
    rows = good + [{"tokens": ["in", "Rome"], "tags": ["O", "I-LOC"]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ner.parquet")
    problems, result = _gate(tokenizer, "ner", {"train": tmp_path / "ner.parquet"})
    assert problems == ["TRAIN:3: tags[1]: bio: I-LOC follows O (an entity starts with B-LOC)"]
    assert result.counts()["train"]["accepted"] == 2
    chat = [CHAT, _chat(("user", "Q"), ("assistant", "A"))]
    pq.write_table(pa.Table.from_pylist(chat), tmp_path / "chat.parquet")
    assert _gate(tokenizer, "chat", {"train": tmp_path / "chat.parquet"})[0] == []
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    problems, _ = _gate(tokenizer, "chat", {"train": tmp_path / "broken.parquet"})
    assert len(problems) == 1 and problems[0].startswith("TRAIN:0: (file): parquet: unreadable Parquet:")
