"""Small helpers shared by the stages: JSON(L) I/O, atomic writes, hashes, a free port."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable


def tmp_name(path: Path) -> Path:
    """A temp file next to ``path`` private to this writer (two processes never share one)."""
    import uuid

    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    n = 0
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file that the validate stage has already accepted."""
    with Path(path).open(encoding="utf-8-sig") as f:
        return [json.loads(line) for line in f if line.strip()]


def md5_file(path: Path) -> str:
    """md5 of the file's bytes: the hash DVC 3 records for a file in dvc.lock."""
    h = hashlib.md5()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def private_tmp(dest: Path) -> Path:
    """A new, empty folder next to ``dest`` that only this call owns (unique name), to build
    ``dest`` in before ``replace_dir`` moves it into place."""
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))


def replace_dir(src: Path, dest: Path) -> Path:
    """Move the complete folder ``src`` to ``dest``; the old ``dest`` (if any) is renamed away
    first and deleted after, so ``dest`` is never a half-written folder."""
    trash = private_tmp(dest)
    if dest.exists():
        os.rename(dest, trash / dest.name)
    os.rename(src, dest)
    shutil.rmtree(trash, ignore_errors=True)
    return dest


def fresh_dir(path: Path) -> Path:
    """An empty directory at ``path`` (stage outputs are rebuilt from scratch)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def dir_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it; another process may take it before it is
    bound again): torchrun's master port, the servers, the tests and the benchmarks."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
