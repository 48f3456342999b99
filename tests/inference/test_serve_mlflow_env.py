"""The registered chat model is a real MLflow model (issue 16): in a fresh virtualenv that has
only the model's logged requirements, outside the project folder and offline,
``mlflow.pyfunc.load_model("models:/...")`` predicts and ``mlflow models serve --env-manager local``
answers ``/invocations``. Slow: it creates a virtualenv and installs the requirements from PyPI."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, wait_for
from tuneops.io import free_port

pytestmark = pytest.mark.slow

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true", "ORT_DISABLE_TELEMETRY": "1", "PIP_NO_INDEX": "1"}

PREDICT = """
import json, sys, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
import tuneops            # importable only now: from the model's code_paths
out = model.predict({"messages": [{"role": "user", "content": "Hello"}]}, params={"max_tokens": 4})
print(json.dumps({"replies": out, "tuneops": tuneops.__file__, "inputs": [i.name for i in
      model.metadata.get_input_schema().inputs]}))
"""


def test_registered_model_loads_and_serves_in_a_fresh_virtualenv(stage, tiny_cfg):
    import mlflow.pyfunc

    from tuneops.registry import tracking

    stage("register")
    tracking.use_store(tiny_cfg)
    uri = f"models:/{tiny_cfg.register.model_name}@champion"
    reqs = Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text()
    assert "torch" not in reqs and all(line.count("==") == 1 for line in reqs.split() if line)   # pinned
    outside = Path(tempfile.mkdtemp(prefix="tuneops-fresh-venv-"))      # deliberately not in the project
    try:
        subprocess.run([sys.executable, "-m", "venv", str(outside / "venv")], check=True)
        py = outside / "venv" / "bin" / "python"
        (outside / "requirements.txt").write_text(reqs)
        pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(outside / "requirements.txt")],
                             capture_output=True, text=True, timeout=1500, cwd=outside)
        assert pip.returncode == 0, pip.stderr[-3000:]
        env = {"PATH": f"{py.parent}{os.pathsep}/usr/bin:/bin", "HOME": str(outside),
               "MLFLOW_TRACKING_URI": tracking.tracking_uri(tiny_cfg), **OFFLINE}
        got = subprocess.run([str(py), "-c", PREDICT, uri], capture_output=True, text=True, timeout=300,
                             cwd=outside, env=env)
        assert got.returncode == 0, got.stderr[-3000:]
        result = json.loads(got.stdout.strip().splitlines()[-1])
        assert len(result["replies"]) == 1 and isinstance(result["replies"][0], str)
        assert result["inputs"] == ["messages"]
        assert not result["tuneops"].startswith(str(REPO / "tuneops"))      # the code travelled with the model
        port = free_port()
        log = outside / "serve.log"
        with log.open("w") as out:
            proc = subprocess.Popen([str(py.parent / "mlflow"), "models", "serve", "-m", uri, "--env-manager",
                                     "local", "-h", "127.0.0.1", "-p", str(port)], cwd=outside, env=env,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            def up() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200
                except httpx.HTTPError:
                    assert proc.poll() is None, log.read_text()[-3000:]
                    return False
            wait_for(up, 180, "mlflow models serve", logs=[log], interval=1)
            r = httpx.post(f"http://127.0.0.1:{port}/invocations", timeout=120,
                           json={"dataframe_records": [{"messages": [{"role": "user", "content": "Hello"}]}],
                                 "params": {"max_tokens": 4}})
            assert r.status_code == 200, r.text
            assert r.json()["predictions"] == result["replies"]
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        shutil.rmtree(outside, ignore_errors=True)
