"""Typed configuration: params.yaml (+ ``--set`` overrides) -> validated ``Config``.

params.yaml is the single source of truth. Every stage receives a ``ConfigView``: the
``Config`` restricted to the sections and keys it declares in its ``StageSpec``
(tuneops/stages.py), which is what dvc.yaml lists under ``params:``; reading anything
else raises ``UndeclaredParam``.

A bad value is reported as one line naming the file and the dotted key, e.g.
``params.yaml: train.learning_rate: Input should be greater than 0 (got -0.1)``,
before any work starts.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from .errors import ConfigError, InvalidInput  # noqa: F401  (ConfigError: re-exported, callers import it from here)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _known_base_quant(value: str, *also: str) -> str:
    """``value`` if it names a shared adapter base's quantization (``BASE_QUANTS``) or one of ``also``."""
    from .export.basequant import BASE_QUANTS

    return _known(value, (*also, *BASE_QUANTS), "tuneops/export/adapters.py")


def _known(value: Any, names: Any, where: str, item: bool = False) -> Any:
    """``value`` if it is one of ``names`` (a spec registry's keys), else the error that lists them;
    ``item``: one entry of a list (the message names it)."""
    if value not in names:
        known = ", ".join(map(str, names))
        raise ValueError(f"{value!r} is not one of {known} ({where})" if item else f"must be one of {known} ({where})")
    return value


def _methods() -> tuple[str, ...]:
    from .training.methods import METHODS

    return tuple(METHODS)


class PathsParams(_Section):
    state_dir: str
    base_model_dir: str
    train_data: str
    eval_data: str
    ingest_manifest: str
    validation_dir: str
    clean_train_data: str     # validate: the accepted train rows as chat records (what training reads)
    clean_eval_data: str
    plan: str
    train_dir: str
    checkpoint_dir: str       # train: crash-safe checkpoints (kept outside train_dir: DVC deletes outputs)
    evaluate_dir: str
    optimize_dir: str
    register_dir: str


class TinyModelParams(_Section):
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    seed: int = 0


class ModelParams(_Section):
    source: str                # a source spec (tuneops/models.py SOURCES)
    local_path: str | None = None
    max_seq_len: int = Field(gt=8, le=32768)
    tiny: TinyModelParams

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        from .models import SOURCES

        return _known(v, SOURCES, "tuneops/models.py")

    @model_validator(mode="after")
    def _local_needs_path(self) -> "ModelParams":
        from .models import SOURCES

        if SOURCES[self.source].needs_path and not self.local_path:
            raise ValueError(f"local_path is required when source is {self.source!r}")
        return self


class UserDataParams(_Section):
    path: str | None = None
    md5: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    eval_path: str | None = None    # a held-out file of the same format (else eval_fraction of `path`)
    eval_md5: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _eval_needs_md5(self) -> "UserDataParams":
        if bool(self.eval_path) != bool(self.eval_md5):
            raise ValueError("eval_path and eval_md5 go together")
        return self


class DataParams(_Section):
    scenario: str              # a scenario spec (tuneops/data/scenarios.py REGISTRY)
    format: str                # auto (the scenario's) or a format spec (tuneops/data/formats.py FORMAT_SPECS)
    policy: Literal["fail", "quarantine"]
    max_rejected_fraction: float = Field(ge=0, le=1)
    labels: list[str | int] | None = Field(default=None, min_length=2)
    entity_types: list[str] | None = Field(default=None, min_length=1)
    user: UserDataParams

    @field_validator("scenario")
    @classmethod
    def _known_scenario(cls, v: str) -> str:
        from .data.scenarios import REGISTRY

        return _known(v, REGISTRY, "tuneops/data/scenarios.py")

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        from .data.formats import FORMAT_SPECS

        return _known(v, ("auto", *FORMAT_SPECS), "tuneops/data/formats.py")

    @model_validator(mode="after")
    def _scenario_and_format_agree(self) -> "DataParams":
        from .data.scenarios import REGISTRY, USER

        own = REGISTRY[self.scenario].format
        if self.scenario == USER:
            if self.format == "auto":
                raise ValueError("scenario 'user' needs an explicit format (tuneops data add sets it)")
            if not self.user.path or not self.user.md5:
                raise ValueError("scenario 'user' needs user.path and user.md5 (set by `tuneops data add`)")
        elif self.format not in ("auto", own):
            raise ValueError(f"scenario {self.scenario!r} produces format {own!r} (got format {self.format!r}; "
                             f"use auto)")
        return self

    @property
    def resolved_format(self) -> str:
        from .data.scenarios import REGISTRY

        return self.format if self.format != "auto" else REGISTRY[self.scenario].format


