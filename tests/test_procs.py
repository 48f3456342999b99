"""Children of long-running commands (tuneops.procs): a signal to the command reaches the children
it started and everything they started, and nothing is left running after a bounded wait."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tuneops import procs
from tuneops.io import free_port

from tests.conftest import REPO, make_project, wait_for

# A child that ignores SIGTERM and SIGINT and starts a grandchild in another session (as a Prefect
# worker starts its flow runs): only the bounded wait and the kill of the whole tree stop them.
STUBBORN = (
    "import signal, subprocess, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "time.sleep(600)'], start_new_session=True)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def _descendants(pid: int, at_least: int, timeout: float = 30) -> list[psutil.Process]:
    def found():
        kids = psutil.Process(pid).children(recursive=True)
        return kids if len(kids) >= at_least else None

    return wait_for(found, timeout, f"{at_least} descendants of {pid}", interval=0.2)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_child_tree_within_the_bound(sig):
    runner = ("import sys; from tuneops import procs; "
              f"sys.exit(procs.run([sys.executable, '-c', {STUBBORN!r}], grace_s=1.0))")
    parent = subprocess.Popen([sys.executable, "-c", runner], cwd=REPO, start_new_session=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        tree = _descendants(parent.pid, 2)               # the child and its grandchild
        t0 = time.monotonic()
        parent.send_signal(sig)                          # the command only, as `kill PID` does
        assert parent.wait(15) == 128 + sig
        wait_for(lambda: not any(_alive(p) for p in tree), 5, "the child tree to be gone", interval=0.1)
        assert time.monotonic() - t0 < 1.0 + 6
    finally:
        for p in [psutil.Process(parent.pid)] if parent.poll() is None else []:
            procs.stop(p.pid, signal.SIGKILL, 1)


def test_a_child_that_exits_gives_its_code_and_leaving_with_an_error_stops_it():
    assert procs.run([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    proc = procs.start([sys.executable, "-c", STUBBORN], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    tree = [psutil.Process(proc.pid), *_descendants(proc.pid, 1)]
    with pytest.raises(RuntimeError), procs.Supervised(proc, grace_s=0.5):
        raise RuntimeError("the command failed while its child ran")
    assert proc.poll() is not None
    wait_for(lambda: not any(_alive(p) for p in tree), 5, "the child tree to be gone", interval=0.1)


@pytest.mark.pipeline
def test_sigterm_to_api_worker_leaves_no_prefect_worker():
    """`tuneops api worker` against a real Prefect server: SIGTERM to the command (not its process
    group) stops its `prefect worker` child, and the command exits, within a few seconds."""
    from tuneops.config import load_config
    from tuneops.orchestrate import server

    root = make_project("procs-worker")
    cfg = load_config(root / "params.yaml")
    rec = server.start_prefect(cfg, free_port())
    log = root / "worker.log"
    try:
        env = {**server.client_env(cfg, rec["url"]), "PYTHONPATH": str(REPO)}
        with log.open("ab") as out:
            cmd = subprocess.Popen([sys.executable, "-m", "tuneops", "api", "worker"], cwd=root, env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            tree = _descendants(cmd.pid, 1, timeout=120)
            assert any("worker" in " ".join(p.cmdline()) for p in tree), [p.cmdline() for p in tree]
            wait_for(lambda: "started" in log.read_text(errors="replace"), 120, "the Prefect worker to start", (log,))
            tree = [psutil.Process(cmd.pid), *psutil.Process(cmd.pid).children(recursive=True)]
            t0 = time.monotonic()
            cmd.send_signal(signal.SIGTERM)
            assert cmd.wait(procs.GRACE_S + 10) == 128 + signal.SIGTERM
            wait_for(lambda: not any(_alive(p) for p in tree), 5, "no process of `tuneops api worker` left", (log,),
                     interval=0.1)
            took = time.monotonic() - t0
            assert took < procs.GRACE_S + 10, took
        finally:
            if cmd.poll() is None:
                procs.stop(cmd.pid, signal.SIGKILL, 1)
    finally:
        server.stop(cfg)
