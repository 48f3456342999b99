"""The container image: no container can be built on the dev machine (podman runs, but no base
image can be pulled offline), so the image's own install script (docker/install.sh, the
Dockerfile's RUN step) runs into a fresh virtualenv, and what the image runs is checked there:
`tuneops --help`, the API app, a Prefect worker for Docker / Kubernetes pools, and the flow
entrypoints that prefect.yaml names."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_dockerfile_prefect_yaml_and_install_script_agree():
    docker = (REPO / "Dockerfile").read_text()
    assert "docker/install.sh /opt/venv" in docker and 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in docker
    assert "ARG TORCH_INDEX_URL" in docker and "WORKDIR /app" in docker
    project = yaml.safe_load((REPO / "prefect.yaml").read_text())
    steps = [next(iter(s)) for s in project["pull"]]
    assert steps == ["prefect.deployments.steps.set_working_directory", "prefect.deployments.steps.run_shell_script"]
    assert project["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == "/app"
    assert "dvc pull" in project["pull"][1]["prefect.deployments.steps.run_shell_script"]["script"]
    for d in project["deployments"]:
        path, fn = d["entrypoint"].split(":")
        assert (REPO / path).is_file() and f"def {fn}(" in (REPO / path).read_text()
        assert d["parameters"]["params_file"] == "/app/params.yaml"


@pytest.mark.slow
def test_image_install_steps_in_a_fresh_virtualenv(tmp_path):
    venv = REPO / ".tuneops" / "pytest" / "image-venv"
    shutil.rmtree(venv, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    r = subprocess.run(["bash", str(REPO / "docker" / "install.sh"), str(venv)], env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    py = str(venv / "bin" / "python")
    check = ("import prefect_docker, prefect_kubernetes, deepspeed, peft, tuneops.service.app; "
             "from prefect.flows import load_flow_from_entrypoint as l; "
             "print(l('flows/pipeline.py:finetune').name)")
    out = subprocess.run([py, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("tuneops-finetune"), out.stderr[-3000:]
    for cmd in (["tuneops", "api", "--help"], ["prefect", "worker", "start", "--help"]):
        assert subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], env=env, capture_output=True).returncode == 0