class IngestParams(_Section):
    language: str
    target_language: str = Field(pattern=r"^[A-Za-z]{2,3}([_-][A-Za-z0-9]{2,8})*$")
    eval_fraction: float = Field(gt=0, lt=1)
    seed: int
    max_chars: int = Field(gt=0)
    max_conversations: int | None = Field(default=None, gt=1)
    max_per_label: int = Field(gt=0)


class ValidateParams(_Section):
    min_rows: int = Field(ge=1)
    max_duplicate_fraction: float = Field(ge=0, le=1)
    max_near_duplicate_fraction: float = Field(ge=0, le=1)
    max_label_imbalance: float = Field(ge=1)
    max_length_ratio: float = Field(gt=1)
    max_record_bytes: int = Field(ge=1024, le=256 * 1024 * 1024)


class LoraParams(_Section):
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    # auto: the model family's attention projections; all-linear: attention + MLP (tuneops/families.py)
    target_modules: Literal["auto", "all-linear"] | list[str] = "auto"

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("must be auto, all-linear or a non-empty list of module names")
        return v


class HardwareParams(_Section):
    gpus: int | Literal["auto"] = "auto"
    gpu_memory_gb: float | Literal["auto"] = "auto"
    host_ram_gb: float | Literal["auto"] = "auto"
    nodes: int = Field(default=1, ge=1)
    cpu_processes: int = Field(default=1, ge=1)


