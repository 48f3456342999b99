"""`tuneops export azureml`: Azure ML CLI v2 jobs from the plan (`az ml job create -f FILE`).

- ``command-job.yaml``: the tuneops image runs ``python -m tuneops.training.launch`` once per
  process; ``distribution: {type: pytorch, process_count_per_instance: <nproc_per_node>}`` and
  ``resources.instance_count: <nodes>`` make Azure ML start the plan's world (it sets RANK,
  WORLD_SIZE, MASTER_ADDR for every process, as torchrun does). Inputs are ``uri_file`` (the
  validated training data, the plan, the resolved params), each with its md5 in the job's tags
  (``tuneops.md5.<input>``; inputs have no field of their own for it); the output is ``mlflow_model``.
- ``finetuning-job.yaml``: Azure ML's managed fine-tuning (``type: finetuning``, custom model
  provider) for plans whose method it runs (LoRA on a causal LM); otherwise not written, with the
  reason in the result.

Both are checked with the SDK's own loader (``azure.ai.ml.load_job``, offline).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tuneops.io import md5_file

from . import PlatformError, load_plan, out_dir

APP = "/app"          # the project folder inside the image (Dockerfile WORKDIR)
_TASK = {"chat": "chat_completion"}


def _input(path: Path, what: str) -> tuple[dict[str, Any], str]:
    # Azure ML inputs have no free-text field: the md5 rides in the job's tags (tuneops.md5.<input>)
    return {"type": "uri_file", "path": f"./{path.name}", "mode": "download"}, md5_file(path)


def command_job(cfg: Any, plan: dict[str, Any], folder: Path) -> tuple[dict[str, Any], dict[str, str]]:
    a = cfg.platforms.azureml
    files = {"train_data": (cfg.path("clean_train_data"), "validated training data (tuneops validate)"),
             "plan": (cfg.path("plan"), "tuneops plan (tuneops select)")}
    inputs, md5s = {}, {}
    for name, (src, what) in files.items():
        if not src.is_file():
            raise PlatformError(f"export azureml: {src}: missing; run `tuneops validate` and `tuneops select` first")
        shutil.copy2(src, folder / src.name)
        inputs[name], md5s[name] = _input(folder / src.name, what)
    params = folder / "params.json"          # the resolved params every process loads
    params.write_text(json.dumps(cfg.raw, indent=1, default=str))
    inputs["params"], md5s["params"] = _input(params, "resolved tuneops params")
    sets = ["paths.clean_train_data=${{inputs.train_data}}", "paths.plan=${{inputs.plan}}",
            "paths.checkpoint_dir=${{outputs.model}}/checkpoints"]
    command = (f"python -m tuneops.training.launch ${{{{inputs.params}}}} {APP} ${{{{outputs.model}}}} "
               + " ".join(f"--set {s}" for s in sets))
    job: dict[str, Any] = {
        "$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json",
        "type": "command",
        "display_name": f"tuneops {plan['method']} ({plan['world_size']} processes)",
        "experiment_name": a.experiment,
        "description": f"tuneops train: {plan['method']}, ZeRO-{plan['zero_stage']}, global batch "
                       f"{plan['global_batch_size']} = {plan['micro_batch_size']} x {plan['grad_accum']} x "
                       f"{plan['world_size']}",
        "command": command,
        "environment": {"image": cfg.platforms.image},
        "compute": f"azureml:{a.compute}",
        "distribution": {"type": "pytorch", "process_count_per_instance": plan["nproc_per_node"]},
        "resources": {"instance_count": plan["nodes"], **({"instance_type": a.instance_type}
                                                         if a.instance_type else {})},
        "inputs": inputs,
        "outputs": {"model": {"type": "mlflow_model"}},
        "tags": {"tuneops.method": plan["method"], **{f"tuneops.md5.{k}": v for k, v in md5s.items()}},
    }
    return job, md5s


def finetuning_job(cfg: Any, plan: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The managed job, or None and why not."""
    if plan["method"] != "lora" or (plan.get("peft") or {}).get("use_dora"):
        return None, (f"Azure ML managed fine-tuning trains LoRA adapters; the plan is {plan['method']}: "
                      "use the command job")
    from ..training.heads import is_head

    task = _TASK.get("" if is_head(plan) else plan.get("scenario", "chat"))
    if task is None:
        return None, f"no managed fine-tuning task for the {plan.get('scenario')} scenario: use the command job"
    a, t, peft = cfg.platforms.azureml, cfg.train, plan["peft"]
    hp = {"max_steps": t.max_steps, "learning_rate": t.learning_rate, "per_device_train_batch_size":
          plan["micro_batch_size"], "gradient_accumulation_steps": plan["grad_accum"], "lora_r": peft["r"],
          "lora_alpha": peft["alpha"], "lora_dropout": peft["dropout"], "warmup_steps": t.warmup_steps,
          "lr_scheduler_type": t.lr_scheduler, "weight_decay": t.weight_decay, "seed": t.seed}
    return {
        "$schema": "https://azuremlschemas.azureedge.net/latest/finetuningJob.schema.json",
        "type": "finetuning",
        "model_provider": "custom",
        "task": task,
        "display_name": f"tuneops managed {plan['method']}",
        "experiment_name": a.experiment,
        "model": {"type": "mlflow_model", "path": a.finetuning_model},
        "training_data": {"type": "uri_file", "path": f"./{cfg.path('clean_train_data').name}"},
        "hyperparameters": {k: str(v) for k, v in hp.items()},
        "outputs": {"registered_model": {"type": "mlflow_model", "name": cfg.register.model_name}},
    }, "LoRA on a chat causal LM"


def check(path: Path) -> Any:
    """Parse and schema-check a job YAML with the Azure ML SDK, offline (no workspace)."""
    import logging

    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)   # "experimental class" notes
    try:
        from azure.ai.ml import load_job
    except ImportError as exc:
        raise PlatformError("export azureml: the check needs the Azure ML SDK: pip install azure-ai-ml") from exc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the finetuning schema is marked experimental
        try:
            return load_job(source=str(path))
        except Exception as exc:                 # the SDK's ValidationException and marshmallow errors
            detail = " ".join(str(exc).split())
            raise PlatformError(f"export azureml: {path}: {detail[:600]}") from exc


def export(cfg: Any) -> dict[str, Any]:
    plan = load_plan(cfg)
    folder = out_dir(cfg, "azureml")
    job, md5s = command_job(cfg, plan, folder)
    cmd_path = folder / "command-job.yaml"
    cmd_path.write_text(yaml.safe_dump(job, sort_keys=False))
    check(cmd_path)
    result: dict[str, Any] = {"platform": "azureml", "files": [str(cmd_path)],
                              "process_count_per_instance": plan["nproc_per_node"], "instance_count": plan["nodes"],
                              "md5": md5s}
    ft, why = finetuning_job(cfg, plan)
    ft_path = folder / "finetuning-job.yaml"
    if ft is not None:
        ft_path.write_text(yaml.safe_dump(ft, sort_keys=False))
        check(ft_path)
        result["files"].append(str(ft_path))
    else:
        ft_path.unlink(missing_ok=True)
    result["finetuning"] = why
    return result
