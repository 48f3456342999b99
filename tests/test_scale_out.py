"""Outgrowing one machine, on this one: a multi-node plan writes the params every node loads and
names the per-node command; 2 nodes x 1 process (two torchrun agents, separate processes, c10d
rendezvous on loopback, gloo) train with ZeRO-2 and ZeRO-3 into the single-process adapter
format; a 2-process ZeRO-2 run killed after a checkpoint resumes with 1 process and then with 2
again (DeepSpeed universal checkpoint), and the loss curve continues. Combinations DeepSpeed
cannot load are refused with the way out."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tuneops.io import free_port

from tests.conftest import make_project

REPO = Path(__file__).resolve().parents[1]


def _plan(**kw) -> dict:
    plan = {"method": "lora", "zero_stage": 2, "offload": {"optimizer": False, "params": False},
            "micro_batch_size": 2, "grad_accum": 1, "global_batch_size": 4, "launcher": "deepspeed",
            "nproc_per_node": 1, "nodes": 2, "world_size": 2, "gradient_checkpointing": False}
    return {**plan, **kw}


def test_multi_node_plan_writes_launch_params_and_names_the_node_command():
    """The stage used to raise before it wrote launch-params.json, the file the command needs."""
    from tuneops.config import load_config
    from tuneops.errors import TuneopsError
    from tuneops.training.launch import launch

    root = make_project("multinode-params")
    secret = "hunter2-launch-secret"
    cfg = load_config(root / "params.yaml", ["train.max_steps=3",
                                             f"service.database_url=postgresql+psycopg://u:{secret}@db/jobs"])
    with pytest.raises(TuneopsError) as exc:
        launch(cfg, _plan(), root / "out")
    params = cfg.path("checkpoint_dir") / "launch-params.json"
    assert params.is_file()
    assert load_config(params, root=root).train.max_steps == 3        # the resolved params, overrides applied
    assert secret not in params.read_text()                           # the ranks never see the jobs-API password
    assert params.stat().st_mode & 0o077 == 0
    msg = str(exc.value)
    assert "\n" not in msg and str(params) in msg
    for part in ("torchrun", "--nnodes 2", "--nproc-per-node 1", "--rdzv-backend c10d", "--rdzv-endpoint",
                 "-m tuneops.training.launch"):
        assert part in msg, (part, msg)


def test_hardware_allows_multi_node_cpu_plans():
    from tuneops.planner import Hardware

    hw = Hardware.from_params({"gpus": 0, "gpu_memory_gb": "auto", "host_ram_gb": 8, "nodes": 2, "cpu_processes": 1})
    assert (hw.nodes, hw.world_size) == (2, 2)


def test_resume_refuses_what_deepspeed_cannot_load(tmp_path):
    from tuneops.errors import InvalidInput
    from tuneops.training import checkpoints

    ck = tmp_path / "checkpoint-4"
    ck.mkdir()
    (ck / "w.bin").write_bytes(b"x")
    checkpoints.mark_complete(ck, {"step": 4, "layout": checkpoints.layout(_plan(nodes=1, nproc_per_node=2))})
    assert checkpoints.resume_mode(ck, _plan(nodes=1, nproc_per_node=2, world_size=2)) == "same"
    assert checkpoints.resume_mode(ck, _plan(nodes=1, world_size=1, grad_accum=2)) == "universal"
    with pytest.raises(InvalidInput, match=r"select\.zero_stage=2 .*train\.resume=false"):
        checkpoints.resume_mode(ck, _plan(zero_stage=3, world_size=1))
    with pytest.raises(InvalidInput, match=r"plain Trainer.*select\.zero_stage=2"):
        checkpoints.resume_mode(ck, _plan(zero_stage=0, launcher="torchrun", world_size=1))
    with pytest.raises(InvalidInput, match=r"select\.offload=none"):
        checkpoints.resume_mode(ck, _plan(offload={"optimizer": True, "params": False}))


def test_run_key_ignores_the_process_layout():
    from tuneops.config import load_config
    from tuneops.training import checkpoints

    root = make_project("runkey")
    one = load_config(root / "params.yaml", ["select.hardware.cpu_processes=1"])
    two = load_config(root / "params.yaml", ["select.hardware.cpu_processes=2", "select.zero_stage=2"])
    key = checkpoints.run_key(one, _plan(world_size=1, grad_accum=2, nodes=1), "md5")
    assert checkpoints.run_key(two, _plan(nproc_per_node=2, nodes=1), "md5") == key
    assert checkpoints.run_key(two, _plan(global_batch_size=8), "md5") != key     # what is learned: a new run
    assert checkpoints.run_key(one, _plan(method="dora"), "md5") != key


# ---- real multi-process runs (slow set; run under `flock /work/heavy.lock`) ----

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def project() -> Path:
    from tuneops import stages
    from tuneops.config import load_config

    root = make_project("scaleout")
    cfg = load_config(root / "params.yaml")
    for name in ("model", "ingest", "validate"):
        stages.get(name).load()(cfg)
    return root


def _tuneops(root: Path, verb: str, sets: list[str], **kw) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "tuneops", verb] + [a for s in sets for a in ("--set", s)]
    return subprocess.run(argv, cwd=root, env=ENV, capture_output=True, text=True, **kw)


def _adapter_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_two_nodes_one_process_each(project, zero):
    """Two torchrun agents (separate processes, as on two machines) meet at a c10d rendezvous on
    loopback and train over gloo; the adapter has the single-process format and reloads."""
    import torch
    from peft import PeftModel

    from tuneops.config import load_config
    from tuneops.models import load_causal_lm

    tag = f"2x1-zero{zero}"
    sets = ["select.method=lora", "select.hardware.nodes=2", "select.hardware.cpu_processes=1",
            f"select.zero_stage={zero}", f"paths.plan=artifacts/select/plan-{tag}.json",
            f"paths.train_dir=artifacts/train-{tag}", f"paths.checkpoint_dir=.tuneops/ck-{tag}"]
    assert _tuneops(project, "select", sets).returncode == 0
    stage = _tuneops(project, "train", sets)     # a multi-node plan: the stage names the command
    assert stage.returncode == 1 and "--nnodes 2" in stage.stderr, stage.stderr[-2000:]
    cfg = load_config(project / "params.yaml", sets)
    plan = json.loads(cfg.path("plan").read_text())
    assert (plan["nodes"], plan["nproc_per_node"], plan["world_size"], plan["zero_stage"]) == (2, 1, 2, zero)
    from tuneops.training.launch import command

    params = cfg.path("checkpoint_dir") / "launch-params.json"
    out = cfg.path("train_dir")
    argv = command(plan, params, project, out, rdzv_endpoint=f"127.0.0.1:{free_port()}", rdzv_id=tag)
    argv[3:3] = ["--local-addr", "127.0.0.1"]
    logs = [project / f"{tag}-node{i}.log" for i in range(2)]
    agents = [subprocess.Popen(argv, cwd=project, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                               start_new_session=True) for log in logs]
    try:
        codes = [a.wait(timeout=900) for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGKILL)
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["zero_stage"] == zero and m["steps"] == 8
    assert m["final_loss"] < m["first_loss"]
    # the single-process format: one process, no DeepSpeed
    single_sets = ["select.method=lora", "paths.plan=artifacts/select/plan-single.json",
                   "paths.train_dir=artifacts/train-single", "paths.checkpoint_dir=.tuneops/ck-single"]
    single = load_config(project / "params.yaml", single_sets).path("train_dir") / "adapter"
    if not single.is_dir():
        for verb in ("select", "train"):
            r = _tuneops(project, verb, single_sets)
            assert r.returncode == 0, r.stderr[-2000:]
    adapter = out / "adapter"
    keys = _adapter_keys(adapter)
    assert keys == _adapter_keys(single) and all(all(d > 0 for d in s) for s in keys.values())
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(load_causal_lm(cfg.path("base_model_dir")), str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 10, 20, 30]])).logits
    assert torch.isfinite(logits).all()


def _complete_steps(ckdir: Path) -> list[int]:
    from tuneops.training import checkpoints

    if not ckdir.is_dir():
        return []
    return sorted(checkpoints.step_of(c) for r in ckdir.iterdir() if r.is_dir()
                  for c in r.glob("checkpoint-*") if checkpoints.is_complete(c))


def _train_until_checkpoint(root: Path, sets: list[str], ckdir: Path, after: int) -> int:
    """Start `tuneops train`, SIGKILL its whole process group (torchrun and the ranks) once a
    complete checkpoint newer than step ``after`` exists; that step."""
    argv = [sys.executable, "-m", "tuneops", "train"] + [a for s in sets for a in ("--set", s)]
    log = root / f"kill-after-{after}.log"
    proc = subprocess.Popen(argv, cwd=root, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:
            newer = [s for s in _complete_steps(ckdir) if s > after]
            if newer:
                return max(newer)
            time.sleep(0.1)
        pytest.fail(f"no checkpoint after step {after} (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
    finally:
        # the whole tree, as when the machine dies: torchrun starts each rank in its own session,
        # so killing the process group alone leaves the ranks running
        import psutil

        try:
            tree = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for p in [proc, *tree]:
            try:
                p.send_signal(signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass
        proc.wait()
        psutil.wait_procs(tree, timeout=30)
    return -1


@pytest.mark.slow
def test_resume_at_another_world_size(project):
    """2 processes (ZeRO-2) killed after a checkpoint -> resume with 1 process (killed again after a
    newer checkpoint) -> resume with 2: every step once, in order, from the checkpoint's step; the
    loss continues from where it was (far below the untrained loss), in one MLflow run."""
    from tuneops.config import load_config

    tag = "worldsize"
    common = ["select.method=lora", "select.zero_stage=2", "train.save_steps=2", "train.max_steps=12",
              "train.save_total_limit=10", "train.keep_checkpoints=true",
              f"paths.plan=artifacts/select/plan-{tag}.json", f"paths.train_dir=artifacts/train-{tag}",
              f"paths.checkpoint_dir=.tuneops/ck-{tag}"]
    two, one = common + ["select.hardware.cpu_processes=2"], common + ["select.hardware.cpu_processes=1"]
    cfg = load_config(project / "params.yaml", two)
    ckdir = cfg.path("checkpoint_dir")
    import shutil

    shutil.rmtree(ckdir, ignore_errors=True)
    assert _tuneops(project, "select", two).returncode == 0
    first = _train_until_checkpoint(project, two, ckdir, 0)
    assert _tuneops(project, "select", one).returncode == 0
    plan1 = json.loads(cfg.path("plan").read_text())
    assert (plan1["world_size"], plan1["grad_accum"], plan1["zero_stage"]) == (1, 2, 2)
    second = _train_until_checkpoint(project, one, ckdir, first)
    roots = [r for r in ckdir.iterdir() if r.is_dir()]
    assert len(roots) == 1, roots                      # one run key for both world sizes
    resumed_1 = json.loads((roots[0] / f"checkpoint-{second}" / "trainer_state.json").read_text())
    assert (roots[0] / f"checkpoint-{first}" / "latest_universal").is_file()   # 2 -> 1 went through universal
    assert _tuneops(project, "select", two).returncode == 0
    final = _tuneops(project, "train", two)
    assert final.returncode == 0, final.stderr[-4000:]
    m = json.loads((cfg.path("train_dir") / "metrics.json").read_text())
    assert (m["resumed_from_step"], m["resume_mode"], m["world_size"], m["steps"]) == (second, "universal", 2, 12)
    history = json.loads((cfg.path("train_dir") / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 13))      # every step once: no restart at 0
    loss = {h["step"]: h["loss"] for h in history}
    logged_1 = {h["step"]: h["loss"] for h in resumed_1["log_history"] if "loss" in h}
    assert {s: loss[s] for s in logged_1} == logged_1              # the curve the 1-process run wrote is kept
    # the loss goes on down across both resumes (the tiny random model learns slowly: compare means)
    assert m["final_loss"] < m["first_loss"], loss
    assert sum(loss[s] for s in range(10, 13)) / 3 < sum(loss[s] for s in (1, 2)) / 2, loss
    # the optimizer and LR schedule resumed too: after the 3 warmup steps the cosine LR only falls
    # (a restart would warm up again from 0 at the resume step)
    lr = [h["learning_rate"] for h in history]
    assert all(b < a for a, b in zip(lr[3:], lr[4:])), lr
    import mlflow

    from tuneops.registry import tracking

    tracking.setup(cfg)
    hist = mlflow.tracking.MlflowClient().get_metric_history(m["mlflow_run_id"], "loss")
    steps = {x.step for x in hist}          # one MLflow run across the three (a killed process may not have
    assert set(range(second + 1, 13)) <= steps <= set(range(1, 13))   # flushed its last async metrics)
    (project / "resume-history.json").write_text(json.dumps({"first_kill": first, "second_kill": second,
                                                             "loss": loss}))
