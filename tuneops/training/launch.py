"""Multi-process training through torchrun (``torch.distributed.run``): never a home-made
scheduler. The train stage calls ``launch`` when the plan has more than one process or uses
DeepSpeed; every rank runs ``python -m tuneops.training.launch PARAMS ROOT`` (the resolved
params, so each rank sees exactly the parent's config) and the shared loop.

Multi-node: run the same torchrun command on every node with ``--nnodes N --node-rank I
--rdzv-endpoint HOST:PORT`` (or DeepSpeed's launcher with a hostfile); see README "Scale out".
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tuneops.config import Config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(plan: dict[str, Any], params_file: Path, root: Path, train_dir: Path) -> list[str]:
    """The torchrun command line for one node."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
            "--nproc-per-node", str(plan["nproc_per_node"]), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "tuneops.training.launch",
            str(params_file), str(root), str(train_dir)]


def launch(cfg: Config, plan: dict[str, Any], train_dir: Path) -> dict[str, Any]:
    if plan["nodes"] > 1:
        raise RuntimeError(f"train: the plan spans {plan['nodes']} nodes; start `{' '.join(command(plan, Path('PARAMS'), Path('ROOT'), Path('OUT'))[1:])}` "
                           "on every node with --nnodes/--node-rank/--rdzv-endpoint (README: Scale out)")
    launch_dir = cfg.path("checkpoint_dir")
    launch_dir.mkdir(parents=True, exist_ok=True)
    params_file = launch_dir / "launch-params.json"
    params_file.write_text(json.dumps(cfg.raw, default=str))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan["nproc_per_node"])))
    proc = subprocess.run(command(plan, params_file, cfg.root, train_dir), env=env, cwd=cfg.root)
    if proc.returncode != 0:
        raise RuntimeError(f"train: {plan['nproc_per_node']} training processes (torchrun) failed with exit code "
                           f"{proc.returncode}; see the log above")
    return json.loads((train_dir / "metrics.json").read_text())


def main(argv: list[str]) -> int:
    from tuneops.config import load_config
    from tuneops.env import configure

    from .loop import train

    argv = [a for a in argv if not a.startswith("--local_rank")]   # DeepSpeed's launcher adds it
    params_file, root, train_dir = Path(argv[0]), Path(argv[1]), Path(argv[2])
    cfg = load_config(params_file, root=root)
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
