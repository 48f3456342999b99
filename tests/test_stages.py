"""Each stage, for real, on the tiny Gemma-3 model (in pipeline order)."""
from __future__ import annotations

import json

import pytest

from tuneops.io import md5_file, read_json, read_jsonl


def test_model_stage_writes_a_loadable_hf_folder(stage, tiny_cfg):
    out = stage("model")
    base = tiny_cfg.path("base_model_dir")
    assert out["source"] == "tiny" and (base / "config.json").is_file()
    assert (base / "model.safetensors").is_file() and (base / "tokenizer_config.json").is_file()
    from tuneops.models import load_causal_lm

    assert sum(p.numel() for p in load_causal_lm(base).parameters()) == out["params"]


def test_ingest_is_deterministic_and_counts_add_up(stage, tiny_cfg):
    out = stage("ingest")
    train, eval_ = read_jsonl(tiny_cfg.path("train_data")), read_jsonl(tiny_cfg.path("eval_data"))
    assert out["read"] == out["kept"] + out["duplicates"] + out["too_long"]
    assert len(train) + len(eval_) == 100 == out["train_rows"] + out["eval_rows"]  # ingest.max_conversations
    assert not {json.dumps(r["messages"]) for r in train} & {json.dumps(r["messages"]) for r in eval_}
    before = md5_file(tiny_cfg.path("train_data"))
    from tasks.ingest import run

    run(tiny_cfg)
    assert md5_file(tiny_cfg.path("train_data")) == before


def test_validate_passes_bundled_data_with_every_expectation(stage, tiny_cfg):
    stage("validate")
    report = read_json(tiny_cfg.path("validation_dir") / "report.json")
    assert report["success"] and report["train_tokens"] > 0
    exps = report["splits"]["train"]["expectations"]
    assert len(exps) == 5 and all(e["success"] for e in exps)


def test_select_plans_lora_on_cpu_with_consistent_batches(stage, tiny_cfg):
    stage("select")
    plan = read_json(tiny_cfg.path("plan"))
    assert plan["method"] == "lora" and plan["zero_stage"] == 0 and plan["fits"]
    assert plan["micro_batch_size"] * plan["grad_accum"] * plan["world_size"] == plan["global_batch_size"] == 4
    assert plan["reasons"]


def test_train_lowers_loss_and_logs_steps_to_mlflow(stage, tiny_cfg):
    out = stage("train")
    history = read_json(tiny_cfg.path("train_dir") / "history.json")
    assert len(history) == tiny_cfg.train.max_steps
    first, last = history[0]["loss"], min(h["loss"] for h in history[-3:])
    assert last < first, history
    adapter = tiny_cfg.path("train_dir") / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    import mlflow

    from tuneops.registry import tracking

    tracking.setup(tiny_cfg)
    client = mlflow.MlflowClient()
    losses = client.get_metric_history(out["mlflow_run_id"], "loss")
    assert [m.step for m in losses] == list(range(1, tiny_cfg.train.max_steps + 1))
    assert {"tokens_per_s", "peak_memory_mb", "grad_norm", "learning_rate", "loss"} <= set(
        client.get_run(out["mlflow_run_id"]).data.metrics)


def test_evaluate_finetuned_beats_base(stage, tiny_cfg):
    out = stage("evaluate")
    assert out["finetuned_perplexity"] < out["base_perplexity"]
    gens = read_jsonl(tiny_cfg.path("evaluate_dir") / "generations.jsonl")
    assert len(gens) == tiny_cfg.evaluate.generations and all(isinstance(g["finetuned"], str) for g in gens)


def test_optimize_onnx_parity_and_int8_variant(stage, tiny_cfg):
    out = stage("optimize")
    fp32, int8 = out["variants"]["fp32"], out["variants"]["int8"]
    assert fp32["max_abs_logits_diff"] <= 1e-3 and fp32["accepted"]
    assert fp32["perplexity"] == pytest.approx(out["torch_perplexity"], rel=1e-3)
    assert int8["size_ratio"] < 0.6
    assert abs(int8["perplexity_change_pct"]) < 5
    assert (tiny_cfg.path("optimize_dir") / int8["path"]).is_file()


def test_register_champion_with_lineage_and_a_loadable_model(stage, tiny_cfg):
    out = stage("register")
    import mlflow

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(tiny_cfg.register.model_name, "champion")
    assert out["alias"] == "champion" and int(version.version) == int(out["version"])
    assert version.tags["data.train.md5"] == md5_file(tiny_cfg.path("train_data"))
    assert version.tags["data.eval.md5"] == md5_file(tiny_cfg.path("eval_data"))
    assert version.tags["params.hash"] == tiny_cfg.sections_hash() and "git.commit" in version.tags
    assert version.tags["data.scenario"] == "chat" and version.tags["data.format"] == "chat"
    run = client.get_run(out["mlflow_run_id"])
    report = read_json(tiny_cfg.path("validation_dir") / "report.json")
    assert run.data.metrics["data_train_read"] == report["counts"]["train"]["read"] > 0
    assert run.data.metrics["data_total_accepted"] + run.data.metrics["data_total_rejected"] == \
        run.data.metrics["data_total_read"]
    assert "validation/data_docs/index.html" in [
        f.path for f in client.list_artifacts(out["mlflow_run_id"], "validation/data_docs")]
    model = mlflow.pyfunc.load_model(f"models:/{tiny_cfg.register.model_name}@champion")
    replies = model.predict({"messages": [{"role": "user", "content": "Hello"}]}, params={"max_tokens": 3})
    assert len(replies) == 1 and isinstance(replies[0], str)
    meta = model.metadata
    assert [i.name for i in meta.get_input_schema().inputs] == ["messages"]
    assert {p.name for p in meta.get_params_schema().params} >= {"max_tokens", "temperature"}
    reqs = open(mlflow.pyfunc.get_model_dependencies(f"models:/{tiny_cfg.register.model_name}@champion")).read()
    assert "onnxruntime==" in reqs and "transformers==" in reqs and "torch" not in reqs


def test_register_again_finishes_the_same_version_with_the_gate_numbers_on_it(stage, tiny_cfg):
    """register is convergent: a rerun on the same training run finds its version by the
    registration key (no new version) and redoes nothing that is done. The champion gate's
    numbers and how they were measured are on the version. (A worse model against a champion,
    re-scored on the same rows: tests/test_robustness.py and test_registry_cli.py.)"""
    import mlflow

    from tasks.register import run

    first = stage("register")
    again = run(tiny_cfg)
    assert again["version"] == first["version"] and again["alias"] == first["alias"]
    client = mlflow.MlflowClient()
    name = tiny_cfg.register.model_name
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert float(tags["gate.challenger.perplexity"]) > 0 and tags["gate.eval_data.md5"]
    assert "Promotion gate" in versions[0].description


def test_promotion_gate_rules():
    from tuneops.registry import decide

    assert decide(9.0, 10.0, True, None, 0)[0] == "champion"
    assert decide(10.5, 10.0, True, None, 0)[0] == "challenger"
    assert decide(9.0, 10.0, False, None, 0)[0] == "challenger"
    assert decide(9.0, 10.0, True, 8.0, 0)[0] == "challenger"
    assert decide(7.9, 10.0, True, 8.0, 0)[0] == "champion"
    assert decide(7.9, 10.0, True, 8.0, 5)[0] == "challenger"