class SelectParams(_Section):
    method: str                                        # auto or a method spec (tuneops/training/methods.py)
    allowed_methods: list[str] = Field(min_length=1)   # method specs
    minimize: Literal["memory", "cost", "time"]
    quality: Literal["standard", "best"]
    global_batch_size: int = Field(gt=0)
    max_micro_batch_size: int = Field(gt=0)
    lora: LoraParams
    hardware: HardwareParams
    memory_headroom: float = Field(gt=0, le=1)
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    offload: Literal["auto", "none", "optimizer", "optimizer+params"] = "auto"
    task_head: str = "auto"    # auto (the data format's head) or a head spec (tuneops/training/heads.py)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return _known(v, ("auto", *_methods()), "tuneops/training/methods.py")

    @field_validator("allowed_methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        for m in v:
            _known(m, _methods(), "tuneops/training/methods.py", item=True)
        return v

    @field_validator("task_head")
    @classmethod
    def _known_head(cls, v: str) -> str:
        from .training.heads import HEADS

        return _known(v, ("auto", *HEADS), "tuneops/training/heads.py")


class TrainParams(_Section):
    max_steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0, lt=1)
    weight_decay: float = Field(ge=0)
    warmup_steps: int = Field(ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"]
    max_grad_norm: float = Field(gt=0)
    logging_steps: int = Field(gt=0)
    seed: int
    threads: int = Field(ge=0)
    cpu_mmap_threshold: int = Field(default=65536, ge=0)   # bytes; CPU training (loop.cap_heap_retention)
    packing: bool = False
    group_by_length: bool = True
    save_steps: int = Field(default=0, ge=0)
    save_total_limit: int = Field(default=2, ge=1)
    resume: bool = True
    keep_checkpoints: bool = False
    # the objective (tuneops/training/objectives.py OBJECTIVES): sft | dpo | ipo | ... (pairs: preference data)
    objective: str = "sft"
    beta: float = Field(default=0.1, gt=0)         # pair objectives: strength of the pull towards the reference
    loss_type: str = "auto"                        # auto = the objective's TRL loss_type, or one TRL names
    reference: Literal["start", "base", "precomputed"] = "start"   # pair objectives: the reference model
    start_from: str | None = None                  # null = the base | models:/NAME@ALIAS or models:/NAME/VERSION
                                                   # (a registered fine-tuned model: train on from it; pairs:
                                                   # it is also the reference when reference is start)

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, v: str) -> str:
        from .training.objectives import OBJECTIVES

        return _known(v, OBJECTIVES, "tuneops/training/objectives.py")

    @field_validator("beta", mode="before")
    @classmethod
    def _numeric_beta(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number > 0, e.g. 0.1, not a {type(v).__name__}")
        return v

    @field_validator("start_from")
    @classmethod
    def _model_uri(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"models:/[A-Za-z0-9][A-Za-z0-9_.-]*(@[A-Za-z0-9_-]+|/[0-9]+)", v):
            raise ValueError("must be null or a registered model, models:/NAME@ALIAS or models:/NAME/VERSION")
        return v

    @field_validator("loss_type")
    @classmethod
    def _loss_type_fits(cls, v: str, info: ValidationInfo) -> str:
        from .training.objectives import get, loss_type

        if "objective" in info.data:          # (an unknown objective is reported on its own)
            try:
                loss_type(get(info.data["objective"]), v)
            except ValueError as exc:
                raise ValueError(str(exc).removeprefix("train.loss_type: ")) from None
        return v


class EvaluateParams(_Section):
    batch_size: int = Field(gt=0)
    max_samples: int | None = Field(default=None, gt=0)
    generations: int = Field(ge=0)
    max_new_tokens: int = Field(gt=0)
    graders: list[dict[str, Any]] = Field(default_factory=list)   # OpenAI grader JSON (tuneops/inference/graders.py)
    primary_grader: str | None = None    # a grader's name: the champion gate's metric (null = perplexity)
    grader_max_new_tokens: int = Field(default=96, gt=0)   # a graded turn's reply limit

    @field_validator("graders", mode="before")
    @classmethod
    def _graders(cls, v: Any) -> Any:
        from .inference.graders import check

        return check([] if v is None else v)

    @model_validator(mode="after")
    def _primary_grader(self) -> "EvaluateParams":
        names = [g["name"] for g in self.graders]
        if self.primary_grader is not None and self.primary_grader not in names:
            raise ValueError(f"primary_grader: {self.primary_grader!r} is not the name of one of evaluate.graders "
                             f"({', '.join(names) or 'none declared'})")
        return self


class Int4Params(_Section):
    """The calibrated 4-bit variant (tuneops/export/calibrated.py)."""
    percdamp: float = Field(gt=0, lt=1)            # GPTQ: Hessian dampening, share of its mean diagonal
    sensitivity: bool                              # per-layer report (and mixed precision from it)
    min_contribution_pct: float = Field(ge=0)      # a layer goes 8-bit only if alone in 4-bit it costs this much
    max_size_ratio: float = Field(gt=0, le=1)      # 8-bit units while the stored model stays within this x fp32
    head_rows: bool                                # LM-head rows are 8-bit candidates one by one (else the whole head)
    head_positions: int = Field(gt=0)              # calibration tokens that score the head's rows
    block_size_8bit: int = Field(ge=16)            # the 8-bit units' block (halved until it divides the width)


class GenaiParams(_Section):
    """The ``genai_int4`` variant: onnxruntime-genai's builder options (tuneops/export/variants.py)."""
    int4_algo: Literal["default", "rtn", "k_quant"]
    int4_mixed_precision: str | None = None        # e.g. last_matmul:int8,mixed_layers:int8 (null = all 4-bit)


class OptimizeParams(_Section):
    exporter: Literal["auto", "torch", "builder"]
    opset: int = Field(ge=17, le=23)
    targets: list[str] = Field(default_factory=list)   # [] = the fp32 export only
    extra_variants: list[str] = Field(default_factory=list)  # built besides the targets' variants (names checked
                                                             # against tuneops/export/variants.py by the stage)
    int4: Int4Params
    genai: GenaiParams
    default_order: list[str] = Field(min_length=1)
    parity_atol: float = Field(gt=0)
    parity_samples: int = Field(gt=0)
    kv_parity_tokens: int = Field(gt=0)
    graph_optimization: bool
    block_size: int = Field(ge=16)
    nbits_accuracy_level: int = Field(ge=0, le=4)
    calibration_samples: int = Field(gt=0)
    qdq_op_types: list[str] = Field(min_length=1)
    max_ppl_change_pct: dict[str, float]
    min_top1_agreement: dict[str, float]
    ppl_samples: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    coverage_context: int = Field(gt=0)
    adapter_base: str = "auto"   # unmerged adapter over a shared base graph: auto | none | a tuneops/export/adapters.py BASE_QUANTS name
    lora_adapter_base: str = "none"   # with adapter_base auto: a plain LoRA adapter's base graph (none | a BASE_QUANTS name)

    @field_validator("adapter_base")
    @classmethod
    def _known_adapter_base(cls, v: str) -> str:
        return _known_base_quant(v, "auto", "none")

    @field_validator("lora_adapter_base")
    @classmethod
    def _known_lora_adapter_base(cls, v: str) -> str:
        return _known_base_quant(v, "none")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: list[str]) -> list[str]:
        from .targets import names

        unknown = [t for t in v if t not in names()]
        if unknown:
            raise ValueError(f"unknown target profile(s) {unknown}; known: {names()} (tuneops/targets/*.yaml)")
        return v


