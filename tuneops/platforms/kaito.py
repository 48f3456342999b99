"""`tuneops export kaito`: a Kaito tuning Workspace (kaito.sh/v1beta1) and the ConfigMap with its
``training_config.yaml``, from the plan. Field names follow Kaito's CRD
(charts/kaito/workspace/crds/kaito.sh_workspaces.yaml, vendored in ``schemas/``) and its default
lora/qlora ConfigMaps (charts/kaito/workspace/templates/{lora,qlora}-params.yaml): sections
ModelConfig, QuantizationConfig, LoraConfig, TrainingArguments, DataCollator, DatasetConfig.

Kaito tunes with LoRA or QLoRA on one GPU node through its own launcher: full fine-tuning, DoRA,
IA3, prompt tuning, classification heads, ZeRO offload and multi-node plans are refused.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..training.heads import is_head
from ..training.methods import compute_precision
from . import PlatformError, load_plan, out_dir

SCHEMA = Path(__file__).with_name("schemas") / "kaito-workspace-v1beta1.yaml"
API_VERSION = "kaito.sh/v1beta1"
METHODS = ("lora", "qlora")                        # Kaito's TuningMethod enum (api/v1beta1/workspace_types.go)
_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def check_plan(plan: dict[str, Any]) -> None:
    """Refuse what a Kaito tuning Workspace cannot express, naming what to change."""
    method = plan["method"]
    peft = plan.get("peft") or {}
    if method not in METHODS or peft.get("use_dora"):
        what = "DoRA" if peft.get("use_dora") or method == "dora" else method
        raise PlatformError(f"export kaito: Kaito tunes with lora or qlora only (tuning.method), the plan is {what}; "
                            "plan one with --set select.method=lora (or qlora), or run it with `tuneops export azureml` "
                            "or on a Prefect work pool")
    if is_head(plan):
        raise PlatformError(f"export kaito: Kaito's tuning presets train causal LMs, the plan trains a "
                            f"{plan['task_head']} head; set select.task_head=causal_lm")
    off = plan.get("offload") or {}
    if off.get("optimizer") or off.get("params"):
        what = "+".join(k for k in ("optimizer", "params") if off.get(k))
        raise PlatformError(f"export kaito: the plan needs ZeRO-{plan['zero_stage']} with {what} offload, which a Kaito "
                            "Workspace cannot configure; pick a larger platforms.kaito.instance_type and re-plan "
                            "with its GPUs (select.hardware) and --set select.offload=none, or use `tuneops export azureml`")
    if plan.get("nodes", 1) > 1:
        raise PlatformError(f"export kaito: the plan spans {plan['nodes']} nodes; Kaito tunes on one node: re-plan with "
                            "--set select.hardware.nodes=1, or use `tuneops export azureml` for multi-node")


def training_config(cfg: Any, plan: dict[str, Any]) -> dict[str, Any]:
    t, peft = cfg.train, plan["peft"]
    dtype = _DTYPE.get(compute_precision(plan), "bfloat16")
    quant: dict[str, Any] = {"load_in_4bit": False}
    if plan["method"] == "qlora":        # what tuneops' QLoRA does: NF4, double quantization
        quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype,
                 "bnb_4bit_use_double_quant": True}
    return {"training_config": {
        "ModelConfig": {"torch_dtype": dtype, "local_files_only": True, "device_map": "auto"},
        "QuantizationConfig": quant,
        "LoraConfig": {"r": peft["r"], "lora_alpha": peft["alpha"], "lora_dropout": peft["dropout"],
                       "target_modules": list(peft["target_modules"])},
        "TrainingArguments": {
            "output_dir": "/mnt/results", "ddp_find_unused_parameters": False,
            "per_device_train_batch_size": plan["micro_batch_size"],
            "gradient_accumulation_steps": plan["grad_accum"], "max_steps": t.max_steps,
            "learning_rate": t.learning_rate, "weight_decay": t.weight_decay, "warmup_steps": t.warmup_steps,
            "lr_scheduler_type": t.lr_scheduler, "max_grad_norm": t.max_grad_norm,
            "logging_steps": t.logging_steps, "seed": t.seed,
            "save_strategy": "steps" if t.save_steps else "no", **({"save_steps": t.save_steps} if t.save_steps else {}),
            "gradient_checkpointing": bool(plan.get("gradient_checkpointing")),
            **({"bf16": True} if dtype == "bfloat16" else {"fp16": True} if dtype == "float16" else {}),
        },
        "DataCollator": {"mlm": False},      # causal LM: next-token labels
        "DatasetConfig": {"shuffle_dataset": True, "train_test_split": 1},
    }}


def workspace(cfg: Any, plan: dict[str, Any], config_name: str) -> dict[str, Any]:
    k = cfg.platforms.kaito
    if k.input_urls:
        source: dict[str, Any] = {"urls": list(k.input_urls)}
    elif k.input_image:
        source = {"image": k.input_image}
    else:
        source = {"volumeSource": {"persistentVolumeClaim": {"claimName": k.input_volume_claim}}}
    if k.output_image:
        dest: dict[str, Any] = {"image": k.output_image, **({"imagePushSecret": k.output_push_secret}
                                                            if k.output_push_secret else {})}
    else:
        dest = {"volumeSource": {"persistentVolumeClaim": {"claimName": k.output_volume_claim}}}
    return {
        "apiVersion": API_VERSION, "kind": "Workspace",
        "metadata": {"name": k.name, "namespace": k.namespace,
                     "labels": {"app.kubernetes.io/managed-by": "tuneops"},
                     "annotations": {"tuneops/method": plan["method"], "tuneops/zero-stage": str(plan["zero_stage"]),
                                     "tuneops/global-batch-size": str(plan["global_batch_size"])}},
        "resource": {"instanceType": k.instance_type, "labelSelector": {"matchLabels": {"apps": k.name}}},
        "tuning": {"preset": {"name": k.preset}, "method": plan["method"], "config": config_name,
                   "input": source, "output": dest},
    }


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD schema as the API server applies it with strict field validation (kubectl's default):
    an unknown field is an error, except under ``x-kubernetes-preserve-unknown-fields``."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def validate(doc: dict[str, Any]) -> None:
    """The CRD's OpenAPI schema (jsonschema) plus the rules of Kaito's webhook the schema cannot state."""
    import jsonschema

    schema = _strict(yaml.safe_load(SCHEMA.read_text()))
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        raise PlatformError(f"export kaito: Workspace {'.'.join(map(str, e.path)) or '(root)'}: {e.message} "
                            f"(CRD schema {SCHEMA.name}; {len(errors)} problem(s))")
    tuning = doc["tuning"]
    if tuning["method"] not in METHODS:
        raise PlatformError(f"export kaito: tuning.method: {tuning['method']!r} is not one of {METHODS}")
    if sum(bool(tuning["input"].get(f)) for f in ("urls", "image", "volumeSource")) != 1:
        raise PlatformError("export kaito: tuning.input: exactly one of urls, image, volumeSource")
    if sum(bool(tuning["output"].get(f)) for f in ("image", "volumeSource")) != 1:
        raise PlatformError("export kaito: tuning.output: exactly one of image, volumeSource")


def check_config(method: str, config: dict[str, Any]) -> None:
    """Kaito's ConfigMap rules: every section present; lora must not, qlora must, load in 4/8 bit."""
    tc = config["training_config"]
    missing = [s for s in ("ModelConfig", "QuantizationConfig", "LoraConfig", "TrainingArguments",
                           "DataCollator", "DatasetConfig") if s not in tc]
    if missing:
        raise PlatformError(f"export kaito: training_config.yaml: missing sections {missing}")
    q = tc["QuantizationConfig"]
    quantized = bool(q.get("load_in_4bit") or q.get("load_in_8bit"))
    if quantized != (method == "qlora"):
        raise PlatformError(f"export kaito: QuantizationConfig: method {method} "
                            f"{'needs' if method == 'qlora' else 'must not have'} load_in_4bit/load_in_8bit true")


class _Block(str):
    """A multi-line string written as a YAML literal block (``|``), as in Kaito's own ConfigMaps."""


yaml.SafeDumper.add_representer(_Block, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|"))


def export(cfg: Any) -> dict[str, Any]:
    plan = load_plan(cfg)
    check_plan(plan)
    k = cfg.platforms.kaito
    config_name = f"{k.name}-config"
    tc = training_config(cfg, plan)
    check_config(plan["method"], tc)
    configmap = {"apiVersion": "v1", "kind": "ConfigMap",
                 "metadata": {"name": config_name, "namespace": k.namespace},
                 "data": {"training_config.yaml": _Block(yaml.safe_dump(tc, sort_keys=False))}}
    ws = workspace(cfg, plan, config_name)
    validate(ws)
    path = out_dir(cfg, "kaito") / "kaito.yaml"
    path.write_text("# tuneops export kaito: `kubectl apply -f` this file (ConfigMap, then the Workspace)\n"
                    + yaml.safe_dump_all([configmap, ws], sort_keys=False))
    return {"platform": "kaito", "files": [str(path)], "method": plan["method"], "preset": k.preset,
            "instance_type": k.instance_type, "configmap": config_name, "workspace": k.name}
