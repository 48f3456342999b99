"""`tuneops server start|stop|status`: a real Prefect server (and optionally an MLflow
tracking server) on ``orchestrate.host``, with their databases in the project's state
dir, started in the background, waited on until healthy.

Each server's pid, URL and log live in ``<state_dir>/servers/<name>.json|.log``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tuneops import procs
from tuneops.registry import tracking
from tuneops.config import Config
from tuneops.env import state_paths
from tuneops.errors import TuneopsError


STOP_GRACE_S = 20.0      # a server's time to shut down on SIGTERM before it is killed


class ServerError(TuneopsError, RuntimeError):
    """A server did not come up (message names the log file)."""


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else name


def servers_dir(cfg: Config) -> Path:
    d = cfg.state_dir / "servers"
    d.mkdir(parents=True, exist_ok=True)
    return d


def prefect_database_url(cfg: Config) -> str:
    return cfg.orchestrate.prefect_database_url or f"sqlite+aiosqlite:///{cfg.state_dir / 'prefect-server.db'}"


def prefect_api_url(cfg: Config, port: int | None = None) -> str:
    return f"http://{cfg.orchestrate.host}:{port or cfg.orchestrate.prefect_port}/api"


def mlflow_url(cfg: Config, port: int | None = None) -> str:
    return f"http://{cfg.orchestrate.host}:{port or cfg.orchestrate.mlflow_port}"


def client_env(cfg: Config, api_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes that talk to the server (CLI, worker, flow runs)."""
    env = dict(os.environ if base is None else base)
    env.update({"PREFECT_API_URL": api_url, "PREFECT_HOME": str(state_paths(cfg.state_dir)["prefect_home"])})
    return env


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:  # noqa: S310 - local URL from params
            return resp.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of this process is not alive
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _record(cfg: Config, name: str) -> dict[str, Any] | None:
    path = servers_dir(cfg) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _spawn(cfg: Config, name: str, cmd: list[str], env: dict[str, str], url: str, health: str) -> dict[str, Any]:
    log = servers_dir(cfg) / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("ab") as out:
        proc = procs.start(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(cfg.root))
    record = {"name": name, "pid": proc.pid, "url": url, "health": health, "log": str(log), "cmd": cmd}
    deadline = time.monotonic() + cfg.orchestrate.startup_timeout_s
    # until it is healthy and recorded, a signal to this command (or an error) stops the server
    with procs.Supervised(proc, grace_s=STOP_GRACE_S):
        while not _healthy(health):
            if proc.poll() is not None:
                raise ServerError(f"{name} server exited with code {proc.returncode} before it was healthy; see {log}")
            if time.monotonic() > deadline:
                raise ServerError(f"{name} server not healthy at {health} after "
                                  f"{cfg.orchestrate.startup_timeout_s:g} s (orchestrate.startup_timeout_s); see {log}")
            time.sleep(0.5)
    record["startup_s"] = round(time.perf_counter() - t0, 2)
    (servers_dir(cfg) / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _terminate(pid: int, timeout: float = STOP_GRACE_S) -> None:
    """Stop the process group this module started (the server and its children)."""
    procs.stop(pid, grace_s=timeout)


def start_prefect(cfg: Config, port: int | None = None) -> dict[str, Any]:
    current = status(cfg).get("prefect")
    if current and current["running"]:
        return {**current, "already_running": True}
    port = port or cfg.orchestrate.prefect_port
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update({
        "PREFECT_HOME": str(state_paths(cfg.state_dir)["prefect_home"]),
        "PREFECT_API_DATABASE_CONNECTION_URL": prefect_database_url(cfg),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
    })
    api = prefect_api_url(cfg, port)
    cmd = [_bin("prefect"), "server", "start", "--host", cfg.orchestrate.host, "--port", str(port)]
    return _spawn(cfg, "prefect", cmd, env, api, f"{api}/health")


def start_mlflow(cfg: Config, port: int | None = None) -> dict[str, Any]:
    current = status(cfg).get("mlflow")
    if current and current["running"]:
        return {**current, "already_running": True}
    port = port or cfg.orchestrate.mlflow_port
    store = cfg.tracking.tracking_uri or tracking.tracking_uri(cfg)
    if store.startswith("http"):
        raise ServerError(f"tracking.tracking_uri is a server URL ({store}); the MLflow server needs a database URI")
    artifacts = cfg.tracking.artifact_location or str(state_paths(cfg.state_dir)["mlflow_artifacts"])
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    cmd = [_bin("mlflow"), "server", "--backend-store-uri", store, "--default-artifact-root",
           Path(artifacts).resolve().as_uri() if "://" not in artifacts else artifacts,
           "--host", cfg.orchestrate.host, "--port", str(port), "--workers", "1"]
    url = mlflow_url(cfg, port)
    return _spawn(cfg, "mlflow", cmd, env, url, f"{url}/health")


def start(cfg: Config, prefect_port: int | None = None, mlflow: bool | None = None) -> dict[str, Any]:
    out = {"prefect": start_prefect(cfg, prefect_port)}
    if cfg.orchestrate.mlflow_server if mlflow is None else mlflow:
        out["mlflow"] = start_mlflow(cfg)
    return out


def status(cfg: Config) -> dict[str, Any]:
    out = {}
    for name in ("prefect", "mlflow"):
        rec = _record(cfg, name)
        if rec is None:
            continue
        alive = _alive(rec["pid"])
        out[name] = {**rec, "running": alive and _healthy(rec["health"]), "process_alive": alive}
    return out


def stop(cfg: Config) -> dict[str, Any]:
    out = {}
    for name in ("mlflow", "prefect"):
        rec = _record(cfg, name)
        if rec is None:
            continue
        _terminate(rec["pid"])
        (servers_dir(cfg) / f"{name}.json").unlink(missing_ok=True)
        out[name] = {"pid": rec["pid"], "stopped": not _alive(rec["pid"])}
    return out


def api_url(cfg: Config) -> str:
    """The Prefect API to talk to: ``PREFECT_API_URL`` if set, else this project's running server."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    rec = status(cfg).get("prefect")
    if not rec or not rec["running"]:
        raise ServerError("no Prefect server for this project: run `tuneops server start` "
                          "(or set PREFECT_API_URL)")
    return rec["url"]
