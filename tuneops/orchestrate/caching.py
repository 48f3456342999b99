"""Task-level caching and retries for the Prefect flow.

A stage's cache key is what DVC would compare: the md5s of its input paths (data,
base model, upstream outputs), the values of the params sections it reads, and the
stage's code deps (``StageSpec.code``: the same files dvc.yaml lists), plus the project
folder. A scheduled run with nothing changed therefore reuses every stage's result
and trains nothing.

Prefect's cache returns a task's return value, not its files. So, like ``dvc.lock``, each
stage run records its key and the md5s of the outputs it left on disk
(``<state_dir>/stage-cache/<project>/<stage>.json``); a cached result is used only when
the key is the recorded one and the outputs on disk are still those files. Otherwise the
stage runs (``refresh_cache``): a cache hit never hands on missing, half-written or stale
files (a base model folder left without its weights is rebuilt). The exception is ingest's
dataset splits (``editable_outs``): edited in place, they are kept as the new data, not
re-created (``dvc repro`` would re-create them; ``tuneops data add`` is the DVC-consistent
way to change data).

Retries are for transient failures only: bad data, bad params or a plan that does not
fit fail at once.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tuneops import faults, stages
from tuneops.config import Config
from tuneops.io import md5_file

_md5_memo: dict[tuple[str, int, int], str] = {}


def code_md5(cfg: Config, spec: stages.StageSpec) -> dict[str, str | None]:
    """md5 of each of the stage's code deps (``StageSpec.code``, what dvc.yaml lists for it),
    resolved where DVC resolves them (``stages.code_root``); bytecode caches are skipped."""
    root = stages.code_root(cfg.root)
    return {c: path_md5(root / c, ignore=stages.CODE_IGNORE) for c in spec.code}


def _file_md5(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _md5_memo:
        _md5_memo[key] = md5_file(path)
    return _md5_memo[key]


def path_md5(path: Path, ignore: tuple[str, ...] = ()) -> str | None:
    """md5 of a file, or of a folder's (relative path, md5) list; None when missing. Folder
    entries whose path part ends with one of ``ignore`` are skipped."""
    path = Path(path)
    if path.is_file():
        return _file_md5(path)
    if path.is_dir():
        h = hashlib.md5()
        files = (q for q in path.rglob("*") if q.is_file()
                 and not any(part.endswith(ignore) for part in q.relative_to(path).parts))
        for p in sorted(files):
            h.update(f"{p.relative_to(path).as_posix()}:{_file_md5(p)}\n".encode())
        return h.hexdigest()
    return None


def _param_value(cfg: Config, key: str) -> Any:
    node: Any = cfg.raw
    for part in key.split("."):
        node = node[part]
    return node


def stage_inputs(cfg: Config, spec: stages.StageSpec) -> dict[str, Any]:
    """Everything a stage's result depends on (what the cache key hashes)."""
    return {
        "stage": spec.name,
        "project": str(cfg.root),
        "code": code_md5(cfg, spec),
        "params": {key: _param_value(cfg, key) for key in spec.params},
        "deps": {key: path_md5(cfg.path(key)) for key in spec.deps},
    }


def stage_key(cfg: Config, name: str) -> str:
    blob = json.dumps(stage_inputs(cfg, stages.get(name)), sort_keys=True, default=str)
    return f"tuneops-{name}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def cache_key_fn(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect ``cache_key_fn``: the stage's key from its ``cfg`` argument."""
    return stage_key(parameters["cfg"], context.task.name)


def outputs_md5(cfg: Config, name: str) -> dict[str, str | None]:
    spec = stages.get(name)
    return {key: path_md5(cfg.path(key)) for key in spec.outs + spec.uncached_outs}


def _stamp_path(cfg: Config, name: str) -> Path:
    project = hashlib.sha256(str(cfg.root).encode()).hexdigest()[:16]
    return cfg.state_dir / "stage-cache" / project / f"{name}.json"


def cache_valid(cfg: Config, name: str) -> bool:
    """True when the stage's last run had this key and its outputs on disk are the ones it
    recorded (all present, same md5s): a half-written or deleted output is never a hit."""
    path = _stamp_path(cfg, name)
    if not path.is_file():
        return False
    try:
        stamp = json.loads(path.read_text())
    except ValueError:
        return False
    outs = outputs_md5(cfg, name)
    if None in outs.values() or stamp.get("key") != stage_key(cfg, name):
        return False
    # The dataset splits of ingest (editable_outs) edited in place are the data change the watcher
    # reports: kept, and the stages after it see it through their deps. Every other output must
    # be exactly what the stage wrote.
    return stages.get(name).editable_outs or stamp.get("outs") == outs


def record(cfg: Config, name: str) -> None:
    """After a stage ran (or was a valid hit): its key and the outputs it left."""
    path = _stamp_path(cfg, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": stage_key(cfg, name), "outs": outputs_md5(cfg, name)}, indent=1))
    tmp.replace(path)


def forget(cfg: Config, name: str) -> None:
    """Before a stage runs: its old record no longer describes what is on disk."""
    _stamp_path(cfg, name).unlink(missing_ok=True)


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry unless the failure is the user's input."""
    from tuneops.config import UndeclaredParam
    from tuneops.errors import TuneopsError

    try:
        state.result()
    except (TuneopsError, FileNotFoundError, ValueError, UndeclaredParam):   # the last: a bug, not transient
        return False
    except Exception:  # noqa: BLE001 - anything else may be transient (OOM kill, I/O, lock)
        return True
    return True


def task_options(cfg: Config, name: str) -> dict[str, Any]:
    """Per-run options of a stage's task, from ``orchestrate`` in params."""
    o = cfg.orchestrate
    return {
        "retries": o.task_retries,
        "retry_delay_seconds": o.task_retry_delay_s,
        "refresh_cache": (not o.cache) or not cache_valid(cfg, name),
    }


def run_stage(stage_task: Any, cfg: Config, name: str, **kwargs: Any) -> Any:
    """Run a stage's task with this run's options, then record its key and outputs. The record
    is dropped before a stage that will run, so a run killed inside it leaves no record."""
    faults.point(f"before:{name}")
    options = task_options(cfg, name)
    if options["refresh_cache"]:
        forget(cfg, name)
    result = stage_task.with_options(**options)(cfg, **kwargs)
    record(cfg, name)
    faults.point(f"after:{name}")
    return result


def cache_hits(flow_run_id: Any) -> dict[str, str]:
    """``{task name: final state name}`` of a flow run's tasks ("Cached" on a hit)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {t.name: t.state.name for t in runs if t.state is not None}