class RegisterParams(_Section):
    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    min_improvement_pct: float = Field(ge=0)
    tags: dict[str, str] = Field(default_factory=dict)   # added to every registered version (e.g. the API's job id)


class TrackingParams(_Section):
    experiment: str = Field(min_length=1)
    tracking_uri: str | None = None
    artifact_location: str | None = None


class OrchestrateParams(_Section):
    host: str = Field(min_length=1)
    prefect_port: int = Field(ge=1, le=65535)
    prefect_database_url: str | None = None
    mlflow_server: bool
    mlflow_port: int = Field(ge=1, le=65535)
    startup_timeout_s: float = Field(gt=0)
    work_pool: str = Field(min_length=1)
    deployment: str = Field(min_length=1)
    schedule_cron: str | None = None
    timezone: str = Field(min_length=1)
    watch_cron: str | None = None
    event: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    dedupe_window_s: float = Field(ge=0)
    concurrency_limit: int = Field(ge=1)
    task_retries: int = Field(ge=0)
    task_retry_delay_s: float = Field(ge=0)
    cache: bool
    lock: Literal["wait", "fail"] = "wait"   # a second writer of the project: wait for the lock, or refuse
    lock_timeout_s: float = Field(default=3600, ge=0)

    @model_validator(mode="after")
    def _crons_parse(self) -> "OrchestrateParams":
        for key in ("schedule_cron", "watch_cron"):
            value = getattr(self, key)
            if value is not None and len(value.split()) not in (5, 6):
                raise ValueError(f"{key}: expected a cron expression with 5 fields, e.g. '0 3 * * *' (got {value!r})")
        return self


class ServiceParams(_Section):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    database_url: str | None = None
    storage_dir: str = Field(min_length=1)
    max_upload_mb: float = Field(gt=0)
    allowed_models: list[str] = Field(min_length=1)    # model sources the API offers (tuneops/models.py)
    work_pool: str = Field(min_length=1)
    deployment: str = Field(min_length=1)
    concurrency_limit: int = Field(ge=1)
    heartbeat_s: int = Field(ge=30)
    dead_after_s: int = Field(gt=0)
    sync_interval_s: float = Field(gt=0)
    max_steps: int = Field(gt=0)
    experiment: str = Field(min_length=1)
    job_overrides: list[str] = Field(default_factory=list)
    adapter_base: str = "none"   # every job's LoRA adapter also served unmerged over this shared base (optimize.lora_adapter_base)

    @field_validator("adapter_base")
    @classmethod
    def _known_service_adapter_base(cls, v: str) -> str:
        return _known_base_quant(v, "none")

    @field_validator("allowed_models")
    @classmethod
    def _offered_sources(cls, v: list[str]) -> list[str]:
        from .models import SOURCES

        offered = [n for n, s in SOURCES.items() if s.self_contained]
        for m in v:
            _known(m, offered, "self-contained causal-LM sources in tuneops/models.py", item=True)
        return v

    @model_validator(mode="after")
    def _dead_after_heartbeats(self) -> "ServiceParams":
        if self.dead_after_s < 2 * self.heartbeat_s:
            raise ValueError(f"dead_after_s must be at least 2 x heartbeat_s ({2 * self.heartbeat_s}), "
                             f"or a live job could be failed (got {self.dead_after_s})")
        return self


