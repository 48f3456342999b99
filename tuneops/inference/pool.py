"""Loaded models, shared by the requests of a server (``tuneops serve`` holds one, the jobs API
each token's fine-tuned models)."""
from __future__ import annotations

import threading
from typing import Any


def batching(serve: Any) -> dict[str, int]:
    """A chat engine's continuous-batching settings from ``serve`` (``ServeParams``)."""
    return {"max_batch": serve.max_batch, "max_batch_tokens": serve.max_batch_tokens,
            "prefix_cache": serve.prefix_cache, "prefix_min_tokens": serve.prefix_min_tokens,
            "prefix_window": serve.prefix_window}


class BaseGraphs:
    """One ONNX Runtime session per base graph (by its ``base.json`` md5), shared by every adapter
    served over it (``OnnxCausalLM.with_adapter``): N fine-tunes of one base hold one base in memory."""

    def __init__(self) -> None:
        self._lms: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, path: Any, threads: int = 0) -> Any:
        from tuneops.export.basequant import read_base

        from .runtimes import OnnxCausalLM

        key = read_base(path)["md5"]
        with self._lock:
            if key not in self._lms:
                self._lms[key] = OnnxCausalLM(path, threads)
            return self._lms[key]

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._lms)


SHARED_BASES = BaseGraphs()     # the process's base graphs for engines built outside a pool (the MLflow pyfunc)


class ModelPool:
    """Loaded models by key, least-recently-used evicted beyond ``limit``; each loads once even
    when requests for it arrive together."""

    def __init__(self, limit: int, threads: int = 0, batching: dict[str, int] | None = None):
        from collections import OrderedDict

        self.limit, self.threads = limit, threads
        self.batching = dict(batching or {})       # a chat engine's max_batch / max_batch_tokens
        self._models: "OrderedDict[str, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.bases = BaseGraphs()        # adapters' shared base graphs (not counted in ``limit``)

    def get(self, key: str, files: Any) -> Any:
        """``files``: a ModelFiles or a zero-argument callable returning one (called only to load)."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                if key in self._models:
                    self._models.move_to_end(key)
                    return self._models[key]
            spec = files() if callable(files) else files
            model = spec.load(self.threads, self.bases, **self.batching) if getattr(spec, "adapter_dir", None) \
                else spec.load(self.threads, **self.batching)
            model.id = spec.id
            with self._lock:
                self._models[key] = model
                while len(self._models) > self.limit:
                    self._models.popitem(last=False)
                self._loading.pop(key, None)
            return model

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)
