"""Cost of the flow's DVC record: committing each stage's dvc.lock entry (what the Prefect flow
does after every stage, tuneops/dvc_record.py) in a project whose pipeline has run.

    python bench/bench_dvc_record.py PROJECT [--repeat 3]

Prints, per stage, the median seconds of `Repo.commit("dvc.yaml:STAGE", force=True)` on the
outputs as they are (DVC's state database already knows their hashes, as after a flow's stage;
the first commit of a fresh output also hashes it: the flow prints that time per stage), and the
no-op `dvc status` / `dvc repro` times side by side.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tuneops import dvc_record, env, stages  # noqa: E402


def _timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("project", type=Path)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    env.configure(a.project / ".tuneops")
    print(f"{'stage':<10} {'commit s (median)':>18}")
    for name in stages.STAGE_NAMES:
        times = [dvc_record.commit_stage(a.project, name) for _ in range(a.repeat)]
        print(f"{name:<10} {statistics.median(times):>18.3f}")
    print(f"dvc status: {_timed(['dvc', 'status'], a.project):.2f} s; "
          f"no-op dvc repro: {_timed(['dvc', 'repro'], a.project):.2f} s")


if __name__ == "__main__":
    main()
