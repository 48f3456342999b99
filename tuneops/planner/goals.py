"""Planning goals: the params.yaml ``select`` section, validated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..families import TARGET_PRESETS
from ..training.methods import METHODS as _METHOD_SPECS

METHODS = tuple(_METHOD_SPECS)      # the method specs (tuneops/training/methods.py), in their order
OFFLOAD = ("auto", "none", "optimizer", "optimizer+params")
MINIMIZE = ("memory", "cost", "time")
QUALITY = ("standard", "best")
_KEYS = ("method", "allowed_methods", "minimize", "quality", "global_batch_size",
         "max_micro_batch_size", "lora", "hardware", "memory_headroom", "zero_stage", "offload")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "auto"     # auto | all-linear | module names (tuneops/families.py)


@dataclass(frozen=True)
class Goals:
    """``method`` is "auto" or a forced method; ``hardware`` is handled by ``Hardware.from_params``."""

    method: str = "auto"
    allowed_methods: tuple[str, ...] = ("full", "lora", "qlora", "dora")
    minimize: str = "cost"
    quality: str = "standard"
    global_batch_size: int = 8
    max_micro_batch_size: int = 4
    lora: LoraSettings = field(default_factory=LoraSettings)
    memory_headroom: float = 0.9
    zero_stage: int | str = "auto"      # force a DeepSpeed ZeRO stage (0-3) instead of the lowest rung that fits
    offload: str = "auto"               # force offload: none | optimizer | optimizer+params

    def __post_init__(self) -> None:
        _one_of("method", self.method, ("auto",) + METHODS)
        if self.zero_stage != "auto" and (isinstance(self.zero_stage, bool) or self.zero_stage not in (0, 1, 2, 3)):
            raise ValueError(f"select.zero_stage: must be auto or 0, 1, 2, 3 (got {self.zero_stage!r})")
        _one_of("offload", self.offload, OFFLOAD)
        if self.offload == "optimizer+params" and self.zero_stage not in ("auto", 3):
            raise ValueError("select.offload: parameter offload needs select.zero_stage 3 (or auto)")
        if not self.allowed_methods:
            raise ValueError("select.allowed_methods: must not be empty")
        for m in self.allowed_methods:
            _one_of("allowed_methods", m, METHODS)
        if self.method != "auto" and self.method not in self.allowed_methods:
            raise ValueError(f"select.method: {self.method!r} is not in select.allowed_methods "
                             f"({', '.join(self.allowed_methods)})")
        _one_of("minimize", self.minimize, MINIMIZE)
        _one_of("quality", self.quality, QUALITY)
        _positive_int("global_batch_size", self.global_batch_size)
        _positive_int("max_micro_batch_size", self.max_micro_batch_size)
        _positive_int("lora.r", self.lora.r)
        if not (isinstance(self.lora.alpha, (int, float)) and self.lora.alpha > 0):
            raise ValueError(f"select.lora.alpha: must be > 0 (got {self.lora.alpha!r})")
        if not (isinstance(self.lora.dropout, (int, float)) and 0 <= self.lora.dropout < 1):
            raise ValueError(f"select.lora.dropout: must be in [0, 1) (got {self.lora.dropout!r})")
        tm = self.lora.target_modules
        if isinstance(tm, str):
            if tm not in TARGET_PRESETS:
                raise ValueError(f"select.lora.target_modules: must be {' or '.join(TARGET_PRESETS)} "
                                 f"or a list of module names (got {tm!r})")
        elif not tm or not all(isinstance(t, str) for t in tm):
            raise ValueError("select.lora.target_modules: must be a non-empty list of module names")
        if not (isinstance(self.memory_headroom, (int, float)) and 0 < self.memory_headroom <= 1):
            raise ValueError(f"select.memory_headroom: must be in (0, 1] (got {self.memory_headroom!r})")

    @classmethod
    def from_params(cls, select: dict[str, Any]) -> "Goals":
        """Build from the ``select`` section; missing keys take the defaults above."""
        unknown = set(select) - set(_KEYS)
        if unknown:
            raise ValueError(f"select.{sorted(unknown)[0]}: unknown key (known: {', '.join(_KEYS)})")
        kw = {k: v for k, v in select.items() if k not in ("hardware", "lora")}
        if "allowed_methods" in kw:
            if not isinstance(kw["allowed_methods"], (list, tuple)):
                raise ValueError("select.allowed_methods: must be a list of methods")
            kw["allowed_methods"] = tuple(kw["allowed_methods"])
        lora = select.get("lora") or {}
        if set(lora) - {"r", "alpha", "dropout", "target_modules"}:
            raise ValueError(f"select.lora.{sorted(set(lora) - {'r', 'alpha', 'dropout', 'target_modules'})[0]}: unknown key")
        if "target_modules" in lora:
            tm = lora["target_modules"]
            if not isinstance(tm, (list, tuple, str)):
                raise ValueError("select.lora.target_modules: must be auto, all-linear or a list of module names")
            lora = {**lora, "target_modules": tm if isinstance(tm, str) else tuple(tm)}
        return cls(**kw, lora=LoraSettings(**lora))


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"select.{key}: must be one of {', '.join(choices)} (got {value!r})")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"select.{key}: must be a positive integer (got {value!r})")
