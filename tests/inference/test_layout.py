"""The registered artifact layout (``tuneops.inference.layout``): what register writes is what the
resolver, the pyfunc and the gate read."""
from __future__ import annotations

import pytest
import yaml

from tuneops.inference import layout
from tuneops.inference.resolve import ServeError, files_of_registered


def test_artifact_keys_and_variants_round_trip():
    for variant in ("fp32", "int8", "int4_rtn", "qdq_npu"):
        assert layout.variant_of(layout.artifact_key(variant)) == variant
    assert layout.artifact_key("fp32") == "onnx_fp32"
    assert layout.variant_of(layout.TOKENIZER) is None and layout.variant_of("onnx_") is None
    assert layout.variant_artifacts({"fp32": "/a/fp32", "int8": "/a/int8"}) == {"onnx_fp32": "/a/fp32",
                                                                               "onnx_int8": "/a/int8"}


def test_a_registered_folder_is_read_through_the_layout(tmp_path):
    arts = {**layout.variant_artifacts({"fp32": "artifacts/fp32", "int8": "artifacts/int8"}),
            layout.TOKENIZER: "artifacts/tok"}
    meta = {"flavors": {"python_function": {"artifacts": {k: {"path": v} for k, v in arts.items()},
                                            "config": {"variant": "int8", "max_new_tokens": 8}}}}
    (tmp_path / "MLmodel").write_text(yaml.safe_dump(meta))
    files = files_of_registered(tmp_path, "m")
    assert (files.kind, files.onnx_path, files.tokenizer_dir) == (
        "chat", tmp_path / "artifacts/int8" / layout.MODEL_FILE, tmp_path / "artifacts/tok")
    assert files_of_registered(tmp_path, "m", "fp32").onnx_path == tmp_path / "artifacts/fp32/model.onnx"
    with pytest.raises(ServeError, match="no ONNX variant 'int4'"):
        files_of_registered(tmp_path, "m", "int4")
