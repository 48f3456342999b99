"""Many fine-tunes over one base: adapters exported unmerged resolve to their base graph, the model
pool loads that base once (one ONNX Runtime session per base graph md5) and runs each request with
its own adapter; an adapter over a base it was not trained for is refused, naming both."""
from __future__ import annotations

import numpy as np
import pytest

from tests.export.test_adapters import _base_folder, _peft
from tuneops.export import adapters
from tuneops.inference.pool import ModelPool
from tuneops.inference.resolve import ServeError, files_of_adapter, resolve


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool")
    base_dir = _base_folder(root, 0)
    int4 = adapters.export_base(base_dir, root / "int4", adapters.base_quant("int4"), how="builder", model_name="tiny")
    fp32 = adapters.export_base(base_dir, root / "fp32", adapters.base_quant("fp32"), how="builder", model_name="tiny")
    folders = []
    for seed in (1, 2, 3):
        adapters.export_adapter(_peft(base_dir, "int4", seed), root / "int4" / "model.onnx", root / f"a{seed}",
                                "qat_int4")
        folders.append(root / f"a{seed}")
    return {"root": root, "adapters": folders, "int4": int4, "fp32": fp32}


def test_adapters_share_one_base_session_and_keep_their_own_weights(exported):
    pool = ModelPool(limit=8)
    engines = [pool.get(f.name, resolve(str(f))) for f in exported["adapters"]]
    assert pool.bases.loaded() == [exported["int4"]["md5"]]
    assert len({id(e.lm.session) for e in engines}) == 1
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    logits = [e.lm(ids, np.ones_like(ids)) for e in engines]
    assert all(np.abs(a - b).max() > 1e-2 for i, a in enumerate(logits) for b in logits[i + 1:])
    again = pool.get(exported["adapters"][0].name, resolve(str(exported["adapters"][0])))
    assert again is engines[0]
    np.testing.assert_array_equal(again.lm(ids, np.ones_like(ids)), logits[0])
    text = "".join(engines[0].deltas(engines[0].prompt([{"role": "user", "content": "Hi"}]), max_tokens=4))
    assert isinstance(text, str)


def test_an_adapter_over_another_base_is_refused_naming_both(exported):
    from tuneops.export.basequant import BaseMismatch

    folder = exported["adapters"][0]
    files = files_of_adapter(folder, "a", base=exported["root"] / "fp32" / "model.onnx")
    with pytest.raises(BaseMismatch) as err:
        ModelPool(limit=2).get("a", files)
    assert exported["int4"]["md5"] in str(err.value) and exported["fp32"]["md5"] in str(err.value)


def test_an_adapter_whose_base_is_missing_is_a_clear_error(exported, tmp_path):
    import json
    import shutil

    folder = tmp_path / "moved"
    shutil.copytree(exported["adapters"][0], folder)
    info = json.loads((folder / "adapter.json").read_text())
    info["base_path"] = str(tmp_path / "nowhere" / "model.onnx")
    (folder / "adapter.json").write_text(json.dumps(info))
    with pytest.raises(ServeError, match=exported["int4"]["md5"]):
        resolve(str(folder))
