"""``tuneops generate`` / ``tuneops classify``: run an ONNX variant with ONNX Runtime.

``--model`` is a local folder (or ``model.onnx``) or a registered model URI
(``models:/<name>@champion``, ``models:/<name>/<version>``); without it, the project's
own optimize output (``paths.optimize_dir``) and its default variant.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .config import Config
from .errors import InvalidInput, TuneopsError
from .io import read_json


class InferError(InvalidInput):
    pass


def _local_lm(cfg: Config, model: str | None, variant: str | None) -> tuple[Path, Path]:
    """(model.onnx, tokenizer folder) for a local folder or the project's optimize output."""
    if model is None:
        opt = cfg.path("optimize_dir")
        metrics = opt / "metrics.json"
        if not metrics.is_file():
            raise InferError(f"no optimize output at {opt}: run `tuneops optimize` or pass --model")
        m = read_json(metrics)
        name = variant or m["default_variant"]
        if name is None:
            raise InferError("every ONNX variant was rejected by its gate: pass --variant to run one anyway")
        if name not in m["variants"]:
            raise InferError(f"no variant {name!r} in {opt}; built: {sorted(m['variants'])}")
        return opt / m["variants"][name]["path"], cfg.path("base_model_dir")
    path = Path(model)
    if path.is_dir():
        path = path / variant / "model.onnx" if variant and (path / variant).is_dir() else path / "model.onnx"
    if not path.is_file():
        raise InferError(f"no ONNX model at {path}")
    tok = path.parent if (path.parent / "tokenizer_config.json").is_file() else cfg.path("base_model_dir")
    return path, tok


def _registered_lm(cfg: Config, uri: str, variant: str | None) -> tuple[Path, Path]:
    import mlflow.pyfunc

    from .registry import tracking

    from mlflow.exceptions import MlflowException

    tracking.use_store(cfg)          # this project's registry, from any folder
    try:
        wrapped = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except (MlflowException, OSError) as exc:
        raise TuneopsError(f"--model {uri}: no such registered model version "
                           f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from None
    arts = wrapped.artifacts
    name = variant or wrapped.variant
    if f"onnx_{name}" not in arts:
        raise InferError(f"{uri} has no ONNX variant {name!r}; it has "
                         f"{sorted(k[5:] for k in arts if k.startswith('onnx_'))}")
    return Path(arts[f"onnx_{name}"]) / "model.onnx", Path(arts["tokenizer"])


def _check_sampling(args: Any) -> None:
    """Decoding flags, checked before any model is loaded (a bad one is exit 2, not a silent exit 0)."""
    checks = (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
              ("--temperature", args.temperature, args.temperature > 0, "greater than 0"),
              ("--top-k", args.top_k, args.top_k >= 0, "0 (all) or more"),
              ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"))
    for flag, value, ok, rule in checks:
        if not ok:
            raise InferError(f"generate: {flag} must be {rule} (got {value})")


def generate(cfg: Config, args: Any, out: Any = None) -> str:
    from transformers import AutoTokenizer

    from .chat import load_generation_config, prompt_ids, raw_ids, stop_ids
    from .onnx_lm import OnnxCausalLM

    out = out or sys.stdout
    _check_sampling(args)
    if args.model and str(args.model).startswith("models:/"):
        onnx_path, tok_dir = _registered_lm(cfg, args.model, args.variant)
    else:
        onnx_path, tok_dir = _local_lm(cfg, args.model, args.variant)
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if args.raw:
        ids = raw_ids(tok, args.prompt)
    else:
        ids = prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    gen_cfg = load_generation_config(tok_dir, onnx_path.parent, cfg.path("base_model_dir"))
    stop = set(stop_ids(tok, gen_cfg))
    lm = OnnxCausalLM(onnx_path)
    new: list[int] = []
    shown = ""
    for token in lm.stream(ids, args.max_new_tokens, stop, sample=args.sample, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        out.write(text[len(shown):])
        out.flush()
        shown = text
    out.write("\n")
    return shown


def classify(cfg: Config, args: Any, out: Any = None) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from .onnx_lm import OnnxClassifier

    out = out or sys.stdout
    path = Path(args.model)
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        raise InferError(f"no ONNX classifier at {path}")
    labels_file = path.parent / "labels.json"
    labels = read_json(labels_file) if labels_file.is_file() else None
    tok = AutoTokenizer.from_pretrained(str(path.parent))
    enc = tok(list(args.texts), padding=True, return_tensors="np")
    results = OnnxClassifier(path, labels).predict(enc["input_ids"], enc["attention_mask"])
    for text, r in zip(args.texts, results):
        out.write(json.dumps({"text": text, "label": r["label"], "score": round(r["score"], 6)}) + "\n")
    return results
