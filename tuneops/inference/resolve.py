"""Resolution: a model reference -> the files of one model to load (``ModelFiles``; ``load()``
gives the engine that runs it).

A reference is a registered version or alias (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``models:/NAME/latest``; read in place from a local artifact store, downloaded otherwise; a job's
model is its registered version), or a folder: an optimize output (``metrics.json``: its default
ONNX variant), a variant folder or ``model.onnx`` (a tokenizer beside it or one level up), an
exported classifier (``labels.json``), or a registered model folder (``MLmodel``: its default
variant, laid out as ``tuneops.inference.layout`` says, or its task head), or an adapter exported
unmerged (``adapter.json``: served over the shared base graph it names, ``files_of_adapter``).

A registered version that carries an unmerged adapter (``layout.ADAPTER``, gated) is served as that
adapter over its shared base graph when the graph is on this machine (N fine-tunes of one base: one
base in memory, ``pool.BaseGraphs``), else as its default merged variant; ``variant="adapter"``
(``layout.UNMERGED``) asks for the adapter and nothing else.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidInput
from . import layout
from .engine import ChatEngine, Classifier


class ServeError(InvalidInput):
    """A model reference that cannot be served (names the reference and what is missing)."""


URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


@dataclass
class ModelFiles:
    id: str                       # the model id clients send
    kind: str                     # chat | classify
    onnx_path: Path | None = None
    tokenizer_dir: Path | None = None
    pyfunc_dir: Path | None = None
    task_head: str = ""
    extra_dirs: tuple[Any, ...] = field(default_factory=tuple)
    version: str | None = None    # the registered version number (None for an exported folder)
    adapter_dir: Path | None = None   # an adapter served unmerged over the base graph ``onnx_path``

    def load(self, threads: int = 0, bases: Any = None, **batching: int) -> Any:
        """The engine; ``bases`` (``tuneops.inference.pool.BaseGraphs``): where an adapter finds its base
        graph's session already loaded (one per base graph, shared by every adapter over it); ``batching``: a
        chat engine's ``max_batch`` / ``max_batch_tokens``."""
        if self.kind == "chat" and self.adapter_dir is not None:
            from .runtimes import OnnxCausalLM

            base = bases.get(self.onnx_path, threads) if bases is not None else OnnxCausalLM(self.onnx_path, threads)
            return ChatEngine(self.onnx_path, self.tokenizer_dir, self.extra_dirs, threads,
                              lm=base.with_adapter(self.adapter_dir), **batching)
        if self.kind == "chat":
            return ChatEngine(self.onnx_path, self.tokenizer_dir, self.extra_dirs, threads, **batching)
        if self.pyfunc_dir is not None:
            return Classifier(pyfunc_dir=self.pyfunc_dir, task_head=self.task_head)
        return Classifier(onnx_path=self.onnx_path, task_head=self.task_head)


