"""A new task head is one spec entry (``tuneops/training/heads.py`` ``HEADS``). A toy head,
registered by the fixture below and removed afterwards, is accepted by config, the planner,
select, validate, the methods, the training features and collator, scoring, evaluate's metric
and both serving readers, with no other file changed."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import REPO

TOY = "toy_length"
GEMMA = REPO / "tests" / "fixtures" / "model_configs" / "gemma3-270m.json"
TEXTS = ["short one", "a rather longer line of plain domain text", "tiny", "four words right here",
         "five words are in here", "no"]


def _names(train: list, labels: list | None, entity_types: list | None) -> list[str]:
    return ["short", "long"]


def _encode(record: dict, tokenizer, max_len: int, label2id: dict[str, int]) -> dict:
    enc = tokenizer(record["text"], truncation=True, max_length=max_len)
    return {"input_ids": list(enc["input_ids"]), "labels": label2id["long" if len(record["text"].split()) > 3 else "short"]}


def _score(features: list[dict], pred: list[int], labels: list[str]) -> tuple[dict, list[str]]:
    gold = [f["labels"] for f in features]
    return {"length_accuracy": sum(g == p for g, p in zip(gold, pred)) / len(gold)}, [labels[p] for p in pred]


@pytest.fixture
def toy_head():
    """A per-sequence head on ``text`` data (is the line long?): one registry entry, nothing else."""
    from tuneops.training import heads

    spec = heads.Head(TOY, "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                      "SEQ_CLS", primary_metric="length_accuracy", higher_is_better=True, per_token=False,
                      data_format="text", record_fields=("text",), label_names=_names, encode=_encode, score=_score)
    assert TOY not in heads.HEADS
    heads.HEADS[TOY] = spec
    try:
        yield spec
    finally:
        del heads.HEADS[TOY]


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory) -> Path:
    from tuneops import models
    from tuneops.config import load_config

    cfg = load_config(REPO / "params.yaml", ["model.source=minilm"])
    return models.prepare(cfg.model, tmp_path_factory.mktemp("minilm") / "base", tmp_path_factory.mktemp("cache"))


def test_an_unregistered_head_is_refused_by_config_and_planner():
    from tuneops.config import ConfigError, load_config
    from tuneops.planner import Goals, Hardware, ModelSpec, PlanError, make_plan

    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", [f"select.task_head={TOY}"])
    assert "select.task_head: must be one of auto, causal_lm, sequence_classification, token_classification" in str(err.value)
    with pytest.raises(PlanError, match=f"unknown task head '{TOY}'"):
        make_plan(ModelSpec.from_path(GEMMA), Hardware.from_params({"gpus": 0, "host_ram_gb": 16}), 128, Goals(),
                  scenario="text", task_head=TOY)


def test_config_planner_and_select_accept_a_registered_head(toy_head):
    from tasks.select import choose_head
    from tuneops.config import load_config
    from tuneops.planner import Goals, Hardware, ModelSpec, PlanError, estimate, load_table, make_plan
    from tuneops.planner.memory import MemoryModelConstants
    from tuneops.planner.rules import _base_setup

    assert load_config(REPO / "params.yaml", [f"select.task_head={TOY}"]).select.task_head == TOY
    assert load_table().scenarios["text"].task_head == TOY          # the format's head, from the spec
    gemma, cpu = ModelSpec.from_path(GEMMA), Hardware.from_params({"gpus": 0, "host_ram_gb": 16})
    assert choose_head("auto", "text", gemma) == (TOY, f"text data trains a {TOY} head (select.task_head auto)")
    assert choose_head(TOY, "text", gemma)[0] == TOY
    with pytest.raises(PlanError, match=f"select.task_head {TOY}: the head trains on text data"):
        choose_head(TOY, "chat", gemma)
    plan = make_plan(gemma, cpu, 128, Goals(method="lora"), scenario="text")
    assert plan.task_head == TOY and plan.to_dict()["task_head"] == TOY
    # the memory model prices its outputs from the spec: one row of label logits per sequence
    c = MemoryModelConstants()
    setup = _base_setup(gemma, cpu, "lora", Goals(), 128, TOY)
    like = _base_setup(gemma, cpu, "lora", Goals(), 128, "sequence_classification")
    lm = _base_setup(gemma, cpu, "lora", Goals(), 128, "causal_lm")
    assert estimate(gemma, setup, c).logits == estimate(gemma, like, c).logits < estimate(gemma, lm, c).logits


def test_validate_keeps_the_heads_record_and_labels(toy_head, tmp_path):
    from tasks.validate import head_labels, write_clean
    from tuneops.data.gate import SplitResult
    from tuneops.data.records import Row

    rows = [Row(i + 1, {"text": t, "source": "x"}) for i, t in enumerate(TEXTS)]
    split = SplitResult("train", "train.jsonl", kind="csv", rows=len(rows), accepted=rows)
    out = write_clean(split, "text", tmp_path / "clean.jsonl")
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["record"] for line in lines] == [{"text": t} for t in TEXTS]     # the spec's record fields
    assert lines[0]["messages"][-1] == {"role": "assistant", "content": TEXTS[0]}
    assert head_labels("text", split, None, None) == ["short", "long"]
    assert head_labels("chat", split, None, None) is None


def test_methods_training_scoring_and_serving_read_the_spec(toy_head, minilm_dir, tmp_path):
    import mlflow.pyfunc
    from transformers import AutoTokenizer

    from tuneops.inference.engine import Classifier
    from tuneops.serving import HeadModel
    from tuneops.training import heads, methods

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    peft = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["query", "value"]}
    plan = {"task_head": TOY, "labels": ["short", "long"], "method": "lora", "peft": peft}
    assert heads.is_head(plan) and heads.of(plan).direction == "higher"        # evaluate's metrics.json
    assert methods.label_prefix({**plan, "method": "prompt_tuning", "peft": {"num_virtual_tokens": 4}}) == 0
    features = heads.encode([{"record": {"text": t}} for t in TEXTS], tok, 32, plan)
    assert [f["labels"] for f in features] == [0, 1, 0, 1, 1, 0]
    batch = heads.HeadCollator(tok.pad_token_id)(features)
    assert tuple(batch["labels"].shape) == (len(TEXTS),)                         # one label per sequence
    model = methods.build(minilm_dir, plan)
    assert model.peft_config["default"].task_type == "SEQ_CLS"                   # the spec's peft task type
    assert type(model.base_model.model).__name__ == "BertForSequenceClassification"
    metrics, names = heads.score(model, features, plan, 4, tok.pad_token_id)
    assert set(metrics) == {heads.of(plan).primary_metric} and 0 <= metrics["length_accuracy"] <= 1
    assert len(names) == len(TEXTS) and set(names) <= {"short", "long"}

    # serving: the registered pyfunc and the API's classifier answer one label per text
    merged = tmp_path / "model"
    model.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(tmp_path / "tokenizer")
    config = {"task_head": TOY, "labels": ["short", "long"], "max_seq_len": 32}
    served = HeadModel()
    served.load_context(SimpleNamespace(model_config=config, artifacts={"model": str(merged),
                                                                        "tokenizer": str(tmp_path / "tokenizer")}))
    assert served.predict(None, TEXTS) == names
    folder = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(str(folder), python_model=HeadModel(), model_config=config, pip_requirements=[],
                             artifacts={"model": str(merged), "tokenizer": str(tmp_path / "tokenizer")})
    assert Classifier(pyfunc_dir=folder, task_head=TOY).classify(TEXTS) == [{"label": n} for n in names]
