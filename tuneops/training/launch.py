"""Multi-process training through torchrun (``torch.distributed.run``): never a home-made
scheduler. The train stage calls ``launch`` when the plan has more than one process or uses
DeepSpeed; every rank runs ``python -m tuneops.training.launch PARAMS ROOT`` (the resolved
params, so each rank sees exactly the parent's config) and the shared loop.

Multi-node: the train stage writes ``launch-params.json`` and prints the torchrun line to run
on every node (``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``); see README
"Multi-node DeepSpeed".
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tuneops.config import Config
from tuneops.errors import TuneopsError
from tuneops.io import free_port


def command(plan: dict[str, Any], params_file: Path, root: Path, train_dir: Path,
            rdzv_endpoint: str | None = None, rdzv_id: str = "tuneops") -> list[str]:
    """The torchrun command line for one node. One node: a private master port on loopback.
    Several nodes (``rdzv_endpoint`` HOST:PORT, the same on every node): a c10d rendezvous,
    so no node rank has to be handed out; the first agent to reach HOST:PORT hosts it."""
    if rdzv_endpoint is None and plan["nodes"] == 1:
        where = ["--nnodes", "1", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    else:
        where = ["--nnodes", str(plan["nodes"]), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", rdzv_endpoint or "HEAD:29500", "--rdzv-id", rdzv_id]
    return [sys.executable, "-m", "torch.distributed.run", *where,
            "--nproc-per-node", str(plan["nproc_per_node"]), "-m", "tuneops.training.launch",
            str(params_file), str(root), str(train_dir)]


def write_params(cfg: Config) -> Path:
    """The resolved params (overrides applied) that every rank loads: ``launch-params.json``
    in ``paths.checkpoint_dir`` (on the shared filesystem for a multi-node run). Secrets the
    ranks do not need (the Prefect and jobs-API database URLs, tokens, passwords) are masked;
    ``tracking`` is kept whole, since rank 0 logs to that MLflow store. Owner-only (0600)."""
    from tuneops.secrets import redact

    launch_dir = cfg.path("checkpoint_dir")
    launch_dir.mkdir(parents=True, exist_ok=True)
    params_file = launch_dir / "launch-params.json"
    tmp = params_file.with_suffix(".json.tmp")
    raw = redact(cfg.raw)
    if "tracking" in cfg.raw:
        raw["tracking"] = cfg.raw["tracking"]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(raw, default=str))
    os.replace(tmp, params_file)
    return params_file


def launch(cfg: Config, plan: dict[str, Any], train_dir: Path) -> dict[str, Any]:
    params_file = write_params(cfg)
    if plan["nodes"] > 1:
        # the train stage cannot start processes on other machines: it writes the params every
        # rank needs and says what to run on each node (a scheduler such as Azure ML, a
        # Kubernetes PyTorchJob or a Slurm script runs that line once per node)
        cmd = " ".join(["torchrun", *command(plan, params_file, cfg.root, train_dir)[3:]])
        raise TuneopsError(
            f"train: the plan spans {plan['nodes']} nodes x {plan['nproc_per_node']} process(es); the resolved params "
            f"are in {params_file}. On every node (same project path on a shared filesystem, "
            f"tracking.tracking_uri an MLflow server) run: {cmd}   (HEAD:29500 = a host all nodes reach; "
            "README: Multi-node DeepSpeed)")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan["nproc_per_node"])))
    from tuneops import procs

    code = procs.run(command(plan, params_file, cfg.root, train_dir), env=env, cwd=cfg.root)  # signals reach the ranks
    if code != 0:
        raise RuntimeError(f"train: {plan['nproc_per_node']} training processes (torchrun) failed with exit code "
                           f"{code}; see the log above")
    return json.loads((train_dir / "metrics.json").read_text())


def main(argv: list[str]) -> int:
    from tuneops.config import load_config
    from tuneops.env import configure

    from .loop import train

    argv = [a for a in argv if not a.startswith("--local_rank")]   # DeepSpeed's launcher adds it
    params_file, root, train_dir = Path(argv[0]), Path(argv[1]), Path(argv[2])
    # optional `--set KEY=VALUE` pairs: a scheduler that mounts the data at paths known only at run
    # time (Azure ML inputs) points the params there
    overrides = [argv[i + 1] for i in range(3, len(argv) - 1) if argv[i] == "--set"]
    from tuneops import stages

    cfg = stages.get("train").view(load_config(params_file, overrides, root=root))   # what the stage may read
    configure(cfg.state_dir)
    plan = json.loads(cfg.path("plan").read_text())
    try:
        train(cfg, plan, train_dir)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
