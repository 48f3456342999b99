"""Model shape from a Hugging Face ``config.json``, read without loading any weights.

Parameter count (decoder, llama-style; every term is per layer unless noted)::

    embeddings        V*h                          (once)
    attention         h*q + 2*h*kv + q*h           q = heads*head_dim, kv = kv_heads*head_dim
    qkv bias          q + 2*kv                     (qwen2, or attention_bias: true)
    mlp               3*h*I  (gated: gate, up, down)
    norms             n_norms*h (+ 2*head_dim for q/k norms: gemma3, qwen3)
    final norm        h                            (once)
    lm_head           V*h, unless tie_word_embeddings (once)

Encoders (bert): word + position + token-type embeddings and their LayerNorm, per layer four
h*h attention projections and two FFN matrices, all with biases, two LayerNorms (weight+bias),
and the h*h pooler.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import Family, for_model_type

_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a transformer; ``modules`` maps each per-layer linear module name to (d_in, d_out)."""

    name: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    is_encoder: bool
    modules: dict[str, tuple[int, int]] = field(repr=False)
    layer_other_params: int = field(repr=False)   # biases + norms, per layer
    embedding_params: int = field(repr=False)     # token (+ position, type, LN) embeddings
    final_params: int = field(repr=False)         # final norm / pooler
    max_positions: int | None = None
    num_labels: int = 2
    norms_per_layer: int = 2                      # gemma2/3: 4 (pre/post attention and MLP)
    qk_norm: bool = False                         # RMSNorm on queries and keys (gemma3, qwen3)

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelSpec":
        """Read ``<dir>/config.json`` or a ``*.json`` file; the name is the folder (or file stem)."""
        p = Path(path)
        cfg_file = p / "config.json" if p.is_dir() else p
        if not cfg_file.is_file():
            raise ValueError(f"model config not found: {cfg_file}")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        name = cfg_file.parent.name if cfg_file.name == "config.json" else cfg_file.stem
        return cls.from_dict(cfg, name=name)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], name: str = "model") -> "ModelSpec":
        """Build from a config dict; multimodal configs (Gemma 3) keep the LM in ``text_config``."""
        if isinstance(cfg.get("text_config"), dict):
            cfg = {"model_type": cfg.get("model_type", ""), **cfg["text_config"],
                   "tie_word_embeddings": cfg["text_config"].get(
                       "tie_word_embeddings", cfg.get("tie_word_embeddings", True))}
        missing = [k for k in _REQUIRED if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
        if missing:
            raise ValueError(f"model config {name}: missing or invalid {', '.join(missing)}")
        mtype = str(cfg.get("model_type", "llama"))
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or h // heads
        kv_heads = cfg.get("num_key_value_heads") or heads
        labels = len(cfg.get("id2label") or {}) or int(cfg.get("num_labels", 2))
        common = dict(name=name, model_type=mtype, layers=cfg["num_hidden_layers"], hidden=h,
                      intermediate=cfg["intermediate_size"], heads=heads, kv_heads=kv_heads,
                      head_dim=head_dim, vocab=cfg["vocab_size"], num_labels=labels)
        if for_model_type(mtype).encoder:
            return cls(**common, **_encoder_shape(cfg), is_encoder=True, tied_embeddings=True,
                       max_positions=cfg.get("max_position_embeddings"))
        return cls(**common, **_decoder_shape(cfg, mtype, head_dim, kv_heads), is_encoder=False,
                   tied_embeddings=bool(cfg.get("tie_word_embeddings", False)))

    @property
    def linear_params(self) -> int:
        """Weights of the per-layer linear modules: what 4-bit quantization applies to."""
        return self.layers * sum(i * o for i, o in self.modules.values())

    @property
    def lm_head_params(self) -> int:
        """An untied decoder output projection (V*h); 0 for tied or encoder models."""
        return 0 if self.tied_embeddings or self.is_encoder else self.vocab * self.hidden

    @property
    def params(self) -> int:
        """Total parameter count Ψ."""
        return (self.embedding_params + self.linear_params + self.layers * self.layer_other_params
                + self.final_params + self.lm_head_params)

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer layer."""
        return sum(i * o for i, o in self.modules.values()) + self.layer_other_params

    @property
    def family(self) -> Family:
        """The model-family spec (``tuneops/families.py``) this config belongs to."""
        return for_model_type(self.model_type)

    def resolve_targets(self, wanted: Any, strict: bool = True) -> list[str]:
        """``auto``, ``all-linear`` or llama-style target names (q_proj, ...) mapped to this model's
        module names through its family spec, deduplicated; a name the model lacks raises
        ``ValueError`` (or is skipped when not ``strict``)."""
        return self.family.resolve_targets(wanted, list(self.modules), strict=strict, model=self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model_type": self.model_type, "params": self.params,
                "layers": self.layers, "hidden": self.hidden, "vocab": self.vocab,
                "heads": self.heads, "kv_heads": self.kv_heads, "intermediate": self.intermediate}


def _decoder_shape(cfg: dict[str, Any], mtype: str, head_dim: int, kv_heads: int) -> dict[str, Any]:
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    q, kv = heads * head_dim, kv_heads * head_dim
    fam = for_model_type(mtype)
    modules = fam.modules(h, inter, q, kv)
    bias = q + 2 * kv if cfg.get("attention_bias", fam.qkv_bias) else 0
    norms, qk_norm = fam.norms_per_layer, fam.qk_norm
    return {"modules": modules, "layer_other_params": bias + norms * h + (2 * head_dim if qk_norm else 0),
            "embedding_params": cfg["vocab_size"] * h, "final_params": h, "norms_per_layer": norms,
            "qk_norm": qk_norm}


def _encoder_shape(cfg: dict[str, Any]) -> dict[str, Any]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    modules = {"query": (h, h), "key": (h, h), "value": (h, h), "attention.output.dense": (h, h),
               "intermediate.dense": (h, inter), "output.dense": (inter, h)}
    biases = 4 * h + inter + h
    layer_norms = 2 * 2 * h
    positions = cfg.get("max_position_embeddings", 512) + cfg.get("type_vocab_size", 2)
    return {"modules": modules, "layer_other_params": biases + layer_norms,
            "embedding_params": (cfg["vocab_size"] + positions) * h + 2 * h,
            "final_params": h * h + h}
