"""Training objectives as specs (issue 33): the registry, the config's checks naming the key, and the
planner's pricing of pair objectives (unit tier: no model weights, model configs from fixtures)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tuneops.config import ConfigError, load_config
from tuneops.training import objectives

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "tests" / "fixtures" / "model_configs"


def test_every_pair_objective_is_a_trl_loss_and_primary_metric_is_preference_accuracy():
    assert objectives.get("sft").pairs is False and objectives.get("sft").primary_metric == "perplexity"
    pairs = [o for o in objectives.OBJECTIVES.values() if o.pairs]
    assert {o.name for o in pairs} >= {"dpo", "ipo", "hinge"}
    for o in pairs:
        assert o.loss_type in objectives.LOSS_TYPES and o.data_format == "preference"
        assert (o.primary_metric, o.direction, o.sequences_per_example) == ("preference_accuracy", "higher", 2)
    assert objectives.get("dpo").loss_type == "sigmoid"
    assert objectives.get("dpo").step_compute("start") == pytest.approx(8 / 3)
    assert objectives.get("dpo").step_compute("precomputed") == pytest.approx(2.0)
    assert objectives.loss_type(objectives.get("dpo"), "ipo") == "ipo"


@pytest.mark.parametrize("override,message", [
    ("train.beta=abc", "params.yaml: train.beta: must be a number > 0, e.g. 0.1, not a str (got 'abc')"),
    ("train.beta=0", "params.yaml: train.beta: Input should be greater than 0 (got 0)"),
    ("train.objective=ppo", "params.yaml: train.objective: must be one of sft, dpo, ipo, hinge, robust, nca, "
                            "apo_zero, sppo (tuneops/training/objectives.py) (got 'ppo')"),
    ("train.loss_type=ipo", "params.yaml: train.loss_type: 'ipo' applies to the pair objectives only "
                            "(train.objective is 'sft'); set it to auto (got 'ipo')"),
    ("train.reference=sft", "params.yaml: train.reference: Input should be 'start', 'base' or 'precomputed' "
                            "(got 'sft')"),
    ("train.start_from=tuneops-chat", "params.yaml: train.start_from: must be null or a registered model, "
                                      "models:/NAME@ALIAS or models:/NAME/VERSION (got 'tuneops-chat')"),
])
def test_bad_objective_params_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", [override])
    assert str(err.value).replace(str(REPO / "params.yaml"), "params.yaml") == message


def test_good_objective_params_load():
    cfg = load_config(REPO / "params.yaml", ["train.objective=ipo", "train.beta=0.3", "train.reference=precomputed",
                                             "train.start_from=models:/tuneops-chat@champion"])
    assert (cfg.train.objective, cfg.train.beta, cfg.train.loss_type) == ("ipo", 0.3, "auto")


def _plan(objective: str, scenario: str, method: str = "lora", reference: str = "start"):
    from tuneops.planner import Goals, Hardware, ModelSpec, make_plan

    model = ModelSpec.from_path(CONFIGS / "gemma3-270m.json")
    hw = Hardware(gpus=0, host_ram_gb=64, cpu_cores=2)
    return make_plan(model, hw, seq_len=128, goals=Goals(method=method, allowed_methods=(method,)),
                     scenario=scenario, objective=objective, reference=reference)


def test_planner_needs_preference_data_for_a_pair_objective():
    from tuneops.planner import PlanError

    with pytest.raises(PlanError, match="train.objective dpo: trains on preference data"):
        _plan("dpo", "chat")
    sft = _plan("sft", "preference")           # SFT on preference rows: prompt + chosen
    assert sft.objective == "sft" and sft.reference is None and sft.step_compute_vs_sft == 1.0


def test_planner_prices_pairs_and_a_full_fine_tuning_reference():
    sft, dpo = _plan("sft", "preference", "full"), _plan("dpo", "preference", "full")
    pre = _plan("dpo", "preference", "full", "precomputed")
    # chosen + rejected: twice the layer activations; TRL's fused LM head holds one logits tile, not the
    # (2 x tokens x 262k vocab) logits the SFT step holds
    layers = lambda p: p.estimate.activations - p.estimate.logits   # noqa: E731
    assert layers(dpo) == pytest.approx(2 * layers(sft))
    assert dpo.estimate.overhead > sft.estimate.overhead       # + TRL's import
    assert dpo.estimate.weights - pre.estimate.weights == pytest.approx(4 * dpo.model.params / 2**30)
    assert pre.estimate.weights == pytest.approx(sft.estimate.weights)
    assert dpo.to_dict()["objective"] == "dpo" and dpo.to_dict()["reference"] == "start"
    assert any(r["rule"] == "R0-objective" for r in dpo.reasons)
    lora_sft, lora_dpo = _plan("sft", "preference"), _plan("dpo", "preference")
    assert lora_dpo.estimate.weights == pytest.approx(lora_sft.estimate.weights)   # the adapter disabled
    assert lora_dpo.estimate.logits < lora_sft.estimate.logits     # 2x the tokens, yet tiles: no 262k-wide logits