class KaitoParams(_Section):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    namespace: str = Field(min_length=1)
    instance_type: str = Field(min_length=1)
    preset: str = Field(min_length=1)
    input_urls: list[str]
    input_image: str | None = None
    input_volume_claim: str | None = None
    output_image: str | None = None
    output_push_secret: str | None = None
    output_volume_claim: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "KaitoParams":
        given = [k for k in ("input_urls", "input_image", "input_volume_claim") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of input_urls, input_image, input_volume_claim (Kaito takes one "
                             f"tuning input; got {given or 'none'})")
        given = [k for k in ("output_image", "output_volume_claim") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(f"set exactly one of output_image, output_volume_claim (got {given or 'none'})")
        return self


class AzureMLParams(_Section):
    compute: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    instance_type: str | None = None
    finetuning_model: str = Field(min_length=1)


class PlatformsParams(_Section):
    out_dir: str = Field(min_length=1)
    image: str = Field(min_length=1)
    job_variables: dict[str, Any]
    kaito: KaitoParams
    azureml: AzureMLParams


class ServeParams(_Section):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    model: str | None = None
    auth: bool = False
    max_concurrent: int = Field(ge=1)
    max_queue: int = Field(ge=0)
    max_batch: int = Field(ge=1)
    max_batch_tokens: int = Field(ge=1)
    prefix_cache: int = Field(ge=0)
    prefix_min_tokens: int = Field(ge=1)
    prefix_window: int = Field(ge=1)
    max_input_tokens: int = Field(ge=1)
    max_tokens: int = Field(ge=1)
    default_max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0, le=2)
    max_classify_inputs: int = Field(ge=1)
    max_prompts: int = Field(ge=1)
    grammar_cache: int = Field(ge=0)
    max_loaded_models: int = Field(ge=1)
    threads: int = Field(ge=0)
    max_request_mb: float = Field(gt=0)
    stall_s: float = Field(gt=0)
    shutdown_s: float = Field(gt=0)

    @model_validator(mode="after")
    def _default_within_cap(self) -> "ServeParams":
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must be <= max_tokens ({self.max_tokens})")
        return self


class Params(_Section):
    paths: PathsParams
    model: ModelParams
    data: DataParams
    ingest: IngestParams
    validate_: ValidateParams = Field(alias="validate")
    select: SelectParams
    train: TrainParams
    evaluate: EvaluateParams
    optimize: OptimizeParams
    register_: RegisterParams = Field(alias="register")
    tracking: TrackingParams
    orchestrate: OrchestrateParams
    service: ServiceParams
    platforms: PlatformsParams
    serve: ServeParams

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Config:
    """Validated params plus the project root that relative paths resolve against."""

    def __init__(self, params: Params, root: Path, raw: dict[str, Any], source: str = "params.yaml"):
        self.params = params
        self.root = root.resolve()
        self.raw = raw
        self.source = source

    # Sections, by the names used in params.yaml.
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "params":    # not set yet (unpickling): never a section
            raise AttributeError(name)
        if name in ("validate", "register"):  # pydantic reserves these names
            name += "_"
        return getattr(self.params, name)

    def path(self, key: str) -> Path:
        """Absolute path for ``paths.<key>``: the one place paths are resolved. The state dir of a
        ``dvc exp run --temp|--queue`` (run in a copy under .dvc/tmp/exps) is the project's own, so
        its MLflow runs and registered versions land in the project's store."""
        value = getattr(self.params.paths, key)
        exp_root = os.environ.get("DVC_ROOT")
        if key == "state_dir" and exp_root and not Path(value).is_absolute() \
                and self.root.is_relative_to(Path(exp_root).resolve() / ".dvc" / "tmp" / "exps"):
            return (Path(exp_root) / value).resolve()
        return (self.root / value).resolve()

    @property
    def state_dir(self) -> Path:
        return self.path("state_dir")

    def section(self, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.raw[name])

    def sections_hash(self, names: list[str] | tuple[str, ...] | None = None) -> str:
        """Stable hash of the given params sections (all when None)."""
        data = self.raw if names is None else {n: self.raw[n] for n in names}
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def view(self, stage: str, declared: tuple[str, ...]) -> "ConfigView":
        """This config as ``stage`` may read it: only the ``declared`` params (sections and dotted
        keys, its ``StageSpec.params``) plus the shared plumbing (``SHARED``); see ``ConfigView``."""
        return ConfigView(self, stage, declared)


# -- per-stage views -----------------------------------------------------------------------------
# Params every stage may read without declaring them: ``paths`` is how a stage's deps and outs are
# named and resolved (``cfg.path(KEY)``, ``cfg.state_dir``); its deps/outs are declared in the
# StageSpec's ``deps``/``outs``, not under ``params``.
SHARED = ("paths",)


class UndeclaredParam(LookupError):
    """A stage read a params key its ``StageSpec.params`` (tuneops/stages.py) and dvc.yaml do not
    declare: a bug in the stage or in its declaration (so a ``dvc repro`` would not rerun the stage
    when that value changes). Not a ``TuneopsError``: it keeps its traceback; not an
    ``AttributeError``: ``getattr(cfg, KEY, default)`` cannot hide it."""


def _covered(key: str, declared: tuple[str, ...]) -> bool:
    """``key`` (dotted) is declared, or lies inside a declared section / dotted key."""
    return any(key == d or key.startswith(d + ".") for d in declared)


def _partly(key: str, declared: tuple[str, ...]) -> bool:
    """Some declared dotted key lies inside ``key`` (``model`` for ``model.max_seq_len``)."""
    return any(d.startswith(key + ".") for d in declared)


class _Restricted:
    """A params section (a pydantic model) not declared whole: reading a declared key gives its real
    value (typed, as in ``Config``), reading any other value raises ``UndeclaredParam`` naming it
    (``evaluate.max_new_tokens``, not just ``evaluate``)."""

    __slots__ = ("_obj", "_prefix", "_view")

    def __init__(self, obj: BaseModel, prefix: str, view: "ConfigView"):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_view", view)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        obj, prefix, view = self._obj, self._prefix, self._view
        if name not in type(obj).model_fields:
            if not hasattr(type(obj), name):      # a typo: what the section itself would say
                return getattr(obj, name)
            # a method or property of the section (model_dump, resolved_format): it reads the whole
            # section, which is only partly declared
            view._refuse(prefix.rstrip(".") or "the whole params", f" (via .{name})")
        key = prefix + name if prefix else name.rstrip("_")    # validate_ / register_: pydantic's names
        value = getattr(obj, name)
        if _covered(key, view.declared + SHARED):
            return value
        if isinstance(value, BaseModel):      # partly declared, or not at all: the error names the key read
            return _Restricted(value, key + ".", view)
        view._refuse(key)

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError("params are read-only")

    def __reduce__(self) -> tuple[Any, ...]:
        return _Restricted, (self._obj, self._prefix, self._view)

    def __repr__(self) -> str:
        return f"<{self._prefix.rstrip('.') or 'params'} as {self._view.stage} may read it>"


class ConfigView(Config):
    """A ``Config`` restricted to the params one stage declares (``StageSpec.params``: sections such
    as ``train`` and dotted keys such as ``model.max_seq_len``) plus ``SHARED`` (``paths``). Every
    runner hands a stage its view (``StageSpec.load``: the CLI and so ``dvc repro``, the Prefect
    flow and so the jobs API, the training ranks), so reading anything else fails at once, naming
    the stage, the key and its declaration: the params dvc.yaml lists for a stage are what it reads.

    Typed access works as on ``Config`` (``cfg.train.learning_rate``, ``cfg.model.max_seq_len``; a
    partly declared section gives only its declared keys), as do ``path()``, ``state_dir``,
    ``root`` and ``source``; ``section(NAME)`` needs NAME declared whole.

    Provenance is not a read: ``raw`` (the whole params, e.g. logged as a registered version's
    ``params.json`` and handed to the training ranks, which view it again) and ``sections_hash()``
    (the params hash in lineage tags, run identity keys) record which params a result came from.
    They never feed a value into the stage's computation."""

    def __init__(self, cfg: Config, stage: str, declared: tuple[str, ...]):
        base = cfg._base if isinstance(cfg, ConfigView) else cfg
        if isinstance(cfg, ConfigView):            # a view of a view never reads more than the first
            for key in declared:
                if not _covered(key, cfg.declared + SHARED):
                    cfg._refuse(key)
        super().__init__(base.params, base.root, base.raw, base.source)
        self._base, self.stage, self.declared = base, stage, tuple(declared)
        self.params = _Restricted(base.params, "", self)    # type: ignore[assignment]

    def _refuse(self, key: str, how: str = "") -> None:
        raise UndeclaredParam(f"{self.stage} reads {key}{how} but declares only {', '.join(self.declared)} "
                              f"(tuneops/stages.py)")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name in ("stage", "declared"):
            raise AttributeError(name)      # not set yet (unpickling): never a params section
        return super().__getattr__(name)

    def path(self, key: str) -> Path:
        return self._base.path(key)

    def section(self, name: str) -> dict[str, Any]:
        if not _covered(name, self.declared + SHARED):
            self._refuse(name, " (the whole section)" if _partly(name, self.declared) else "")
        return super().section(name)

    def view(self, stage: str, declared: tuple[str, ...]) -> "ConfigView":
        return ConfigView(self, stage, declared)

    def __repr__(self) -> str:
        return f"<params {self.source} as {self.stage} reads them: {', '.join(self.declared)}>"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.max_steps=10")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML), like ``dvc exp run -S``."""
    data = copy.deepcopy(raw)
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item!r}: unknown key {'.'.join(parts[: i + 1])}")
            node = nxt
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"--set {item!r}: unknown key {'.'.join(parts)}")
        node[parts[-1]] = value
    return data


