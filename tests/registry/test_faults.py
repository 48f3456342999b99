"""Fault injection and concurrency on the whole pipeline (`tuneops run`, tiny model; slow).

- Every kill point (``tuneops.faults``): before and after each stage, and inside ``register``
  between each of its writes. For each, `tuneops run` (a new training seed each cycle, so a new
  registration is due) is SIGKILLed there, then run again. After each rerun the project is
  consistent: exactly one new version, with its tags, card and the alias its gate decided;
  the champion history matches the alias moves; at the end ``rollback`` goes to the previous
  champion. ``TUNEOPS_FAULT_POINTS=a,b`` limits the points (each costs two tiny runs).
- A task head (sequence classification on MiniLM, as tests/training/test_heads.py), trained once: `tuneops
  register` SIGKILLed at each ``register`` point and run again, on the champion path (a fresh model
  name: no champion yet) and on the challenger path (a champion exists, the gate asks more than a
  tie). The rerun finishes the same version, as for a language model: one register flow.
- Two `tuneops run` at once in one project: one waits for the other (``orchestrate.lock:
  wait``) and both succeed, each version's lineage points at its own run's training run; with
  ``lock: fail`` the second refuses naming the holder; the next run succeeds.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tuneops import faults, stages

from tests.conftest import REPO, make_project
from tests.training.test_heads import MINILM
from tests.test_robustness import KILLED, _consistent, _registry, _registry_exists, tuneops

pytestmark = pytest.mark.slow

FAST = ("train.max_steps=4", "evaluate.max_samples=8", "evaluate.generations=0", "optimize.ppl_samples=4",
        "optimize.parity_samples=1", "orchestrate.task_retries=0")


def _run(root: Path, *sets: str, kill_at: str | None = None, wait: bool = True) -> subprocess.Popen | tuple:
    """`tuneops run` in its own process group, output to files (a SIGKILLed run's orphaned
    ephemeral Prefect server would hold pipes open)."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop(faults.ENV, None)
    if kill_at:
        env[faults.ENV] = kill_at
    argv = [sys.executable, "-m", "tuneops", "--params", str(root / "params.yaml"), "run", "--json"]
    for s in sets:
        argv += ["--set", s]
    logs = tempfile.mkdtemp(dir=root, prefix="run-log-")
    out, err = open(Path(logs) / "out", "w+"), open(Path(logs) / "err", "w+")
    proc = subprocess.Popen(argv, env=env, cwd=root, stdout=out, stderr=err, text=True, start_new_session=True)
    proc.logs = (out, err)  # type: ignore[attr-defined]
    if not wait:
        return proc
    return _finish(proc)


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    code = proc.wait(timeout=900)
    try:
        os.killpg(proc.pid, signal.SIGKILL)       # the killed run's ephemeral Prefect server, if orphaned
    except ProcessLookupError:
        pass
    texts = []
    for f in proc.logs:  # type: ignore[attr-defined]
        f.seek(0)
        texts.append(f.read())
        f.close()
    return code, texts[0], texts[1]


def _result(stdout: str) -> dict:
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def test_tuneops_run_killed_at_every_point_converges_on_rerun():
    only = [p for p in os.environ.get("TUNEOPS_FAULT_POINTS", "").split(",") if p]
    points = [p for p in faults.stage_points(stages.STAGE_NAMES) + faults.REGISTER_POINTS if not only or p in only]
    root = make_project("faults-run", FAST)
    tried, left = [], []
    for i, point in enumerate(points, start=1):
        seed = f"train.seed={100 + i}"
        code, _, err = _run(root, seed, kill_at=point)
        assert code == -signal.SIGKILL, (point, code, err[-3000:])
        code, out, err = _run(root, seed)
        assert code == 0, (point, err[-3000:])
        reg = _consistent(root, i)
        result = _result(out)["register"]
        newest = reg["versions"][i]
        assert int(result["version"]) == i and newest.run_id == _result(out)["train"]["mlflow_run_id"]
        tried.append(point)
        left.append(sorted(p.name for p in (root / "models").iterdir() if p.name != "base"))
    assert not any(left), left                      # no temp folder left by any kill
    reg = _registry(root)
    promoted = [int(e["version"]) for e in reg["history"] if e.get("event", "promoted") == "promoted"]
    if len(promoted) >= 2:
        from tuneops import registry

        out = registry.rollback(reg["cfg"])
        assert out["champion"] == promoted[-2] and _registry(root)["aliases"]["champion"] == promoted[-2]
    print(f"\nkill points tried: {len(tried)}: {', '.join(tried)}")


