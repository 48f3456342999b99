"""The data-watch flow: wiring only (``tuneops.orchestrate.watch`` does the work)."""
from __future__ import annotations

from typing import Any

from prefect import flow

from tuneops import env
from tuneops.config import load_config
from tuneops.orchestrate import watch as watcher


@flow(name="tuneops-data-watch", log_prints=True)
def watch(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    cfg = load_config(params_file, overrides or [])
    env.configure(cfg.state_dir)
    change = watcher.check(cfg)
    change["event_id"] = watcher.emit(cfg, change, params_file) if change["changed"] else None
    print(f"data {'changed' if change['changed'] else 'unchanged'}: {change['dataset']} md5 {change['md5']}")
    return change
