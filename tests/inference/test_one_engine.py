"""One engine (issue 31): for the same greedy request on one registered model, ``tuneops generate``
(the CLI, in a subprocess), ``tuneops serve`` (its app on a real server, with the official
``openai`` client, streamed and not) and the registered MLflow pyfunc (loaded in a fresh process
from the code that travelled with it, without torch) give the same tokens: the ones the one decode
loop (``tuneops.inference.decode.stream``) produces on the model's own chat template.

The model is the tiny random Llama 3 of ``chat_model_dir`` (its greedy reply never hits a stop
token, so every entry point decodes exactly ``NEW`` tokens), logged and registered here the way
the register stage does it (``chat_model_spec``, ``tuneops.inference.layout``): no pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import make_project

from .conftest import InProcess

pytestmark = pytest.mark.pipeline          # `tuneops generate` and the pyfunc in subprocesses, a server

HELLO = [{"role": "user", "content": "Hello"}]
NEW = 12

PYFUNC = """
import json, sys
sys.modules["torch"] = None                  # the chat model's requirements have no torch
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
reply = model.predict({"messages": [{"role": "user", "content": "Hello"}]}, params={"max_tokens": int(sys.argv[2])})
print(json.dumps({"module": type(model.unwrap_python_model()).__module__, "reply": reply}))
"""


def _register(cfg, folder) -> str:
    """``folder`` logged and registered as a chat model (every artifact where register puts it)."""
    import mlflow

    from tuneops.registry import tracking
    from tuneops.inference import layout
    from tuneops.inference.pyfunc import chat_model_spec

    with mlflow.start_run(experiment_id=tracking.setup(cfg)):     # the project's experiment and artifact store
        info = mlflow.pyfunc.log_model(
            name="model", registered_model_name=cfg.register.model_name,
            **chat_model_spec(artifacts={**layout.variant_artifacts({"fp32": folder}), layout.TOKENIZER: str(folder)},
                              variant="fp32", max_new_tokens=NEW))
    return f"models:/{cfg.register.model_name}/{info.registered_model_version}"


def test_generate_serve_and_the_pyfunc_give_the_same_tokens(chat_model_dir, tmp_path):
    from tuneops.registry import tracking
    from tuneops.config import load_config
    from tuneops.inference.decode import stream
    from tuneops.inference.engine import ChatEngine
    from tuneops.inference.http.app import create_app
    from tuneops.inference.sampling import greedy

    root = make_project("one-engine")
    cfg = load_config(root / "params.yaml")
    uri = _register(cfg, chat_model_dir)

    # the reference: the one decode loop, greedy, on the model's own template and stop tokens
    engine = ChatEngine(chat_model_dir / "model.onnx", chat_model_dir)
    tokens = list(stream(engine.lm, engine.prompt(HELLO), NEW, engine.stop, greedy))
    text = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    assert len(tokens) == NEW and text.strip(), f"the tiny model's greedy reply is too short to compare: {text!r}"

    # `tuneops generate`, as a user types it
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri(cfg)}
    proc = subprocess.run([sys.executable, "-m", "tuneops", "--params", str(root / "params.yaml"), "generate",
                           "Hello", "--model", uri, "--max-new-tokens", str(NEW)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == text + "\n"

    # `tuneops serve`: its app on a real server, the official openai client
    srv = InProcess(create_app(cfg, uri))
    try:
        client = srv.client()
        r = client.chat.completions.create(model=cfg.register.model_name, messages=HELLO, max_tokens=NEW,
                                           temperature=0)
        assert r.choices[0].message.content == text
        assert r.usage.completion_tokens == NEW and r.choices[0].finish_reason == "length"
        chunks = client.chat.completions.create(model=cfg.register.model_name, messages=HELLO, max_tokens=NEW,
                                                temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finally:
        srv.stop()

    # the registered pyfunc, in a fresh process, from its own copy of the code
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", PYFUNC, uri, str(NEW)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["module"] == "tuneops.inference.pyfunc"
    assert got["reply"] == [text.strip()]                  # the pyfunc strips its replies