def test_two_runs_at_once_one_waits_both_bound_to_their_own_training_and_the_next_succeeds():
    root = make_project("faults-concurrent", FAST)
    a = _run(root, "train.seed=1", wait=False)
    b = _run(root, "train.seed=2", wait=False)
    (ca, oa, ea), (cb, ob, eb) = _finish(a), _finish(b)
    assert ca == 0 and cb == 0, (ea[-3000:], eb[-3000:])
    assert "waiting for the project lock held by pid" in ea + eb
    ra, rb = _result(oa), _result(ob)
    assert ra["register"]["version"] != rb["register"]["version"]
    reg = _registry(root)
    for r in (ra, rb):                               # lineage: each version's run is its own training run
        assert reg["versions"][int(r["register"]["version"])].run_id == r["train"]["mlflow_run_id"]
        assert r["register"]["mlflow_run_id"] == r["train"]["mlflow_run_id"]
    base = root / "models" / "base"
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    # lock: fail -> the second refuses at once, naming the holder; then the next run succeeds
    a = _run(root, "train.seed=3", wait=False)
    import time

    time.sleep(25)
    cb, _, eb = _run(root, "train.seed=4", "orchestrate.lock=fail")
    ca, oa, ea = _finish(a)
    assert ca == 0, ea[-3000:]
    assert cb == 75 and "is in use by pid" in eb, eb[-2000:]
    code, _, err = _run(root, "train.seed=4")
    assert code == 0, err[-3000:]
    _consistent(root, 4)


def test_a_head_model_register_killed_at_every_point_converges_on_rerun():
    """Per kill point, two cycles of `tuneops register` (killed, then run again) on one trained
    MiniLM sentiment head: under a fresh model name (the champion path: alias, history,
    ``champion.at``) and under a model whose champion it must beat by 5% (the challenger path:
    the same weights re-scored tie). Each rerun finishes the version the killed run started
    (found again by ``registration.key``), never a second one."""
    import yaml

    from tuneops.config import load_config

    root = make_project("faults-head", MINILM + (
        "data.scenario=sentiment", "ingest.max_conversations=240", "ingest.eval_fraction=0.2",
        "train.max_steps=30", "train.learning_rate=0.005"))
    params = root / "params.yaml"
    cfg = load_config(params)
    for spec in stages.STAGES[:-1]:
        spec.load()(cfg)
    base_name = cfg.register.model_name

    def use(name: str, min_improvement_pct: float) -> None:
        raw = yaml.safe_load(params.read_text())
        raw["register"].update(model_name=name, min_improvement_pct=min_improvement_pct)
        params.write_text(yaml.safe_dump(raw, sort_keys=False))

    use(f"{base_name}-challenger", 5.0)
    first = tuneops(root, "register")                      # v1: the champion every challenger meets
    assert first.returncode == 0, first.stderr[-3000:]
    assert _consistent(root, 1)["aliases"] == {"champion": 1}

    tried = []
    for i, point in enumerate(faults.REGISTER_POINTS, start=1):
        cycle = ("--set", f"register.tags={{fault.cycle: c{i}}}")   # a new registration key
        for path, name, versions in (("champion", f"{base_name}-c{i}", 1),
                                     ("challenger", f"{base_name}-challenger", i + 1)):
            use(name, 0.0 if path == "champion" else 5.0)
            killed = tuneops(root, "register", *cycle, TUNEOPS_KILL_AT=point)
            assert killed.returncode == KILLED, (point, path, killed.stderr[-2000:])
            before = len(_registry(root)["versions"]) if _registry_exists(root) else 0
            assert before == versions - (point == "register:logged"), (point, path, before)
            rerun = tuneops(root, "register", *cycle)
            assert rerun.returncode == 0, (point, path, rerun.stderr[-3000:])
            reg = _consistent(root, versions)
            newest = reg["versions"][versions]
            assert newest.tags["task_head"] == "sequence_classification", newest.tags
            assert newest.tags["fault.cycle"] == f"c{i}" and newest.tags["promotion.alias"] == path, newest.tags
            assert reg["aliases"]["champion"] == 1
            if path == "challenger":
                assert reg["aliases"]["challenger"] == versions and "worse than the champion" in \
                    newest.tags["promotion.reason"] and newest.tags["gate.champion.version"] == "1"
            else:
                assert [int(e["version"]) for e in reg["history"]] == [1]
            tried.append(f"{point} ({path})")
    print(f"\nhead kill points tried: {len(tried)}: {', '.join(tried)}")
