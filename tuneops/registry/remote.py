"""Shared data versions: the train/eval files of every registered model version go to the
project's DVC remote, and ``tuneops data checkout MODEL@ALIAS`` brings exactly those files
back, in this clone or another one.

The remote is DVC's own: the default remote of ``.dvc/config`` (this project ships
``local`` = ``.tuneops/dvc-remote``; ``dvc remote add -d NAME URL`` for any DVC remote URL:
a folder, ``s3://``, ``gs://``, ``azure://``, ``ssh://`` with its DVC plugin). Files are
stored as DVC stores them (``files/md5/<2>/<30>``), so ``dvc push`` / ``dvc pull`` against
the same remote see the same objects. Register records the remote's URL (``data.remote``)
next to the md5s (``data.{train,eval}.md5``); checkout fetches by md5 and checks it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from tuneops.errors import InvalidInput
from tuneops.io import md5_file
from tuneops.secrets import MASK


def default_remote(root: Path) -> str | None:
    """URL of the DVC project's default remote (local folders as absolute paths); None when
    ``root`` is no DVC project or has no default remote."""
    if not (Path(root) / ".dvc").is_dir():
        return None
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(".") as repo:
        if not repo.config["core"].get("remote"):
            return None
        remote = repo.cloud.get_remote()
        return remote.path if remote.fs.protocol in ("local", "file", ("file", "local")) \
            else remote.fs.unstrip_protocol(remote.path)


def _odb(url: str) -> Any:
    from dvc.fs import get_cloud_fs
    from dvc_data.hashfile.db import get_odb

    cls, conf, path = get_cloud_fs({}, url=url)
    fs = cls(**conf)
    return get_odb(fs, fs.join(path, "files", "md5"), hash_name="md5")


def push(url: str, files: list[Path]) -> dict[str, str]:
    """Store ``files`` in the remote at ``url`` (skipped when already there); ``{path: md5}``."""
    from dvc_objects.fs.local import LocalFileSystem

    odb, local, out = _odb(url), LocalFileSystem(), {}
    for path in files:
        md5 = md5_file(path)
        if not odb.exists(md5):
            odb.add(str(path), local, md5)
        out[str(path)] = md5
    return out


def fetch(url: str, md5: str, dest: Path) -> Path:
    """Write the remote's object ``md5`` to ``dest`` (atomically) and check its md5."""
    odb = _odb(url)
    if not odb.exists(md5):
        raise InvalidInput(f"data remote {url}: no object with md5 {md5} (was the version registered with "
                           "another remote?)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    odb.fs.get_file(odb.oid_to_path(md5), str(tmp))
    got = md5_file(tmp)
    if got != md5:
        tmp.unlink()
        raise InvalidInput(f"data remote {url}: object {md5} has md5 {got}; not written to {dest}")
    if dest.exists():
        dest.chmod(0o644)     # DVC leaves its outputs read-only (hardlinked to its cache)
    tmp.replace(dest)
    return dest


def checkout(cfg: Any, ref: str) -> dict[str, Any]:
    """Restore a registered version's train/eval files (paths and md5s from its tags) into
    this project, from the remote it recorded (else this project's default remote)."""
    from tuneops import registry

    version = registry.show(cfg, ref)
    tags = version["tags"]
    url = tags.get("data.remote") or default_remote(cfg.root)
    if MASK in str(url):     # register masks a password in the URL: use this project's remote (with its credentials)
        url = default_remote(cfg.root)
    if not url:
        raise InvalidInput(f"{ref}: the version records no data remote and this project has none "
                           "(`dvc remote add -d NAME URL`)")
    files = []
    for split in ("train", "eval"):
        path, md5 = tags.get(f"data.{split}.path"), tags.get(f"data.{split}.md5")
        if not path or not md5:
            raise InvalidInput(f"{ref}: version {version['version']} has no data.{split}.path/md5 tags")
        dest = (cfg.root / path).resolve()
        if not dest.is_relative_to(cfg.root):
            raise InvalidInput(f"{ref}: data.{split}.path {path!r} is outside the project")
        if not (dest.is_file() and md5_file(dest) == md5):
            fetch(url, md5, dest)
        files.append({"split": split, "path": path, "md5": md5})
    return {"model": version["name"], "version": version["version"], "remote": url, "files": files}
