"""Training objectives as specs (``Objective``, one entry each in ``OBJECTIVES``): what the model is
trained to do with the data. ``sft`` is next-token prediction on the assistant turns (every data
format, every task head); the pair objectives (``dpo`` and its kin) train on preference pairs
(the ``preference`` data format: a prompt, a chosen and a rejected reply) through TRL's
``DPOTrainer`` with its ``loss_type``, against an explicit reference model
(``tuneops/training/preference.py``).

``train.objective`` picks one; ``train.beta``, ``train.loss_type`` (``auto``: the objective's own)
and ``train.reference`` (``start`` | ``base`` | ``precomputed``) tune the pair objectives. Every
stage reads an objective's facts from its spec, never by comparing names: the config (known
names), select and the planner (the data format it needs, sequences per example, the reference
pass in memory and compute), train (the trainer), evaluate and register (the primary metric and
its direction), and the jobs API (``method.type``).

The pair objectives offered are TRL 1.16 ``DPOConfig.loss_type`` values run by ``DPOTrainer``
itself (ORPO and SimPO/CPO have their own trainers in ``trl.experimental``: not offered).
"""
from __future__ import annotations

from dataclasses import dataclass

# TRL 1.16 DPOConfig.loss_type values; ORPO / CPO (SimPO) live in trl.experimental (own trainers).
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
REFERENCES = ("start", "base", "precomputed")     # train.reference (tuneops/training/preference.py build_models)
SFT = "sft"
PREFERENCE_FORMAT = "preference"


@dataclass(frozen=True)
class Objective:
    name: str
    label: str
    loss_type: str | None = None          # TRL DPOConfig.loss_type (a pair objective); None: next-token loss
    primary_metric: str = "perplexity"    # evaluate's metric for a causal LM trained this way
    higher_is_better: bool = False

    @property
    def pairs(self) -> bool:
        """Trains on chosen/rejected pairs against a reference model."""
        return self.loss_type is not None

    @property
    def fused_lm_head(self) -> bool:
        """The trainer scores tokens through TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``,
        TRL 1.16 DPOTrainer): per-token log-probs computed in tiles, the (tokens x vocab) logits never
        exist whole. The planner prices the tile instead of the logits."""
        return self.pairs

    @property
    def data_format(self) -> str | None:
        """The data format it needs (None: any format the task head takes)."""
        return PREFERENCE_FORMAT if self.pairs else None

    @property
    def sequences_per_example(self) -> int:
        """Sequences one example puts through the model in a step (chosen + rejected for pairs)."""
        return 2 if self.pairs else 1

    def step_compute(self, reference: str = "start") -> float:
        """Compute of one training step relative to SFT on the same examples (forward = 1,
        backward = 2 units per sequence): pairs run 2 sequences, plus a no-grad reference forward
        of both unless its log-probs are precomputed (then once, before training)."""
        if not self.pairs:
            return 1.0
        ref = 0.0 if reference == "precomputed" else 1.0
        return self.sequences_per_example * (3.0 + ref) / 3.0

    @property
    def direction(self) -> str:
        return "higher" if self.higher_is_better else "lower"


def _pair(name: str, loss_type: str, label: str) -> Objective:
    assert loss_type in LOSS_TYPES, loss_type
    return Objective(name, label, loss_type=loss_type, primary_metric="preference_accuracy", higher_is_better=True)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective(SFT, "supervised fine-tuning (next-token loss on the assistant turns)"),
    _pair("dpo", "sigmoid", "DPO (Rafailov et al. 2023): sigmoid loss on the implicit reward margin"),
    _pair("ipo", "ipo", "IPO (Azar et al. 2023): squared loss towards a margin of 1/(2 beta)"),
    _pair("hinge", "hinge", "SLiC hinge loss on the reward margin"),
    _pair("robust", "robust", "robust DPO (Chowdhury et al. 2024): noisy preference labels"),
    _pair("nca", "nca_pair", "NCA (Chen et al. 2024): absolute rewards of each side"),
    _pair("apo_zero", "apo_zero", "APO-zero (D'Oosterlinck et al. 2024): chosen up, rejected down"),
    _pair("sppo", "sppo_hard", "SPPO hard-label (Wu et al. 2024)"),
)}


def get(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"train.objective: {name!r} is not one of {', '.join(OBJECTIVES)}") from None


def of(plan: dict) -> Objective:
    """The objective a plan (select's plan.json) or a train metrics.json names (SFT when absent:
    plans written before objectives)."""
    return get(plan.get("objective") or SFT)


def loss_type(objective: Objective, override: str = "auto") -> str | None:
    """The TRL loss type: the objective's, or ``train.loss_type`` when not ``auto``."""
    if override in (None, "auto"):
        return objective.loss_type
    if not objective.pairs:
        raise ValueError(f"train.loss_type: {override!r} applies to the pair objectives only "
                         f"(train.objective is {objective.name!r}); set it to auto")
    if override not in LOSS_TYPES:
        raise ValueError(f"train.loss_type: {override!r} is not one of auto, {', '.join(LOSS_TYPES)}")
    return override


__all__ = ["Objective", "OBJECTIVES", "SFT", "PREFERENCE_FORMAT", "REFERENCES", "get", "of", "loss_type"]