def _format_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p != "__root__")
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        got = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
        if e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{source}: {loc}: {msg}{shown}" if loc else f"{source}: {msg}{shown}")
    return "\n".join(lines)


def scenario_floor(raw: dict[str, Any]) -> dict[str, Any]:
    """``model.max_seq_len`` raised to the token budget the bundled scenario's rows need
    (``Scenario.min_seq_len``, e.g. ``tools``: the tool declarations are in every prompt); never lowered."""
    from .data.scenarios import REGISTRY

    data, model = raw.get("data"), raw.get("model")
    if not isinstance(data, dict) or not isinstance(model, dict):
        return raw
    sc = REGISTRY.get(data.get("scenario")) if isinstance(data.get("scenario"), str) else None
    have = model.get("max_seq_len")
    if sc is None or not sc.min_seq_len or not isinstance(have, int) or isinstance(have, bool) \
            or have >= sc.min_seq_len:
        return raw
    raw = copy.deepcopy(raw)
    raw["model"]["max_seq_len"] = sc.min_seq_len
    return raw


def load_config(params_file: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (),
                root: str | Path | None = None) -> Config:
    """Read, override and validate params; raise ``ConfigError`` with one line per problem."""
    path = Path(params_file)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    raw = scenario_floor(apply_overrides(raw, overrides))
    try:
        params = Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(str(path), err)) from None
    return Config(params, Path(root) if root is not None else path.resolve().parent, raw, source=str(path))
