"""The project lock: one writer of a project at a time.

``tuneops run`` and every stage command that writes the project hold an exclusive
``fcntl`` lock on ``<state_dir>/locks/<project>.lock`` for their whole run. The file
records the holder (pid, command, start time) so a second writer can say who it waits
for. ``orchestrate.lock`` decides what the second one does: ``wait`` (up to
``orchestrate.lock_timeout_s``, then fail naming the holder) or ``fail`` at once.

The kernel drops the lock when its holder dies (even on SIGKILL), so a killed run never
leaves the project locked. The lock is re-entrant within a process (a stage called by
the flow of the same process does not wait for itself). Jobs-API jobs each have their
own project folder, so they lock different files and stay parallel.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from tuneops.errors import TuneopsError

EXIT_LOCKED = 75           # EX_TEMPFAIL: try again later
_held: dict[str, int] = {}  # lock path -> depth, in this process


class ProjectLocked(TuneopsError):
    """Another run holds the project's lock."""

    exit_code = EXIT_LOCKED


def lock_path(cfg: Any) -> Path:
    project = hashlib.sha256(str(cfg.root).encode()).hexdigest()[:16]
    return cfg.state_dir / "locks" / f"{project}.lock"


def holder(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def describe(info: dict[str, Any]) -> str:
    if not info:
        return "another process"
    return f"pid {info.get('pid')} ({info.get('command')}, since {info.get('started')})"


@contextlib.contextmanager
def project_lock(cfg: Any, command: str | None = None) -> Iterator[Path]:
    """Hold the project's lock for the block; wait or refuse per ``orchestrate.lock``."""
    path = lock_path(cfg)
    key = str(path)
    if _held.get(key):
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    mode, timeout = cfg.orchestrate.lock, cfg.orchestrate.lock_timeout_s
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                info = holder(path)
                if mode == "fail":
                    raise ProjectLocked(f"project {cfg.root} is in use by {describe(info)}; "
                                        f"try again when it ends (orchestrate.lock: fail)") from None
                if time.monotonic() >= deadline:
                    raise ProjectLocked(f"project {cfg.root} is still in use by {describe(info)} after "
                                        f"{timeout:g} s (orchestrate.lock_timeout_s)") from None
                if not announced:
                    print(f"tuneops: waiting for the project lock held by {describe(info)}", file=sys.stderr)
                    announced = True
                time.sleep(0.5)
        record = {"pid": os.getpid(), "command": command or " ".join(["tuneops", *sys.argv[1:]])[:300],
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _held[key] = 1
        try:
            yield path
        finally:
            _held.pop(key, None)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)       # closing the descriptor releases the lock
