"""What runs a model, one call at a time, for ``tuneops.inference.decode`` (the decode loop) and
the scorers: the causal LM as an ONNX Runtime graph (CPU execution provider) or a PyTorch model,
both with the same ``step`` contract, and the ONNX sequence classifier.

A causal-LM runtime has ``has_cache``, ``empty_cache(batch)`` and
``step(input_ids, attention_mask, cache, last=False) -> (logits, cache)``: ``attention_mask``
covers the past and the new tokens (0 = left padding), positions are ``cumsum(mask) - 1`` (so a
left-padded row has the positions it would have alone), ``logits`` is a numpy array
``[batch, new tokens (1 with last=True), vocab]``.

The ONNX causal-LM graph (``tasks/optimize.py``) takes ``input_ids``, ``attention_mask``
(past + new tokens), ``position_ids`` and ``past_key_values.{i}.key|value``
``[batch, kv_heads, past, head_dim]``; it returns ``logits`` and ``present.{i}.key|value``
(past + new). A graph from onnxruntime-genai's model builder (a folder with ``model.onnx`` and
``genai_config.json``) has the same names but no ``position_ids``: it takes positions from the
mask, right-padded only (``left_padding`` is False). A fixed-shape graph (fpga/npu targets) has
only ``input_ids`` and ``attention_mask`` of one static shape and no cache; ``OnnxCausalLM`` pads
to it.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np


def positions(attention_mask: np.ndarray, new: int) -> np.ndarray:
    """Position ids of the last ``new`` tokens: ``cumsum(mask) - 1`` (0 on padding), as Hugging
    Face ``generate`` computes them, so a left-padded row has the positions it would have alone."""
    pos = np.cumsum(attention_mask, -1) - 1
    return np.where(attention_mask == 0, 0, pos)[:, -new:].astype(np.int64)


def session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    if not Path(path).is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxCausalLM:
    """``adapter``: an exported LoRA adapter folder (``tuneops.export.adapters``) served unmerged over
    this base graph, checked against it (``BaseMismatch`` naming both when it needs another base)
    and activated on every call; ``with_adapter`` gives another adapter over the same session."""

    def __init__(self, path: Path, threads: int = 0, adapter: Path | None = None):
        self.path = Path(path)
        self.session = session(self.path, threads)
        self.run_options: Any = None
        self.adapter: dict[str, Any] | None = None
        self._lora_params: dict[str, Any] | None = None
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        # each past input's present output (``step_into`` binds the two to one buffer)
        self.present_of = [n.replace("past_key_values.", "present.", 1) for n in self.past_names]
        self._bound = threading.local()          # step_into's IOBinding, per thread, while its buffers stay
        self.has_positions = "position_ids" in inputs
        shape = inputs["input_ids"].shape
        self.fixed_shape = tuple(shape) if all(isinstance(d, int) for d in shape) else None
        self.kv_shape: tuple[int, int] | None = None
        if self.past_names:
            s = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
            self.kv_shape = (int(s[1]), int(s[3]))
            self.kv_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        if adapter is not None:
            self._activate(Path(adapter))

    def _activate(self, adapter_dir: Path) -> None:
        import onnxruntime as ort

        from tuneops.export.basequant import ADAPTER_FILE, check_base

        self.adapter = {**check_base(adapter_dir, self.path), "dir": str(adapter_dir)}
        lora = ort.LoraAdapter()
        lora.Load(str(adapter_dir / ADAPTER_FILE))
        self.run_options = ort.RunOptions()
        self.run_options.add_active_adapter(lora)
        self._lora = lora                       # the run options refer to it: keep it alive
        # an IOBinding run (``step_into``) does not apply the run options' adapters: it binds them
        self._lora_params = ort.AdapterFormat.read_adapter(str(adapter_dir / ADAPTER_FILE)).get_parameters()

    def with_adapter(self, adapter_dir: Path) -> "OnnxCausalLM":
        """This base graph's session (shared, not loaded again) with another adapter active."""
        import copy

        other = copy.copy(self)
        other._activate(Path(adapter_dir))
        return other

    @property
    def has_cache(self) -> bool:
        return bool(self.past_names)

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        heads, dim = self.kv_shape or (0, 0)
        return {n: np.zeros((batch, heads, 0, dim), self.kv_dtype) for n in self.past_names}

    @property
    def left_padding(self) -> bool:
        """Whether a left-padded batch decodes like its rows alone (the graph takes positions)."""
        return self.has_positions

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, cache: dict[str, np.ndarray],
             last: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One call: logits for ``input_ids`` given the cache (only the last position's with
        ``last``), and the grown cache."""
        mask = np.asarray(attention_mask, dtype=np.int64)
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64), "attention_mask": mask, **cache}
        if self.has_positions:
            feeds["position_ids"] = positions(mask, feeds["input_ids"].shape[1])
        out = self.session.run(None, feeds, self.run_options)
        return (out[0][:, -1:] if last else out[0]), dict(zip(self.past_names, out[1:]))

    @property
    def shares_buffer(self) -> bool:
        """Whether ``step_into`` serves this graph: one that takes positions from the mask (onnxruntime-genai's
        builder graphs), whose GroupQueryAttention writes each row's new key / value into the past
        it was given when present and past are one buffer."""
        return bool(self.past_names) and not self.has_positions and not self.fixed_shape \
            and set(self.present_of) <= set(self.present_names)

    def step_into(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                  cache: dict[str, np.ndarray]) -> np.ndarray:
        """One call whose cache is a buffer written in place: each ``cache`` array (C-contiguous,
        ``[batch, kv_heads, capacity, head_dim]`` with capacity >= the mask's width) is bound as
        both the past and the present, so GroupQueryAttention writes each row's new keys and values
        after that row's own past (the mask's row sums) and copies nothing else, as
        onnxruntime-genai does (``past_present_share_buffer``). The last position's logits."""
        arrays = [cache[n] for n in self.past_names]
        for name, a in zip(self.past_names, arrays):
            if not a.flags.c_contiguous or a.shape[2] < attention_mask.shape[1]:
                raise ValueError(f"step_into: {name} is not a contiguous buffer as wide as the mask")
        key = tuple((a.ctypes.data, a.shape) for a in arrays)
        held = getattr(self._bound, "io", None)      # the buffers bound last time in this thread
        if held is None or held[0] != key or held[1] is not self.session or held[4] is not self.adapter:
            io = self.session.io_binding()
            io.bind_output("logits")                 # first: ``get_outputs`` lists them in binding order
            for past, present, a in zip(self.past_names, self.present_of, arrays):
                io.bind_input(past, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
                io.bind_output(present, "cpu", 0, a.dtype, list(a.shape), a.ctypes.data)
            for name, value in (self._lora_params or {}).items():
                io.bind_ortvalue_input(name, value)
            self._bound.io = held = (key, self.session, io, arrays, self.adapter)   # arrays kept alive: their pointers
        io = held[2]
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        self.session.run_with_iobinding(io, self.run_options)
        return io.get_outputs()[0].numpy()[:, -1:]

    def __call__(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        """Full-sequence logits (no past): the ``forward`` contract of ``tuneops.inference.scoring.perplexity``."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if self.fixed_shape:
            return self._fixed(ids, mask)
        return self.step(ids, mask, self.empty_cache(ids.shape[0]))[0]

    def _fixed(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        batch, seq = self.fixed_shape
        if ids.shape[1] > seq:
            raise ValueError(f"{ids.shape[1]} tokens exceed the fixed sequence length {seq} of {self.path}")
        rows = []
        for i in range(0, ids.shape[0], batch):
            chunk_ids, chunk_mask = np.zeros((batch, seq), np.int64), np.zeros((batch, seq), np.int64)
            n = min(batch, ids.shape[0] - i)
            chunk_ids[:n, :ids.shape[1]], chunk_mask[:n, :ids.shape[1]] = ids[i:i + n], mask[i:i + n]
            logits = self.session.run(["logits"], {"input_ids": chunk_ids, "attention_mask": chunk_mask},
                                      self.run_options)[0]
            rows.append(logits[:n, :ids.shape[1]])
        return np.concatenate(rows, 0)


class TorchCausalLM:
    """A Hugging Face causal LM (or a peft model over one) behind the ``step`` contract, calling it
    as Hugging Face ``generate`` does: the model's own cache (created by the first call, the prefill),
    positions ``cumsum(mask) - 1``, an all-ones mask left out, only the last position's logits
    computed with ``last`` (``logits_to_keep=1``). The virtual tokens of prompt tuning (a peft
    prompt-learning model) are a prefix of every row: their embeddings go before the prompt's at
    the prefill, and the mask covers them afterwards."""

    has_cache = True
    left_padding = True

    def __init__(self, model: Any):
        import inspect

        self.model = model
        self.net = model
        self.virtual = 0
        config = getattr(model, "active_peft_config", None)
        if config is not None and getattr(config, "is_prompt_learning", False):
            if str(getattr(config.peft_type, "value", config.peft_type)) not in ("PROMPT_TUNING", "P_TUNING"):
                raise ValueError(f"generation with a {config.peft_type} adapter is not supported "
                                 f"(prompt tuning and p-tuning are)")
            self.virtual = int(config.num_virtual_tokens)
            self.net = model.get_base_model()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.keeps_logits = "logits_to_keep" in params
        self.device = next(model.parameters()).device

    def empty_cache(self, batch: int) -> None:
        return None            # the model makes its own (a DynamicCache) at the prefill, as generate does

    def step(self, input_ids: Any, attention_mask: Any, cache: Any, last: bool = False) -> tuple[np.ndarray, Any]:
        import torch

        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.device)
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long, device=self.device)
        kw: dict[str, Any] = {"input_ids": ids}
        if self.virtual:
            mask = torch.cat([torch.ones(mask.shape[0], self.virtual, dtype=mask.dtype, device=self.device), mask], 1)
            if cache is None:
                embeds = self.model.word_embeddings(ids)
                prompts = self.model.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)
                kw = {"inputs_embeds": torch.cat([prompts, embeds], 1)}
        new = ids.shape[1] + (self.virtual if "inputs_embeds" in kw else 0)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -new:]
        if self.keeps_logits:
            kw["logits_to_keep"] = 1 if last else 0
        with torch.inference_mode():
            out = self.net(attention_mask=None if bool(mask.all()) else mask, position_ids=pos, use_cache=True,
                           **{self.cache_arg: cache}, **kw)
        logits = out.logits[:, -1:] if last else out.logits
        return logits.float().cpu().numpy(), getattr(out, self.cache_arg)


def as_runtime(model: Any) -> Any:
    """``model`` if it is a runtime (it has ``step``), else a PyTorch causal LM as ``TorchCausalLM``."""
    return model if hasattr(model, "step") and hasattr(model, "empty_cache") else TorchCausalLM(model)


class OnnxClassifier:
    """``(input_ids, attention_mask) -> logits [batch, labels]`` with the label names."""

    def __init__(self, path: Path, labels: list[str] | None = None, threads: int = 0):
        self.session = session(Path(path), threads)
        self.labels = labels

    def __call__(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        feeds = {"input_ids": np.asarray(input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(attention_mask, dtype=np.int64)}
        return self.session.run(["logits"], feeds)[0]

    def predict(self, input_ids: Any, attention_mask: Any) -> list[dict[str, Any]]:
        logits = self(input_ids, attention_mask)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = []
        for row in probs:
            k = int(row.argmax())
            out.append({"label": self.labels[k] if self.labels else str(k), "score": float(row[k]),
                        "scores": {(self.labels[i] if self.labels else str(i)): float(v) for i, v in enumerate(row)}})
        return out
