"""Request bodies of the jobs API as pydantic models: every malformed body is a 400 in
OpenAI's error shape whose ``param`` names the field (``hyperparameters.n_epochs``,
``method.supervised.hyperparameters.batch_size``, ``suffix``), never a 500.

Non-finite numbers (``NaN``/``Infinity`` literals, ``1e400`` which overflows to infinity)
fail the finiteness check of the field they are in, which the error names. Names are checked with
full matches (``re.fullmatch``: ``"x\\n"`` is not a valid suffix).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,40}")
MAX_JSON_BYTES = 1 << 20          # a job request is a few hundred bytes; anything over 1 MiB is refused (413)


class BadRequest(ValueError):
    """A malformed request: ``param`` names the field (dotted), ``code`` the OpenAI-style code."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or ``BadRequest``."""
    try:
        # NaN / Infinity literals (not JSON, but Python's json reads them) become floats here so the
        # field they are in refuses them by name (every numeric field requires a finite number)
        body = json.loads(raw.decode("utf-8"), parse_constant=float)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8 JSON", None, "invalid_json") from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {str(exc)[:200]}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object (got {type(body).__name__})", None, "invalid_json")
    return body


def _number(value: Any, kind: type) -> Any:
    """'auto' / null, or a finite number of ``kind`` (an int may be written 3.0)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected 'auto' or a number (got {type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number (got {value!r})")
    if kind is int and int(value) != value:
        raise ValueError(f"expected an integer (got {value!r})")
    return kind(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Hyperparameters(_Strict):
    n_epochs: Any = None
    batch_size: Any = None
    learning_rate_multiplier: Any = None

    @field_validator("n_epochs", "batch_size")
    @classmethod
    def _int(cls, v: Any) -> Any:
        return _number(v, int)

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _float(cls, v: Any) -> Any:
        return _number(v, float)

    def given(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Any = None

    @field_validator("beta")
    @classmethod
    def _beta(cls, v: Any) -> Any:
        v = _number(v, float)
        if v is not None and not v > 0:
            raise ValueError(f"expected 'auto' or a number > 0 (got {v!r})")
        return v


class Dpo(_Strict):
    hyperparameters: DpoHyperparameters | None = None


# OpenAI's method.type -> the objective it trains (tuneops/training/objectives.py)
METHOD_OBJECTIVES = {"supervised": "sft", "dpo": "dpo"}


class Method(_Strict):
    type: Any = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: Any = None           # OpenAI's; refused by type (method.type), not as an unknown key

    @field_validator("type")
    @classmethod
    def _type(cls, v: Any) -> Any:
        if v not in METHOD_OBJECTIVES:
            raise ValueError(f"{v!r} is not supported here; supported: {', '.join(METHOD_OBJECTIVES)}"
                             + (" (reinforcement fine-tuning is not offered yet)" if v == "reinforcement" else ""))
        return v


def _string(v: Any, what: str = "a string") -> Any:
    if v is not None and not isinstance(v, str):
        raise ValueError(f"expected {what} (got {type(v).__name__})")
    return v


class JobCreate(_Strict):
    model: Any = None
    training_file: Any = None
    validation_file: Any = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: Any = None
    seed: Any = None
    metadata: Any = None
    integrations: Any = None

    @field_validator("model", "training_file", "validation_file")
    @classmethod
    def _str(cls, v: Any) -> Any:
        return _string(v)

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or not SUFFIX.fullmatch(v)):
            raise ValueError("1-40 characters of A-Z a-z 0-9 _ -")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: Any) -> Any:
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31):
            raise ValueError(f"expected an integer in [0, 2^31) (got {v!r})")
        return v

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, dict) or len(v) > 16 or any(
                not isinstance(k, str) or not isinstance(x, str) or len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("at most 16 string pairs (keys <= 64, values <= 512 characters)")
        return v

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, list):
            raise ValueError("expected a list")
        return v

    def all_hyperparameters(self) -> dict[str, Any]:
        """``hyperparameters`` merged with ``method.supervised.hyperparameters`` or
        ``method.dpo.hyperparameters`` (which win)."""
        hp = self.hyperparameters.given() if self.hyperparameters else {}
        if self.method and self.method.supervised and self.method.supervised.hyperparameters:
            hp.update(self.method.supervised.hyperparameters.given())
        if self.method and self.method.dpo and self.method.dpo.hyperparameters:
            hp.update(self.method.dpo.hyperparameters.given())
        return hp

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"


PARAM_CODES = {"suffix": "invalid_suffix", "seed": "invalid_seed", "metadata": "invalid_metadata"}


def job_request(body: dict[str, Any]) -> JobCreate:
    """The validated job request, or ``BadRequest`` naming the first bad field."""
    try:
        return JobCreate.model_validate(body)
    except ValidationError as err:
        e = err.errors()[0]
        param = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            raise BadRequest(f"unknown parameter {param!r}", param, "unknown_parameter") from None
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            msg = f"expected an object (got {type(e.get('input')).__name__})"
        top = param.split(".")[0]
        code = PARAM_CODES.get(top, "invalid_hyperparameters" if "hyperparameters" in param else "invalid_request")
        raise BadRequest(f"{param}: {msg}", param, code) from None
