"""The fine-tuning engine on the tiny model: every method learns, QLoRA really is 4-bit,
packing keeps examples apart, DeepSpeed ZeRO 1-3 on 2 gloo processes saves the same adapter
format, and a SIGKILLed run resumes from its last complete checkpoint."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_project

ALL_METHODS = "[full, lora, qlora, dora, ia3, prompt_tuning]"


@pytest.fixture(scope="module")
def project() -> Path:
    """A tiny project with model, data and validation done once (the stages themselves)."""
    from tuneops import stages
    from tuneops.config import load_config

    root = make_project("training", (f"select.allowed_methods={ALL_METHODS}",))
    cfg = load_config(root / "params.yaml")
    for name in ("model", "ingest", "validate"):
        stages.get(name).load()(cfg)
    return root


def _cfg(root: Path, tag: str, *overrides: str):
    from tuneops.config import load_config

    return load_config(root / "params.yaml", [f"paths.plan=artifacts/select/plan-{tag}.json",
                                              f"paths.train_dir=artifacts/train-{tag}", *overrides])


def _select_and_train(root: Path, tag: str, *overrides: str) -> tuple[dict, dict]:
    from tasks import select, train

    cfg = _cfg(root, tag, *overrides)
    select.run(cfg)
    plan = json.loads(cfg.path("plan").read_text())
    return plan, train.run(cfg)


# IA3 and prompt tuning run in the slow set (CI time); the four methods the planner picks run always.
@pytest.mark.parametrize("method", ["full", "lora", "dora", "qlora",
                                    pytest.param("ia3", marks=pytest.mark.slow),
                                    pytest.param("prompt_tuning", marks=pytest.mark.slow)])
def test_every_method_lowers_the_loss(project, method):
    plan, m = _select_and_train(project, method, f"select.method={method}")
    assert plan["method"] == method == m["method"]
    assert m["steps"] == 8 and m["final_loss"] < m["first_loss"], m
    artifact = Path(m["train_dir"]) / m["artifact"]
    assert (artifact / ("config.json" if method == "full" else "adapter_config.json")).is_file()
    if method != "full":
        assert json.loads((artifact / "adapter_config.json").read_text())["peft_type"] == \
            {"lora": "LORA", "dora": "LORA", "qlora": "LORA", "ia3": "IA3", "prompt_tuning": "PROMPT_TUNING"}[method]
        assert 0 < m["trainable_params"] < m["total_params"] / 10


def test_qlora_base_weights_are_4bit_and_lora_still_learns_after_eval(project):
    """The base's block linears are bitsandbytes NF4 Linear4bit (uint8 storage, double quant);
    after an eval-mode forward (the CPU repacking trap) the LoRA weights still get gradients."""
    import bitsandbytes as bnb
    import torch

    from tuneops.training import methods

    cfg = _cfg(project, "qlora")
    plan = json.loads(cfg.path("plan").read_text()) if cfg.path("plan").is_file() else None
    if plan is None:
        plan, _ = _select_and_train(project, "qlora", "select.method=qlora")
    model = methods.build(cfg.path("base_model_dir"), plan)
    q = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    layers = json.loads((cfg.path("base_model_dir") / "config.json").read_text())["num_hidden_layers"]
    assert len(q) == 7 * layers          # q/k/v/o + gate/up/down in every block
    w = q[0].weight
    assert w.dtype == torch.uint8 and w.quant_state.quant_type == "nf4" and w.quant_state.nested
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    ids = torch.randint(3, 1000, (2, 12))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None for p in lora)


def test_packing_keeps_examples_apart(project):
    """Packed rows give every example exactly the logits it gets alone, and pack loses nothing."""
    import torch

    from tuneops.models import load_causal_lm
    from tuneops.training.packing import PackedCollator, pack, padding_efficiency

    cfg = _cfg(project, "pack")
    model = load_causal_lm(cfg.path("base_model_dir")).eval()
    g = torch.Generator().manual_seed(0)
    feats = [{"input_ids": torch.randint(3, 1000, (n,), generator=g).tolist(), "labels": list(range(n))}
             for n in (7, 12, 5, 9, 30, 3)]
    rows = pack(feats, 32)
    assert sorted(len(f["input_ids"]) for f in feats) == sorted(
        e - s for r in rows for s, e in _spans(r["position_ids"]))
    assert all(len(r["input_ids"]) <= 32 for r in rows) and len(rows) < len(feats)
    assert padding_efficiency(rows, 1) == 1.0
    batch = PackedCollator(0)(rows)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for i, r in enumerate(rows):
            for s, e in _spans(r["position_ids"]):
                assert r["labels"][s] == -100          # no loss across a boundary
                own = model(input_ids=torch.tensor([r["input_ids"][s:e]]), use_cache=False).logits[0]
                assert torch.allclose(own, packed[i, s:e], atol=1e-4)


def _spans(pos: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(pos) if p == 0]
    return list(zip(starts, starts[1:] + [len(pos)]))


@pytest.mark.slow
def test_packing_trains(project):
    _, m = _select_and_train(project, "packed", "select.method=lora", "train.packing=true")
    assert m["packing"] and m["final_loss"] < m["first_loss"]


def _adapter_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.parametrize("zero", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)])
def test_deepspeed_zero_on_two_gloo_processes(project, zero):
    """torchrun, 2 processes, gloo: the adapter has the single-process format (same tensors and
    shapes), reloads onto the base and generates; the loss goes down."""
    import torch
    from peft import PeftModel

    from tuneops.models import load_causal_lm

    plan, m = _select_and_train(project, f"zero{zero}", "select.method=lora", "select.hardware.cpu_processes=2",
                                f"select.zero_stage={zero}")
    assert (plan["world_size"], plan["zero_stage"], plan["launcher"]) == (2, zero, "deepspeed")
    assert plan["micro_batch_size"] * plan["grad_accum"] * 2 == plan["global_batch_size"]
    assert m["world_size"] == 2 and m["zero_stage"] == zero and m["steps"] == 8
    assert m["final_loss"] < m["first_loss"]
    single = _cfg(project, "lora").path("train_dir") / "adapter"
    if not single.is_dir():
        _select_and_train(project, "lora", "select.method=lora")
    adapter = Path(m["train_dir"]) / "adapter"
    keys = _adapter_keys(adapter)
    assert keys == _adapter_keys(single) and all(all(d > 0 for d in s) for s in keys.values())
    cfg = _cfg(project, f"zero{zero}")
    model = PeftModel.from_pretrained(load_causal_lm(cfg.path("base_model_dir")), str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 10, 20, 30]])).logits
    assert torch.isfinite(logits).all()


def _checkpoint_root(cfg) -> Path:
    roots = [p for p in cfg.path("checkpoint_dir").iterdir() if p.is_dir()]
    assert len(roots) == 1, roots
    return roots[0]


def test_sigkill_resumes_from_the_last_complete_checkpoint(project):
    """Kill `tuneops train` with SIGKILL once a random checkpoint is complete; a fake half-written
    newer checkpoint is skipped; the rerun resumes (not from step 0), finishes, and the loss curve
    continues (every step once, in order, one MLflow run)."""
    from tuneops.training import checkpoints

    tag = "crash"
    sets = ["select.method=lora", "train.save_steps=2", "train.max_steps=10", "train.save_total_limit=5",
            f"paths.plan=artifacts/select/plan-{tag}.json", f"paths.train_dir=artifacts/train-{tag}",
            f"paths.checkpoint_dir=.tuneops/ck-{tag}"]
    argv = [sys.executable, "-m", "tuneops"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run(argv[:3] + ["select"] + argv[3:], cwd=project, env=env, check=True, capture_output=True)
    kill_at = random.Random().choice([2, 4, 6])
    cfg = _cfg(project, tag, *sets)
    proc = subprocess.Popen(argv[:3] + ["train"] + argv[3:], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if cfg.path("checkpoint_dir").is_dir():
            done = [c for r in cfg.path("checkpoint_dir").iterdir() if r.is_dir()
                    for c in r.glob("checkpoint-*") if checkpoints.is_complete(c)]
            if any(checkpoints.step_of(c) >= kill_at for c in done):
                break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = _checkpoint_root(cfg)
    last, _ = checkpoints.latest_complete(root)
    assert last is not None and checkpoints.step_of(last) >= kill_at
    assert not (cfg.path("train_dir") / "metrics.json").exists()
    # a newer checkpoint that was being written when the process died: files, no marker
    fake = root / f"checkpoint-{checkpoints.step_of(last) + 1}"
    fake.mkdir(exist_ok=True)
    (fake / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    # and a truncated file in an older complete one does not matter: only the newest is used
    rerun = subprocess.run(argv[:3] + ["train"] + argv[3:], cwd=project, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    m = json.loads((cfg.path("train_dir") / "metrics.json").read_text())
    assert m["resumed_from_step"] == checkpoints.step_of(last) > 0
    assert fake.name in m["skipped_checkpoints"]
    assert m["steps"] == 10
    history = json.loads((cfg.path("train_dir") / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 11))     # the curve continues, no restart
    import mlflow

    from tuneops.registry import tracking

    tracking.setup(cfg)
    run = mlflow.get_run(m["mlflow_run_id"])
    losses = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "loss")
    assert sorted({x.step for x in losses}) == list(range(1, 11))   # one run, continued
    assert not root.exists()        # a finished run cleans its checkpoints (train.keep_checkpoints=false)


def test_truncated_checkpoint_is_skipped(tmp_path):
    from tuneops.training import checkpoints

    for step in (2, 4):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "weights.bin").write_bytes(b"x" * 1000)
        checkpoints.mark_complete(ck)
    assert checkpoints.latest_complete(tmp_path)[0].name == "checkpoint-4"
    with open(tmp_path / "checkpoint-4" / "weights.bin", "r+b") as fh:
        fh.truncate(10)
    last, skipped = checkpoints.latest_complete(tmp_path)
    assert last.name == "checkpoint-2" and [p.name for p in skipped] == ["checkpoint-4"]


def test_length_batches_cover_every_example_once_with_little_padding_in_random_order():
    """train.group_by_length's sampler: each example once per pass, batches of similar length
    (padding share far below random batches'), batch order shuffled (not longest first, which would
    sort the loss curve by length), and the same order again from the same torch seed (resume)."""
    import random

    import torch

    from tuneops.training.loop import LengthBatches

    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(10, 60), rng.randint(60, 250)]) for _ in range(805)]
    sampler = LengthBatches(lengths, batch=8)
    torch.manual_seed(42)
    order = list(sampler)
    torch.manual_seed(42)
    assert list(sampler) == order and sorted(order) == list(range(805))
    batches = [order[i:i + 8] for i in range(0, len(order), 8)]

    def real_share(bs: list[list[int]]) -> float:
        return sum(lengths[i] for b in bs for i in b) / sum(max(lengths[i] for i in b) * len(b) for b in bs)

    shuffled = list(range(805))
    rng.shuffle(shuffled)
    assert real_share(batches) > 0.8 > 0.6 > real_share([shuffled[i:i + 8] for i in range(0, 805, 8)])
    longest = [max(lengths[i] for i in b) for b in batches]
    first_half, second_half = longest[: len(longest) // 2], longest[len(longest) // 2:]
    assert abs(sum(first_half) / len(first_half) - sum(second_half) / len(second_half)) < 30
    assert longest != sorted(longest, reverse=True) and longest != sorted(longest)
