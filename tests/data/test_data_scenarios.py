"""Every bundled scenario: `ingest` builds it offline from installed packages (counts add
up, nothing dropped silently) and it passes its own format's suite in `validate`."""
from __future__ import annotations

import shutil

import pytest

from tuneops.config import ConfigError, load_config
from tuneops.data import SCENARIOS
from tuneops.io import read_json, read_jsonl

from tests.conftest import make_project

BUNDLED = [name for name in SCENARIOS if name != "user"]
# Every scenario runs with params.yaml's own values: the tools scenario's rows (~450 tokens rendered)
# raise model.max_seq_len through Scenario.min_seq_len, not through an override here.


def _project(stage, name: str, *overrides: str):
    stage("model")
    root = make_project(f"scenario-{name}", (f"data.scenario={name}", "ingest.max_conversations=null", *overrides))
    cfg = load_config(root / "params.yaml")
    shutil.copytree(stage.cfg.path("base_model_dir"), cfg.path("base_model_dir"))
    return cfg


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_scenario_builds_and_passes_its_suite(name, stage, tokenizer, monkeypatch):
    from tasks import ingest, validate

    monkeypatch.setattr(validate, "load_tokenizer", lambda _: tokenizer)   # the same tokenizer, loaded once
    cfg = _project(stage, name)
    manifest = ingest.run(cfg)
    fmt = SCENARIOS[name]
    assert manifest["format"] == fmt and manifest["license"] and manifest["source"]
    dropped = sum(manifest.get(k, 0) for k in ("invalid", "duplicates", "near_duplicates", "too_long"))
    capped = manifest.get("over_max_per_label", 0)
    assert manifest["read"] == manifest["kept"] + dropped + capped
    assert manifest["kept"] == manifest["train_rows"] + manifest["eval_rows"] >= 200
    out = validate.run(cfg)
    report = read_json(cfg.path("validation_dir") / "report.json")
    assert report["success"] and report["format"] == fmt and report["problems"] == []
    assert report["counts"]["total"]["accepted"] == manifest["kept"]
    assert all(e["success"] for e in report["splits"]["train"]["expectations"])
    assert report["suites"][fmt]["version"] >= 1
    clean = read_jsonl(cfg.path("clean_train_data"))          # what training reads: chat records
    assert len(clean) == out["train_rows"] == manifest["train_rows"]
    assert all(m["role"] in ("user", "assistant", "system", "tool") for r in clean for m in r["messages"])


def test_translation_pairs_and_other_locales(stage):
    from tasks import ingest

    cfg = _project(stage, "translation", "ingest.target_language=de")
    ingest.run(cfg)
    rows = read_jsonl(cfg.path("train_data"))
    assert {(r["source_lang"], r["target_lang"]) for r in rows} == {("en", "de")}
    cfg = _project(stage, "translation", "ingest.target_language=xx")
    with pytest.raises(ConfigError, match=r"^ingest.target_language: Django has no locale 'xx'"):
        ingest.run(cfg)


def test_scenario_and_format_must_agree(tmp_path):
    from tests.conftest import REPO

    with pytest.raises(ConfigError, match=r"data: scenario 'topics' produces format 'classification'"):
        load_config(REPO / "params.yaml", ["data.scenario=topics", "data.format=chat"])
    with pytest.raises(ConfigError, match=r"scenario 'user' needs an explicit format"):
        load_config(REPO / "params.yaml", ["data.scenario=user"])
    cfg = load_config(REPO / "params.yaml", ["data.scenario=ner"])
    assert cfg.data.resolved_format == "ner"


def test_tools_scenario_calls_each_function_with_exact_arguments(stage, tokenizer, monkeypatch):
    """The ``tools`` scenario: fixed-seed, the same rows on every build; each row declares the three
    functions and calls the one it names with arguments that satisfy its schema (or, small talk,
    calls nothing); stratified per function; the held-out split has every kind."""
    import json

    from tuneops.data import formats, scenarios, sources

    cfg = _project(stage, "tools")
    train, eval_, manifest = scenarios.build("tools", cfg.ingest)
    again = scenarios.build("tools", cfg.ingest)
    assert (train, eval_) == again[:2]
    kinds = {"define_word", "translate", "get_sentiment", "none"}
    assert set(manifest["candidates"]) == kinds and manifest["kept"] == len(train) + len(eval_)
    assert {r["tool"] for r in eval_} == kinds
    for r in train + eval_:
        assert r["tools"] == sources.TOOLS and formats.record_issues("chat", r) == []
        calls = [c for m in r["messages"] for c in m.get("tool_calls") or []]
        assert [c["function"]["name"] for c in calls] == ([] if r["tool"] == "none" else [r["tool"]])
        for c in calls:                      # the exact arguments are in the user's question
            args = json.loads(c["function"]["arguments"])
            first = next(iter(args.values()))
            assert first in r["messages"][0]["content"]
