"""``tuneops plan``: print a fine-tuning plan (or the rules) for a model on some hardware."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .goals import METHODS, MINIMIZE, QUALITY, Goals
from .hardware import Hardware
from .model import ModelSpec
from .rules import Plan, PlanError, explain, make_plan
from ..training.heads import HEADS
from .table import load_table

_DEFAULT_HARDWARE = {"gpus": "auto", "gpu_memory_gb": "auto", "host_ram_gb": "auto", "nodes": 1}
_DEFAULT_SEQ_LEN = 256


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump, no SystemExit
        raise _UsageError(message)


def _parser() -> _Parser:
    p = _Parser(prog="tuneops plan", description="Choose a fine-tuning method and its memory plan.")
    p.add_argument("--model", help="model folder with config.json, or a config .json file")
    p.add_argument("--gpus", type=int, help="GPUs per node (0 = train on CPU)")
    p.add_argument("--gpu-memory-gb", type=float, help="memory per GPU, GiB")
    p.add_argument("--host-ram-gb", type=float, help="host RAM per node, GiB")
    p.add_argument("--nodes", type=int)
    p.add_argument("--cpu-processes", type=int, help="CPU-only: training processes per node (gloo)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), help="force a DeepSpeed ZeRO stage")
    p.add_argument("--offload", choices=("none", "optimizer", "optimizer+params"), help="force ZeRO offload")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--tokens", type=int, help="training tokens (for steps per epoch)")
    p.add_argument("--minimize", choices=MINIMIZE)
    p.add_argument("--quality", choices=QUALITY)
    p.add_argument("--method", choices=METHODS, help="force a method")
    p.add_argument("--scenario", choices=list(load_table().scenarios), default="chat")
    p.add_argument("--task-head", choices=list(HEADS),
                   help="force the head (default: select.task_head; auto = the scenario's)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--explain", action="store_true", help="print the method table and rules")
    return p


def main(argv: list[str], defaults: dict[str, Any] | None = None) -> int:
    """Run ``tuneops plan``; ``defaults`` is the params ``select`` section plus ``seq_len`` and
    ``model_path``. Returns 0, or 2 after one ``tuneops plan: error: ...`` line on stderr."""
    try:
        args = _parser().parse_args(argv)
        if args.explain:
            print(explain())
            return 0
        plan = _plan_from(args, dict(defaults or {}))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (_UsageError, PlanError, ValueError, OSError) as exc:
        print(f"tuneops plan: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else summary(plan))
    return 0


def _plan_from(args: argparse.Namespace, select: dict[str, Any]) -> Plan:
    model_path, seq_len = select.pop("model_path", None), select.pop("seq_len", _DEFAULT_SEQ_LEN)
    task_head = select.pop("task_head", "auto")      # params' select.task_head (the stage's choice, not a goal)
    task_head = args.task_head or (None if task_head == "auto" else task_head)
    model_path = args.model if args.model is not None else model_path
    seq_len = args.seq_len if args.seq_len is not None else seq_len
    if not model_path:
        raise ValueError("no model: pass --model PATH (a folder with config.json)")
    hardware = {**_DEFAULT_HARDWARE, **select.get("hardware", {})}
    for key in ("gpus", "gpu_memory_gb", "host_ram_gb", "nodes", "cpu_processes"):
        if getattr(args, key) is not None:
            hardware[key] = getattr(args, key)
    for key in ("minimize", "quality", "zero_stage", "offload"):
        if getattr(args, key) is not None:
            select[key] = getattr(args, key)
    if args.method:
        select["method"] = args.method
        allowed = list(select.get("allowed_methods", Goals().allowed_methods))
        select["allowed_methods"] = allowed + ([args.method] if args.method not in allowed else [])
    goals = Goals.from_params({**select, "hardware": hardware})
    return make_plan(ModelSpec.from_path(model_path), Hardware.from_params(hardware), seq_len, goals,
                     scenario=args.scenario, tokens=args.tokens, task_head=task_head)


def summary(plan: Plan) -> str:
    """Human-readable plan: decisions, predicted memory with breakdown, and reasons."""
    m, hw, d = plan.model, plan.hardware, plan.to_dict()
    where = (f"CPU ({hw.cpu_processes} process(es), each {hw.device_memory_gb:.1f} GiB of host RAM)" if hw.is_cpu else f"{hw.gpus} x {hw.gpu_memory_gb:g} GiB GPU x {hw.nodes} node(s)")
    peft = "" if plan.peft is None else "  " + ", ".join(f"{k}={v}" for k, v in plan.peft.items() if v is not None)
    lines = [
        f"plan for {m.name} ({m.params / 1e6:,.1f}M params, {plan.scenario}/{plan.task_head}) on {where}",
        f"  method        {plan.method}{peft}",
        f"  precision     {plan.precision}",
        f"  ZeRO          stage {plan.zero_stage}, offload optimizer={plan.offload['optimizer']} params={plan.offload['params']}",
        f"  batch         micro {plan.micro_batch_size} x accum {plan.grad_accum} x world {plan.world_size} "
        f"= {plan.global_batch_size} (seq_len {plan.seq_len})",
        f"  checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        f"  launcher      {plan.launcher} (nproc_per_node {plan.nproc_per_node}, nodes {plan.nodes})",
        f"  predicted     {plan.predicted_peak_gb_per_device:.2f} GiB per device of {plan.usable_gb_per_device:.1f} "
        f"usable: {'fits' if plan.fits else 'DOES NOT FIT'}",
        "                " + ", ".join(f"{k} {v:.2f}" for k, v in d["breakdown"].items()),
        "  reasons:",
    ]
    lines += [f"    [{r['rule']}] {r['text']}" for r in plan.reasons]
    return "\n".join(lines)
