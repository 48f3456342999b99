"""What the user sees: the log level (``-q`` / ``-v``), third-party warnings kept out of the
default view, progress lines for long steps, the one-line summary each stage ends with and
``tuneops run``'s closing table of wall time and peak RSS per stage.

``-q``: warnings and errors only; default: tuneops' progress and summaries (INFO), other
libraries at WARNING with their Python warnings hidden; ``-v``: everything (DEBUG), warnings
included. Set before the heavy imports (Prefect, transformers read their level then).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Any, Iterator

log = logging.getLogger("tuneops")

LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}
# Libraries that log at INFO what a user does not need by default.
_NOISY = ("mlflow", "transformers", "dvc", "alembic", "urllib3", "httpx", "great_expectations", "onnxruntime",
          "onnxscript", "torch", "deepspeed", "peft", "filelock", "matplotlib", "numexpr")


def setup(verbosity: int = 0) -> None:
    """``verbosity`` -1 (``-q``), 0 (default) or 1 (``-v``)."""
    verbosity = max(-1, min(1, verbosity))
    level = LEVELS[verbosity]
    os.environ["PREFECT_LOGGING_LEVEL"] = logging.getLevelName(level)
    os.environ["MLFLOW_LOGGING_LEVEL"] = logging.getLevelName(level if verbosity > 0 else logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info" if verbosity > 0 else "error")
    if verbosity < 0:
        os.environ.setdefault("TQDM_DISABLE", "1")
    log.setLevel(level)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    for name in _NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING)
    if verbosity < 1:   # third-party Python warnings out of the default view; ours stay
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", module=r"(tuneops|tasks|flows)(\.|$)")


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """``what ...`` then ``what: 12.3 s`` (INFO): progress for a step that takes a while."""
    log.info(f"{what} ...")
    t0 = time.perf_counter()
    yield
    log.info(f"{what}: {time.perf_counter() - t0:.1f} s")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# Key figures of each stage's result (label, result key or (key, fallback key, ...)); absent keys are left out.
FIGURES: dict[str, tuple[tuple[str, str | tuple[str, ...]], ...]] = {
    "model": (("source", "source"),),
    "ingest": (("scenario", "scenario"), ("train rows", "train_rows"), ("eval rows", "eval_rows")),
    "validate": (("train rows", "train_rows"), ("eval rows", "eval_rows"), ("rejected", "rejected_rows")),
    "select": (("method", "method"), ("fits", "fits")),
    # loss: the mean of the first / last few steps (a batch's loss varies with its examples)
    "train": (("method", "method"), ("steps", "steps"), ("loss", ("loss_start", "first_loss")),
              ("->", ("loss_end", "final_loss")),
              ("tokens/s", "tokens_per_s")),
    "evaluate": (("base ppl", "base_perplexity"), ("fine-tuned ppl", "finetuned_perplexity"),
                 ("base acc", "base_accuracy"), ("fine-tuned acc", "finetuned_accuracy")),
    "optimize": (("default variant", "default_variant"),),
    "register": (("model", "model_name"), ("version", "version"), ("alias", "alias")),
}


def gib(n_bytes: int | None) -> str:
    """``1.2 GiB`` (binary, like the planner's predicted peak), ``-`` when not measured."""
    return "-" if n_bytes is None else f"{n_bytes / 2**30:.1f} GiB"


def stage_summary(name: str, result: dict[str, Any], seconds: float | None = None,
                  peak_rss_bytes: int | None = None) -> str:
    """One line: ``train: 21.8 s, peak RSS 1.2 GiB  method lora, steps 8, loss 12.48 -> 12.35, tokens/s 540``."""
    figures = []
    for label, keys in FIGURES.get(name, ()):           # the first of the keys the result has
        key = next((k for k in ((keys,) if isinstance(keys, str) else keys) if result.get(k) is not None), None)
        if key is not None:
            figures.append(f"{label} {_fmt(result[key])}")
    if name == "optimize" and isinstance(result.get("variants"), dict):
        figures.append("variants " + " ".join(f"{v}{'' if r.get('accepted') else '(rejected)'}"
                                              for v, r in result["variants"].items()))
    measured = [f"{seconds:.1f} s"] if seconds is not None else []
    if peak_rss_bytes is not None:
        measured.append(f"peak RSS {gib(peak_rss_bytes)}")
    head = f"{name}: {', '.join(measured)} " if measured else f"{name}:"
    return (head + (f" {', '.join(figures).replace(', -> ', ' -> ')}" if figures else "")).rstrip()


def resources_table(resources: dict[str, dict[str, Any]]) -> str:
    """``tuneops run``'s closing table from the flow's ``resources`` (``tuneops.resources.summary``):
    stage | wall time | peak RSS, one row per stage, then the whole run (``total``)."""
    order = [name for name in resources if name != "total"] + (["total"] if "total" in resources else [])
    rows = [("stage", "wall time", "peak RSS")] + [
        (name, f"{resources[name]['wall_s']:.1f} s", gib(resources[name].get("peak_rss_bytes"))) for name in order]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows)
