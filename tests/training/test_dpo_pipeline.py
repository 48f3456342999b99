"""DPO as a pipeline objective (issue 33), end to end on the tiny random Gemma-3: the bundled
``preference`` scenario through every stage (model -> register), then SFT -> DPO from the
registered champion (``train.start_from``) with that model as reference. Real stages, real MLflow,
TRL, peft and ONNX Runtime; marked pipeline (the ``project`` fixture)."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import make_project

DPO = ("data.scenario=preference", "train.objective=dpo", "train.beta=0.5", "train.learning_rate=0.02",
       "train.max_steps=10", "train.save_steps=0", "select.method=lora", "ingest.max_conversations=120",
       "evaluate.max_samples=16", "evaluate.generations=1", "optimize.ppl_samples=4", "optimize.parity_samples=1",
       "optimize.targets=[]")


def _run(cfg, *names: str) -> dict:
    from tuneops import stages

    return {n: stages.get(n).load()(cfg) for n in names}


@pytest.fixture(scope="module")
def project():
    from tuneops.config import load_config

    root = make_project("dpo-preference", DPO)
    cfg = load_config(root / "params.yaml")
    return root, cfg, _run(cfg, "model", "ingest", "validate", "select", "train", "evaluate", "optimize", "register")


def test_preference_scenario_validates_as_pairs(project):
    root, cfg, out = project
    assert out["ingest"]["format"] == "preference" and out["validate"]["rejected_rows"] == 0
    row = json.loads(cfg.path("clean_train_data").read_text().splitlines()[0])
    # the clean row: prompt + chosen as chat (what SFT would train on) and the pair itself
    assert row["pair"]["preferred_output"][0]["role"] == "assistant"
    assert row["messages"][-1] == row["pair"]["preferred_output"][0]
    assert row["messages"][:-1] == row["pair"]["input"]["messages"]


def test_plan_prices_pairs_and_the_reference(project):
    root, cfg, out = project
    plan = json.loads(cfg.path("plan").read_text())
    assert plan["objective"] == "dpo" and plan["reference"] == "start"
    assert plan["step_compute_vs_sft"] == pytest.approx(8 / 3, abs=1e-3)
    assert any(r["rule"] == "R0-objective" for r in plan["reasons"])
    from tuneops.planner import ModelSpec, Setup, estimate

    model = ModelSpec.from_path(cfg.path("base_model_dir"))
    sft = estimate(model, Setup(method="full", compute_bytes=4, seq_len=64, on_gpu=False))
    dpo = estimate(model, Setup(method="full", compute_bytes=4, seq_len=64, on_gpu=False, objective="dpo"))
    pre = estimate(model, Setup(method="full", compute_bytes=4, seq_len=64, on_gpu=False, objective="dpo",
                                reference="precomputed"))
    # chosen + rejected: twice the layer activations; logits through TRL's fused LM head (tiles)
    assert dpo.activations - dpo.logits == pytest.approx(2 * (sft.activations - sft.logits))
    assert dpo.weights - pre.weights == pytest.approx(4 * model.params / 2**30)   # the frozen reference copy
    lora = estimate(model, Setup(method="lora", compute_bytes=4, seq_len=64, on_gpu=False, objective="dpo",
                                 targets=tuple(model.resolve_targets("auto"))))
    lora_sft = estimate(model, Setup(method="lora", compute_bytes=4, seq_len=64, on_gpu=False,
                                     targets=tuple(model.resolve_targets("auto"))))
    assert lora.weights == lora_sft.weights                              # adapter disabled = the reference


def test_dpo_trains_with_trl_and_records_the_reference(project):
    root, cfg, out = project
    tm = out["train"]
    assert tm["objective"] == "dpo" and tm["loss_type"] == "sigmoid" and tm["beta"] == 0.5
    assert tm["reference"]["reference"] == "start" and tm["reference"]["start"] == "base"
    assert "adapter disabled" in tm["reference"]["reference_model"]
    hist = json.loads((cfg.path("train_dir") / "history.json").read_text())
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)      # policy = reference at step 0
    assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert "rewards/accuracies" in hist[-1] and tm["tokens"] > 0
    import mlflow

    run = mlflow.get_run(tm["mlflow_run_id"])
    assert run.data.params["objective"] == "dpo" and run.data.params["reference.reference"] == "start"
    steps = mlflow.MlflowClient().get_metric_history(tm["mlflow_run_id"], "rewards/margins")
    assert len(steps) >= 5


def test_evaluate_scores_preference_accuracy_and_register_gates_on_it(project):
    root, cfg, out = project
    em = out["evaluate"]
    assert em["primary_metric"] == "preference_accuracy" and em["primary_direction"] == "higher"
    assert em["base_preference_accuracy"] == 0.0 and em["base_margin"] == 0.0    # the base is the reference
    assert em["samples"] == len(cfg.path("clean_eval_data").read_text().splitlines())
    # per pair: the accuracy is the share of positive implicit-reward margins, the margin their mean
    # (how much a random tiny model learns in 10 steps is not asserted here: test_preference.py's
    # separable toy set is)
    rows = [json.loads(x) for x in (cfg.path("evaluate_dir") / "pairs.jsonl").read_text().splitlines()]
    margins = [r["finetuned_margins"] for r in rows]
    assert em["finetuned_preference_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert em["finetuned_margin"] == pytest.approx(sum(margins) / len(margins))
    assert any(m != 0 for m in margins) and all(r["base_margins"] == 0 for r in rows)
    for r in rows:      # margin = beta * ((pi - ref)(chosen) - (pi - ref)(rejected)), the base as reference
        assert r["finetuned_margins"] == pytest.approx(0.5 * ((r["finetuned_chosen"] - r["base_chosen"])
                                                              - (r["finetuned_rejected"] - r["base_rejected"])))
    assert em["base_chosen_perplexity"] > 1 and em["finetuned_chosen_perplexity"] > 1
    reg = out["register"]
    from mlflow import MlflowClient

    mv = MlflowClient().get_model_version(cfg.register.model_name, str(reg["version"]))
    assert mv.tags["eval.primary_metric"] == "preference_accuracy"
    assert float(mv.tags["eval.finetuned_preference_accuracy"]) == pytest.approx(em["finetuned_preference_accuracy"])
    # the first version: champion exactly when it beats the base on preference accuracy
    assert reg["alias"] == ("champion" if em["finetuned_preference_accuracy"] > 0 else "challenger")
    card = (cfg.path("register_dir") / "model_card.md").read_text()
    assert "preference_accuracy" in card


def test_dpo_from_the_registered_champion_uses_it_as_reference(project):
    """SFT -> DPO: start from models:/NAME@champion; the reference is that model (TRL's frozen 'ref'
    copy of its adapter), so step 0 is ln 2 again although the start model is not the base."""
    root, cfg, out = project
    from tuneops.config import load_config

    cfg2 = load_config(root / "params.yaml", [f"train.start_from=models:/{cfg.register.model_name}@champion",
                                              "train.max_steps=2"])
    tm = _run(cfg2, "train")["train"]
    assert tm["start_from"].endswith("@champion")
    assert tm["reference"]["start"] != "base" and "'ref' adapter" in tm["reference"]["reference_model"]
    hist = json.loads((cfg2.path("train_dir") / "history.json").read_text())
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert (cfg2.path("train_dir") / "adapter" / "ref").is_dir()


@pytest.mark.slow      # ~3 min under load; the launcher's ZeRO-2 path is in the default suite through SFT
def test_dpo_under_deepspeed_zero2_on_two_processes(project):
    """The pair objective through the same launcher as SFT: torchrun, 2 gloo processes, ZeRO-2
    (DeepSpeed partitions the adapter's gradients and optimizer states), TRL's DPOTrainer on each
    rank; step 0 is ln 2 (policy = reference), the margin grows, and the adapter reloads."""
    root, cfg, out = project
    from tuneops.config import load_config

    cfg3 = load_config(root / "params.yaml", ["select.hardware.cpu_processes=2", "select.zero_stage=2",
                                              "train.max_steps=6"])
    got = _run(cfg3, "select", "train")
    plan, tm = json.loads(cfg3.path("plan").read_text()), got["train"]
    assert (plan["world_size"], plan["zero_stage"], plan["launcher"]) == (2, 2, "deepspeed")
    assert tm["world_size"] == 2 and tm["zero_stage"] == 2 and tm["objective"] == "dpo"
    hist = json.loads((cfg3.path("train_dir") / "history.json").read_text())
    assert hist[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert hist[-1]["rewards/margins"] > 0
    assert (cfg3.path("train_dir") / "adapter" / "adapter_model.safetensors").is_file()
