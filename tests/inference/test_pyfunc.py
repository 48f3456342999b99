"""The registered pyfunc (``tuneops.inference.pyfunc``): a version registered now loads from the code
that travelled with it (no torch), and versions registered before the move (pickled as
``tuneops.serving.*``) still unpickle."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

from ..conftest import REPO

LOAD = """
import json, sys
sys.modules["torch"] = None                  # the chat model's requirements have no torch
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
import tuneops
reply = model.predict({"messages": [{"role": "user", "content": "Hello"}]}, params={"max_tokens": 4})
print(json.dumps({"class": type(model.unwrap_python_model()).__module__, "tuneops": tuneops.__file__, "reply": reply}))
"""


def test_versions_registered_before_the_move_still_unpickle():
    from tuneops.inference.pyfunc import HeadModel, OnnxChatModel

    assert pickle.loads(b"ctuneops.serving\nOnnxChatModel\n.") is OnnxChatModel
    assert pickle.loads(b"ctuneops.serving\nHeadModel\n.") is HeadModel


def test_a_version_registered_now_loads_from_its_own_code_without_torch(stage, tiny_cfg, tmp_path):
    """... and replies with the tokens ``tuneops generate`` gives for the same greedy request (all three
    entry points on one model: test_one_engine.py): one engine."""
    import io
    from types import SimpleNamespace

    from tuneops.registry import tracking
    from tuneops.inference.commands import generate

    stage("register")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri(tiny_cfg)
    proc = subprocess.run([sys.executable, "-c", LOAD, f"models:/{tiny_cfg.register.model_name}@champion"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "tuneops.inference.pyfunc"
    assert not got["tuneops"].startswith(str(REPO / "tuneops"))     # the model's own copy of the package
    args = SimpleNamespace(model=f"models:/{tiny_cfg.register.model_name}@champion", variant=None, prompt="Hello",
                           max_new_tokens=4, sample=False, temperature=1.0, top_k=0, top_p=1.0, seed=None, raw=False)
    assert got["reply"] == [generate(tiny_cfg, args, io.StringIO()).strip()]
