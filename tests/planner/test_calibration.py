"""Memory-planner calibration: predicted vs measured peak memory of real training steps.

Runs three single-process rows of ``bench/calibrate_memory.py`` on the tiny random Gemma-3 (full
fine-tuning, LoRA, and LoRA with the DPO objective: TRL's step on chosen + rejected with its fused
LM head and the adapter-disabled reference; micro-batch 1, seq 128, 2 optimizer steps, ~20 s each): each trains in a
fresh subprocess and reports its peak RSS over the training window. The planner's prediction for
the same ``Setup`` must be within 15% of it. ``bench/results/calibration-cpu.md`` has the full table.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
import calibrate_memory as cm  # noqa: E402

from tuneops.planner import MemoryModelConstants  # noqa: E402

CASES = [cm.Case(model="tiny", method="full"), cm.Case(model="tiny", method="lora"),
         cm.Case(model="tiny", method="lora", objective="dpo")]

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists() or importlib.util.find_spec("peft") is None,
    reason="needs Linux /proc peak-RSS reset and peft")


@pytest.fixture(scope="module")
def rows():
    return cm.calibrate(CASES, "cpu", steps=2, timeout=300, runs=REPO / ".tuneops" / "pytest" / "calibration")


def test_cases_are_deliberate_setups():
    setup = cm.setup_for(CASES[1], "cpu")
    assert (setup.method, setup.zero_stage, setup.world_size, setup.micro_batch, setup.seq_len) == \
        ("lora", 0, 1, 1, 128)
    assert setup.compute_bytes == 4 and not setup.on_gpu and setup.targets == ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("i", range(len(CASES)))
def test_prediction_within_15_percent_of_measured_peak(rows, i):
    row = rows[i]
    assert "error" not in row, row.get("error")
    (rank,) = row["ranks"]
    assert rank["trainable_with_grad"] == rank["trainable_tensors"] > 0  # it really trained
    assert all(loss == loss for loss in rank["losses"])                  # no NaN
    assert abs(row["rel_error"]) <= cm.TOLERANCE, cm.format_row(row)


def test_the_check_can_fail(rows):
    """The same measurements reject a planner whose constants are off: logits priced at 4 instead
    of 12 bytes per value (the largest activation of a 262k-vocabulary model), or a per-process
    baseline of 1 GiB instead of the measured ~0.45, or TRL's fused LM head priced as one logits tile
    instead of the ~8 its CPU fold keeps alive, put the rows outside the 15% band."""
    for wrong in (MemoryModelConstants(logits_bytes=4.0), MemoryModelConstants(cpu_baseline_gb=1.0),
                  MemoryModelConstants(fused_head_tile_copies_cpu=1)):
        errors = []
        for case, row in zip(CASES, rows):
            pred, _ = cm.predict(case, "cpu", wrong)
            errors.append(abs(pred - row["measured_gib"]) / row["measured_gib"])
        assert max(errors) > cm.TOLERANCE, (wrong, errors)