def registered_dir(uri: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """The local folder of a registered model version (read in place when the artifact store is
    local) and its version number."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    m = URI.match(uri)
    if not m:
        raise ServeError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        elif m["version"] == "latest":
            mv = max(client.search_model_versions(f"name='{m['name']}'"), key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(m["name"], m["version"])
        location = client.get_model_version_download_uri(m["name"], mv.version)
    except (MlflowException, ValueError) as exc:
        raise ServeError(f"{uri}: no such registered model version ({str(exc).splitlines()[0]})") from None
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse

        location = unquote(urlparse(location).path)
    local = Path(location)
    if not (local / "MLmodel").is_file():
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{m['name']}/{mv.version}",
                                                         tracking_uri=tracking_uri))
    return local, str(mv.version)


def files_of_registered(folder: Path, model_id: str, variant: str | None = None) -> ModelFiles:
    """What to run from a registered pyfunc folder: its default ONNX variant (or ``variant``) +
    tokenizer, or its head."""
    import yaml

    meta = yaml.safe_load((folder / "MLmodel").read_text())
    flavor = meta.get("flavors", {}).get("python_function", {})
    config = flavor.get("config") or flavor.get("model_config") or {}     # MLmodel writes model_config as config
    arts = {k: folder / (v["path"] if isinstance(v, dict) else v) for k, v in (flavor.get("artifacts") or {}).items()}
    if config.get("task_head"):
        return ModelFiles(model_id, "classify", pyfunc_dir=folder, task_head=str(config["task_head"]))
    if layout.ADAPTER in arts and variant in (None, layout.UNMERGED):
        unmerged = _registered_adapter(folder, arts, model_id, required=variant is not None)
        if unmerged is not None:
            return unmerged
    elif variant == layout.UNMERGED:
        raise ServeError(f"{folder}: no adapter exported unmerged (optimize.adapter_base) among its artifacts "
                         f"{sorted(arts)}")
    variant = variant or config.get("variant", "fp32")
    onnx, tok = layout.onnx_file(arts, variant), layout.tokenizer_dir(arts)
    if onnx is None or tok is None:
        raise ServeError(f"{folder}: no ONNX variant {variant!r} or tokenizer among its artifacts {sorted(arts)}")
    return ModelFiles(model_id, "chat", onnx, tok)


def _registered_adapter(folder: Path, arts: dict[str, Path], model_id: str, required: bool) -> ModelFiles | None:
    """A version's unmerged adapter over its base graph; None (serve a merged variant) when that graph is
    not on this machine, unless ``required``."""
    import logging

    try:
        files = files_of_adapter(arts[layout.ADAPTER], model_id)
    except ServeError as exc:
        if required:
            raise
        logging.getLogger(__name__).info("%s: its merged variant is served (%s)", folder, exc)
        return None
    tok = layout.tokenizer_dir(arts)
    if tok is not None:
        files.tokenizer_dir = tok
    return files


def files_of_adapter(folder: Path, model_id: str, base: Path | None = None) -> ModelFiles:
    """An exported adapter folder (``adapter.json``) over its base graph: ``base`` or the path it was
    exported against; the base is checked when the engine loads (``BaseMismatch`` names both)."""
    import json

    info = json.loads((folder / "adapter.json").read_text())
    base = Path(base or info.get("base_path") or "")
    if not base.is_file():
        b = info["base"]
        raise ServeError(f"{folder}: its base graph ({b.get('model')} {b['quant']}, md5 {b['md5']}) is not at "
                         f"{base}; export it with the optimize stage (optimize.adapter_base) on this machine")
    return ModelFiles(model_id, "chat", base, base.parent, adapter_dir=folder)


def resolve(ref: str, tracking_uri: str | None = None, fallback_tokenizer: Path | None = None,
            model_id: str | None = None, variant: str | None = None) -> ModelFiles:
    """A model reference -> the files to load (see the module docstring); ``variant``: that ONNX
    variant instead of the default one."""
    import json

    if ref.startswith("models:/"):
        folder, version = registered_dir(ref, tracking_uri)
        files = files_of_registered(folder, model_id or URI.match(ref)["name"], variant)
        files.version = version
        return files
    path = Path(ref).expanduser().resolve()
    name = model_id or path.name
    if (path / "adapter.json").is_file():           # an adapter exported unmerged: over its base graph
        return files_of_adapter(path, name)
    if (path / "MLmodel").is_file():
        return files_of_registered(path, name, variant)
    if (path / "metrics.json").is_file() and not (path / "model.onnx").is_file():     # an optimize output
        m = json.loads((path / "metrics.json").read_text())
        variant = variant or m.get("default_variant")
        if not variant:
            raise ServeError(f"{path}: every ONNX variant was rejected by its gate; serve one variant's folder")
        if variant not in m["variants"]:
            raise ServeError(f"{path}: no ONNX variant {variant!r}; built: {sorted(m['variants'])}")
        path = path / m["variants"][variant]["path"]
        path = path.parent if path.name == "model.onnx" else path
    elif variant and (path / variant).is_dir():
        path = path / variant
    onnx = path / "model.onnx" if path.is_dir() else path
    if not onnx.is_file():
        raise ServeError(f"{ref}: no model.onnx, MLmodel or optimize metrics.json there")
    if (onnx.parent / "labels.json").is_file():
        return ModelFiles(name, "classify", onnx_path=onnx)
    tok = next((d for d in (onnx.parent, onnx.parent.parent, fallback_tokenizer)
                if d is not None and (Path(d) / "tokenizer_config.json").is_file()), None)
    if tok is None:
        raise ServeError(f"{ref}: no tokenizer next to the ONNX model (tokenizer_config.json)")
    return ModelFiles(name, "chat", onnx, Path(tok), (fallback_tokenizer,))
