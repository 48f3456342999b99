"""The registered chat model's artifact layout, in one place: what register writes, and what the
pyfunc, the resolver and the promotion gate read.

Every ONNX variant the optimize stage built travels as the artifact ``onnx_<variant>`` (a folder
holding ``model.onnx``, plus its ``.data`` if any), beside the tokenizer (``tokenizer``); the model
config's ``variant`` names the one to run (optimize's ``default_variant``). An adapter exported unmerged
travels as ``unmerged_adapter`` (``adapter.onnx_adapter`` + ``adapter.json``, which names the shared base
graph it needs; that graph is not copied into the version).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

PREFIX = "onnx_"              # artifact key of an ONNX variant: PREFIX + variant name
TOKENIZER = "tokenizer"       # artifact key of the tokenizer folder
MODEL_FILE = "model.onnx"     # the graph inside a variant's folder
ADAPTER = "unmerged_adapter"  # artifact key of the ONNX Runtime adapter exported unmerged (tuneops/export/adapters.py)
UNMERGED = "adapter"          # the variant name that asks for that adapter over its shared base graph


def artifact_key(variant: str) -> str:
    """The artifact key of an ONNX variant (``fp32`` -> ``onnx_fp32``)."""
    return f"{PREFIX}{variant}"


def variant_of(key: str) -> str | None:
    """The ONNX variant an artifact key holds (``onnx_int8`` -> ``int8``), None for another artifact."""
    return key[len(PREFIX):] if key.startswith(PREFIX) and len(key) > len(PREFIX) else None


def variant_artifacts(folders: Mapping[str, Any]) -> dict[str, str]:
    """The artifacts of variant folders: ``{variant: folder}`` -> ``{artifact key: folder}``."""
    return {artifact_key(name): str(folder) for name, folder in folders.items()}


def onnx_file(artifacts: Mapping[str, Any], variant: str) -> Path | None:
    """``model.onnx`` of ``variant`` among (local) artifacts, None if that variant is not there."""
    key = artifact_key(variant)
    return Path(artifacts[key]) / MODEL_FILE if key in artifacts else None


def tokenizer_dir(artifacts: Mapping[str, Any]) -> Path | None:
    return Path(artifacts[TOKENIZER]) if TOKENIZER in artifacts else None
