"""Checks that read params only (no model, no data, no graph) for the stages a command is about to
run, so a mistake in a late stage's params stops the run before the early stages spend compute:
``tuneops run`` / the Prefect flow check every stage they will run, ``tuneops <stage>`` (what
``dvc repro`` runs) that stage and the ones after it.

Each problem is one ``ConfigError`` line: ``params.yaml:LINE: KEY: message`` (the line of the key in
the params file; ``--set`` when an override set it). The stages check the same again when they run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import stages
from .config import Config, ConfigError, _parse_override


def key_line(params_file: str | Path, dotted: str) -> int | None:
    """1-based line of ``dotted`` (``optimize.extra_variants``) in a YAML file, or None."""
    try:
        node = yaml.compose(Path(params_file).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    line = None
    for part in dotted.split("."):
        if not isinstance(node, yaml.MappingNode):
            return line
        for key, value in node.value:
            if key.value == part:
                line, node = key.start_mark.line + 1, value
                break
        else:
            return line
    return line


def where(cfg: Config, dotted: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """``params.yaml:LINE: KEY`` or ``--set KEY`` for an overridden key."""
    if any(".".join(_parse_override(o)[0]) == dotted for o in overrides):
        return f"--set {dotted}"
    line = key_line(cfg.source, dotted)
    return f"{cfg.source}{f':{line}' if line else ''}: {dotted}"


def _optimize(cfg: Config, overrides: list[str] | tuple[str, ...]) -> None:
    from . import targets
    from .export.variants import VariantParamError, wanted

    o = cfg.optimize
    try:
        wanted(o, {t: targets.load(t) for t in o.targets})
    except VariantParamError as exc:
        raise ConfigError(f"{where(cfg, exc.key, overrides)}: {exc.message}") from None


CHECKS = {"optimize": _optimize}


def check(cfg: Config, start: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> None:
    """Run the params checks of the stages from ``start`` (all when None) to the last; raise
    ``ConfigError`` on the first problem."""
    names = stages.STAGE_NAMES
    for name in names[names.index(start):] if start else names:
        if name in CHECKS:
            CHECKS[name](cfg, overrides)
