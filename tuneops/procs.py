"""Child processes of tuneops commands: the one way a command starts a process it waits on.

A child runs in its own process group (a terminal's Ctrl-C reaches the command, not the child
twice). While the command waits on it, SIGTERM and SIGINT sent to the command are forwarded to
the child and everything it started (its process group and its descendants: e.g. the flow-run
processes of a Prefect worker), which get ``grace_s`` seconds to exit before they are killed;
then the command exits with 128 + the signal's number. A command that leaves the wait with an
error stops the child the same way. So stopping a command never leaves its children running.

Used by ``tuneops worker`` / ``tuneops api worker`` (the Prefect worker), ``tuneops server start``
(a server while it comes up; once healthy it is a daemon, stopped by ``tuneops server stop``
through ``stop``) and the train stage's ``torchrun``. ``tuneops serve`` and ``tuneops api`` start no
process (uvicorn serves in-process and handles the signals itself); every other command turns
SIGTERM into the same clean exit as Ctrl-C (``exit_on_sigterm``), so ``finally`` blocks and exit
hooks (Prefect's temporary server) run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any, Sequence

import psutil

GRACE_S = 5.0          # a signalled child's time to exit before it (and what it started) is killed
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _send(pid: int, procs: list[psutil.Process], sig: int) -> None:
    try:
        os.killpg(pid, sig)            # the group it leads (started here with a new session)
    except (ProcessLookupError, PermissionError):
        pass
    for p in procs:                    # and descendants in other groups or sessions
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def stop(pid: int, sig: int = signal.SIGTERM, grace_s: float = GRACE_S) -> None:
    """Send ``sig`` to the process ``pid`` (a child started here), its process group and its
    descendants; wait up to ``grace_s`` for all of them to exit, then kill those left."""
    procs = _tree(pid)
    if not procs:
        return
    _send(pid, procs, sig)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if alive:
        left = {p.pid: p for p in alive}
        for p in alive:                # what they started meanwhile goes too
            try:
                left.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        _send(pid, list(left.values()), signal.SIGKILL)
        psutil.wait_procs(list(left.values()), timeout=5)


class Supervised:
    """``with Supervised(proc):`` -- while inside, SIGTERM/SIGINT to this process stop ``proc``
    (``stop``, the signal forwarded) and then exit this process with 128 + the signal; leaving the
    block with an exception stops ``proc`` too. Leaving it normally leaves ``proc`` as it is."""

    def __init__(self, proc: subprocess.Popen, grace_s: float = GRACE_S):
        self.proc, self.grace_s = proc, grace_s
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        stop(self.proc.pid, signum, self.grace_s)
        self._reap()
        raise SystemExit(128 + signum)

    def _reap(self) -> None:
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "Supervised":
        if threading.current_thread() is threading.main_thread():    # handlers live in the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc_type is not None and self.proc.poll() is None:
            stop(self.proc.pid, signal.SIGTERM, self.grace_s)
            self._reap()


def start(cmd: Sequence[str], **popen: Any) -> subprocess.Popen:
    """Start a child in its own process group (``stop`` reaches everything it starts)."""
    return subprocess.Popen(list(cmd), start_new_session=True, **popen)


def run(cmd: Sequence[str], grace_s: float = GRACE_S, **popen: Any) -> int:
    """Run a child in the foreground until it exits (``Supervised``); its exit code, or 128 + the
    signal that ended it."""
    proc = start(cmd, **popen)
    with Supervised(proc, grace_s):
        code = proc.wait()
    return 128 - code if code < 0 else code


def exit_on_sigterm() -> None:
    """SIGTERM ends this process as Ctrl-C does, by unwinding (``SystemExit(143)``): ``finally``
    blocks, context managers (a ``Supervised`` child) and exit hooks run, instead of a hard stop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
