"""Lineage facts recorded on every registered model version."""
from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(root: Path) -> str:
    """HEAD commit, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_lock_md5s(root: Path) -> dict[str, str]:
    """``{path: md5}`` of every file or directory output recorded in dvc.lock."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    out: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for entry in stage.get("outs") or []:
            if "md5" in entry:
                out[entry["path"]] = entry["md5"]
    return out
