"""Wall time and peak RSS per stage (tuneops/resources.py) and how they are printed (tuneops/log.py)."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tuneops import log, resources
from tuneops.resources import Usage

MB = 10**6


def _needs_reset() -> None:
    if resources.process_peak() is None or not resources.reset_peak():
        pytest.skip("no /proc/self/status or /proc/self/clear_refs here (not Linux, or the reset is refused)")


def test_peak_is_reset_per_stage_so_a_small_stage_after_a_big_one_reads_lower():
    _needs_reset()
    base = resources.process_peak()             # just reset: the current RSS
    with resources.measure() as big:
        block = np.ones(300 * MB // 8)          # written, so resident
    del block                                   # freed (a large block goes back to the OS)
    with resources.measure() as small:
        pass
    assert big.peak_rss_bytes is not None and small.peak_rss_bytes is not None
    assert big.peak_rss_bytes >= base + 250 * MB, (big, base)
    assert small.peak_rss_bytes <= big.peak_rss_bytes - 250 * MB, (small, big)
    assert big.wall_s > 0 and big.children_peak_rss_bytes is None


def test_a_child_that_ends_during_the_stage_counts():
    """The torchrun case: the ranks are (grand)children; a fresh interpreter so no earlier child is bigger."""
    script = textwrap.dedent(f"""
        import subprocess, sys
        from tuneops import resources
        with resources.measure() as u:
            subprocess.run([sys.executable, "-c", "b = bytearray({300 * MB})"], check=True)
        print(u.children_peak_rss_bytes, u.peak_rss_bytes)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "None":
        pytest.skip("getrusage(RUSAGE_CHILDREN) reports no ru_maxrss here")
    children, peak = int(out[0]), int(out[1])
    assert children >= 250 * MB and peak == children


def test_without_proc_nothing_is_guessed(monkeypatch, tmp_path):
    monkeypatch.setattr(resources, "_STATUS", tmp_path / "missing" / "status")
    monkeypatch.setattr(resources, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert resources.process_peak() is None and resources.reset_peak() is False
    with resources.measure() as u:
        pass
    assert u.peak_rss_bytes is None and u.wall_s >= 0


def test_without_reset_only_a_new_peak_is_the_stages(monkeypatch, tmp_path):
    if resources.process_peak() is None:
        pytest.skip("no /proc/self/status")
    monkeypatch.setattr(resources, "_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    block = np.ones(100 * MB // 8)              # an earlier stage's peak, well above what follows
    del block
    with resources.measure() as u:
        pass                                    # sets no new peak: the old one is an earlier stage's
    assert u.peak_rss_bytes is None


def test_summary_total_is_the_largest_stage_peak_and_the_run_wall_time():
    got = resources.summary({"train": Usage(12.3456, 3 * 2**30, 3 * 2**30), "evaluate": Usage(4.0, 2**30, None),
                             "register": Usage(1.0, None, None)}, wall_s=20.0)
    assert list(got) == ["train", "evaluate", "register", "total"]
    assert got["train"] == {"wall_s": 12.346, "peak_rss_bytes": 3 * 2**30, "children_peak_rss_bytes": 3 * 2**30}
    assert got["total"] == {"wall_s": 20.0, "peak_rss_bytes": 3 * 2**30, "children_peak_rss_bytes": 3 * 2**30}


def test_resources_table():
    table = log.resources_table(resources.summary(
        {"model": Usage(1.04, int(0.42 * 2**30)), "train": Usage(123.45, int(2.26 * 2**30)), "register": Usage(3.0)},
        wall_s=130.0))
    assert table == textwrap.dedent("""\
        stage     wall time  peak RSS
        model         1.0 s   0.4 GiB
        train       123.5 s   2.3 GiB
        register      3.0 s         -
        total       130.0 s   2.3 GiB""")


def test_stage_summary_shows_the_peak_rss():
    result = {"method": "lora", "steps": 8, "first_loss": 12.48, "final_loss": 12.35}
    assert (log.stage_summary("train", result, 21.84, int(1.3 * 2**30))
            == "train: 21.8 s, peak RSS 1.3 GiB  method lora, steps 8, loss 12.48 -> 12.35")
    assert log.stage_summary("train", result, 21.84) == "train: 21.8 s  method lora, steps 8, loss 12.48 -> 12.35"
    assert log.stage_summary("model", {}, peak_rss_bytes=2**30) == "model: peak RSS 1.0 GiB"


def test_train_summary_prefers_the_smoothed_loss():
    from tuneops.training.loop import _loss_ends

    ends = _loss_ends([{"loss": x} for x in (4.0, 2.0, 3.0, 5.0, 1.0, 2.0, 2.5, 1.5, 0.5, 1.0, 2.0, 3.0)])
    assert ends == {"loss_start": 3.0, "loss_end": 2.0, "loss_mean_of_steps": 3}
    result = {"method": "lora", "steps": 12, "first_loss": 4.0, "final_loss": 2.0, **ends}
    assert log.stage_summary("train", result) == "train: method lora, steps 12, loss 3 -> 2"
