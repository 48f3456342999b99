"""``tuneops generate`` / ``tuneops classify``.

``generate`` runs a chat model the way ``tuneops serve`` does: the same resolver
(``tuneops.inference.resolve``) and the same engine (``ChatEngine``: the model's chat template
and stop tokens, ``tuneops.inference.decode``), streaming the reply as it is decoded. ``--model``
is a local folder (an optimize output, a variant folder or ``model.onnx``, a registered model
folder) or a registered model URI (``models:/<name>@champion``, ``models:/<name>/<version>``);
without it, the project's own optimize output (``paths.optimize_dir``). ``--variant`` picks an
ONNX variant other than the default one.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import InvalidInput, TuneopsError
from ..io import read_json


class InferError(InvalidInput):
    pass


def _files(cfg: Config, model: str | None, variant: str | None) -> Any:
    """What ``--model`` / ``--variant`` name, through serving's resolver."""
    from ..registry import tracking
    from .resolve import URI, ServeError, registered_dir, resolve

    ref = model
    name = None
    if model is None:
        opt = cfg.path("optimize_dir")
        metrics = opt / "metrics.json"
        if not metrics.is_file():
            raise InferError(f"no optimize output at {opt}: run `tuneops optimize` or pass --model")
        if variant is None and read_json(metrics)["default_variant"] is None:
            raise InferError("every ONNX variant was rejected by its gate: pass --variant to run one anyway")
        ref = str(opt)
    elif str(model).startswith("models:/"):
        try:                          # this project's registry, from any folder
            folder, _ = registered_dir(model, tracking.tracking_uri(cfg))
        except ServeError as exc:     # the request was understood: no such version (exit 1)
            raise TuneopsError(f"--model {exc}") from None
        ref, name = str(folder), URI.match(model)["name"]
    try:
        return resolve(ref, fallback_tokenizer=cfg.path("base_model_dir"), model_id=name, variant=variant)
    except ServeError as exc:
        raise InferError(f"--model {model}: {exc}" if model else str(exc)) from None


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
    from .chat import raw_ids

    out = out or sys.stdout
    _check_sampling(args)
    files = _files(cfg, args.model, args.variant)
    if files.kind != "chat":
        raise InferError(f"generate: {args.model} is a classification model: use `tuneops classify`")
    engine = files.load()
    if args.raw:
        ids = raw_ids(engine.tokenizer, args.prompt)
    else:
        ids = engine.prompt([{"role": "user", "content": args.prompt}])
    shown = ""
    for piece in engine.deltas(ids, args.max_new_tokens, temperature=args.temperature if args.sample else 0.0,
                               top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        out.write(piece)
        out.flush()
        shown += piece
    out.write("\n")
    return shown


def classify(cfg: Config, args: Any, out: Any = None) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    from .runtimes import OnnxClassifier

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
