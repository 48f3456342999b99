"""Shared fixtures of the inference tests: a real uvicorn server in a thread (``InProcess``) and a
tiny chat model exported to ONNX in seconds, without the pipeline (``chat_model_dir``)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import TEST_ROOT, wait_for
from tuneops.io import free_port


class InProcess:
    """A real uvicorn server on a free port, in a thread (the app object stays reachable)."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "uvicorn start", interval=0.05)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    @classmethod
    def serving(cls, project: str, model_dir) -> "InProcess":
        """``tuneops serve MODEL_DIR``'s app, with a fresh test project's default params, in a thread."""
        from tests.conftest import make_project
        from tuneops.config import load_config
        from tuneops.inference.http.app import create_app

        return cls(create_app(load_config(make_project(project, ()) / "params.yaml"), str(model_dir)))

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve_subprocess(params: Path, model_dir: Path, port: int, log: Path, cwd: Path, *args: str) -> subprocess.Popen:
    """``tuneops serve MODEL_DIR --port PORT [ARGS]`` as a user starts it, in its own process (its output
    in ``log``), returned once ``/health`` answers 200; killed when it does not come up."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneops", "--params", str(params), "serve", str(model_dir),
                                 "--port", str(port), *args], stdout=out, stderr=subprocess.STDOUT, cwd=cwd)

    def up() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_for(up, 120, "tuneops serve", logs=[log], interval=0.3)
    except BaseException:
        proc.kill()
        raise
    return proc


@pytest.fixture(scope="session")
def chat_model_dir():
    """An exported chat model folder (model.onnx + tokenizer + generation_config), as `tuneops
    serve FOLDER` takes it: a 2-layer random Llama built here with its own BPE tokenizer and Llama 3
    chat template (tests/family_models.py), exported to ONNX with a KV cache. Its greedy reply
    never hits a stop token. Served, its model id is the folder's name, ``tiny-chat``."""
    from tests.family_models import CASES, build_model, build_tokenizer
    from tuneops.export.exporter import export_causal_lm

    out = TEST_ROOT / "inference-model" / "tiny-chat"
    shutil.rmtree(out.parent, ignore_errors=True)
    tok = build_tokenizer(CASES["llama3"])
    model = build_model("llama3", tok).eval()
    export_causal_lm(model, out / "model.onnx", 20)
    tok.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    return out
