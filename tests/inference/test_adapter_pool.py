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
    assert len({id(e.tokenizer) for e in engines}) == 1      # one tokenizer per content, not one per model
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


def _version(exported, name: str, adapter) -> "Path":
    """A registered-model folder as register writes it (MLflow pyfunc): a merged variant, the tokenizer
    and the unmerged adapter."""
    import mlflow

    from tuneops.inference import layout
    from tuneops.inference.pyfunc import chat_model_spec

    root = exported["root"]
    spec = chat_model_spec({layout.artifact_key("int4"): str(root / "int4"), layout.TOKENIZER: str(root / "int4"),
                            layout.ADAPTER: str(adapter)}, variant="int4", max_new_tokens=4)
    spec.pop("input_example")
    folder = root / "versions" / name
    if not folder.is_dir():
        mlflow.pyfunc.save_model(path=str(folder), **spec)
    return folder


def test_registered_versions_serve_their_adapters_over_one_base(exported):
    """The jobs API and `tuneops serve models:/...` resolve a version that carries an unmerged adapter to
    that adapter over the shared base graph: two versions, one base session, each its own logits."""
    from tuneops.inference.resolve import files_of_registered

    folders = [_version(exported, f"v{i}", a) for i, a in enumerate(exported["adapters"][:2])]
    files = [files_of_registered(f, f.name) for f in folders]
    assert all(f.adapter_dir is not None and f.onnx_path.samefile(exported["root"] / "int4" / "model.onnx")
               for f in files)
    assert all(f.tokenizer_dir.parent.name == "artifacts" for f in files)    # the version's own tokenizer
    pool = ModelPool(limit=4)
    engines = [pool.get(f.id, f) for f in files]
    assert pool.bases.loaded() == [exported["int4"]["md5"]] and engines[0].lm.session is engines[1].lm.session
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    for engine, adapter in zip(engines, exported["adapters"]):
        alone = resolve(str(adapter)).load()
        np.testing.assert_allclose(engine.lm(ids, np.ones_like(ids)), alone.lm(ids, np.ones_like(ids)), atol=1e-5)
    a, b = (e.lm(ids, np.ones_like(ids)) for e in engines)
    assert np.abs(a - b).max() > 1e-2


def test_a_version_whose_base_graph_is_elsewhere_serves_its_merged_variant(exported, tmp_path):
    import json
    import shutil

    from tuneops.inference.resolve import files_of_registered

    folder = tmp_path / "moved"
    shutil.copytree(_version(exported, "v0", exported["adapters"][0]), folder)
    meta = next(folder.glob("artifacts/*/adapter.json"))
    info = json.loads(meta.read_text())
    info["base_path"] = str(tmp_path / "another-machine" / "model.onnx")
    meta.write_text(json.dumps(info))
    files = files_of_registered(folder, "m")
    assert files.adapter_dir is None and files.onnx_path.parent.name == "int4"   # the version's own int4 copy
    assert files.onnx_path.is_relative_to(folder)
    with pytest.raises(ServeError, match=exported["int4"]["md5"]):
        files_of_registered(folder, "m", variant="adapter")          # asked for by name: a clear error


def test_pyfunc_versions_over_one_base_share_its_session(exported):
    import mlflow

    from tuneops.inference import layout

    models = [mlflow.pyfunc.load_model(str(_version(exported, f"v{i}", a)))
              for i, a in enumerate(exported["adapters"][:2])]
    inner = [m.unwrap_python_model() for m in models]
    assert [m.variant for m in inner] == [layout.UNMERGED] * 2
    assert inner[0].engine.lm.session is inner[1].engine.lm.session
    replies = [m.predict({"messages": [{"role": "user", "content": "Hi"}]}, params={"max_tokens": 3}) for m in models]
    assert all(len(r) == 1 and isinstance(r[0], str) for r in replies)


def test_a_builder_graph_adapter_prefills_from_a_shared_prefix_as_it_would_whole(exported):
    """onnxruntime-genai's builder graph (positions from the mask: rows right-padded) with an adapter:
    prompts that share a system prompt start from its cache, and decode as without it."""
    from tuneops.inference.decode import generate_ids

    files = resolve(str(exported["adapters"][1]))
    engine = files.load(max_batch=8, prefix_cache=8)
    assert engine.batcher.max_batch == 8 and engine.batcher.prefix_cache == 8
    system = {"role": "system", "content": "You answer questions about ships, in one short sentence only."}
    prompts = [engine.prompt([system, {"role": "user", "content": m}]) for m in ("Hi", "Where is the port?", "Bye")]
    got = [list(engine.batcher.submit(p, 12, engine.stop, None).tokens()) for p in prompts]
    alone = [[t for t in generate_ids(engine.lm, [p], 12, engine.stop)[0] if t not in engine.stop] for p in prompts]
    assert got == alone
    assert engine.batcher.state()["prefix_tokens"] >= 2 * 16
    # a burst: each row starts from the prefix alone (GroupQueryAttention refuses several rows with a
    # past and more than one new token), then they decode together
    burst = [engine.batcher.submit(p, 12, engine.stop, None) for p in prompts * 2]
    assert [list(r.tokens()) for r in burst] == alone * 2
    assert engine.batcher.state()["prefix_tokens"] >= 8 * 16


@pytest.mark.parametrize("which", ["fp32", "int4 adapter"])
def test_builder_graph_rows_of_different_lengths_decode_together_as_alone(exported, which):
    """A builder graph (GroupQueryAttention: per-row lengths from the mask, each row's key/value
    written after its own past) batches: rows of different prompt lengths joining at different times
    and leaving at different times keep right-padded pasts, and each gets the tokens it gets alone;
    ``decode`` of a batch of mixed lengths too (one prefill per length)."""
    import threading

    from tuneops.inference.decode import generate_ids

    folder = exported["root"] / "fp32" if which == "fp32" else exported["adapters"][0]
    engine = resolve(str(folder)).load(max_batch=8, max_batch_tokens=8, prefix_cache=0)
    assert engine.batcher.max_batch == 8 and engine.batcher.left is False
    prompts = [engine.prompt([{"role": "user", "content": m}]) for m in
               ("Hi", "Where is the port of Rotterdam, and how deep is it?", "Bye now", "Tell me about ships.",
                "ok", "What is the tide like today in the harbour, please?")]
    limits = [60, 25, 80, 40, 70, 50]
    assert len(set(map(len, prompts))) >= 5
    alone = [[t for t in generate_ids(engine.lm, [p], n, engine.stop)[0] if t not in engine.stop]
             for p, n in zip(prompts, limits)]
    assert generate_ids(engine.lm, prompts, limits, engine.stop) == \
        [generate_ids(engine.lm, [p], n, engine.stop)[0] for p, n in zip(prompts, limits)]
    out: list = [None] * len(prompts)
    began = [threading.Event() for _ in prompts]

    def go(i):
        tokens = []
        for t in engine.batcher.submit(prompts[i], limits[i], engine.stop, None).tokens():
            tokens.append(t)
            if len(tokens) == 2:
                began[i].set()
        began[i].set()
        out[i] = tokens

    engine.batcher.peak = 0
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for i, t in enumerate(threads):            # staggered: each joins once the one before decodes
        t.start()
        assert began[i].wait(60)
    for t in threads:
        t.join(60)
    assert out == alone
    assert engine.batcher.peak >= 3            # they decoded together


def _copied_pasts_greedy(lm, prompt, limit, stop):
    """Greedy tokens the plain way: every call returns a new cache (past copied into present)."""
    ids = np.array([prompt], np.int64)
    logits, cache = lm.step(ids, np.ones_like(ids), lm.empty_cache(1), last=True)
    out = []
    while len(out) < limit:
        out.append(int(logits[0, -1].argmax()))
        if out[-1] in stop:
            break
        mask = np.ones((1, len(prompt) + len(out)), np.int64)
        logits, cache = lm.step(np.array([[out[-1]]], np.int64), mask, cache, last=True)
    return out


@pytest.mark.parametrize("which", ["fp32", "int4 adapter"])
def test_builder_graph_decodes_in_one_kv_buffer_as_with_copied_pasts(exported, which):
    """A builder graph's decode binds each past and its present to one buffer (GroupQueryAttention
    writes the new key / value after each row's past, as onnxruntime-genai does): the same logits
    and cache as a call that copies the past, the buffer written in place, and the same tokens
    for rows of different lengths, past the buffer's first room (it grows)."""
    from tuneops.inference.decode import ROOM, Batch, generate_ids

    folder = exported["root"] / "fp32" if which == "fp32" else exported["adapters"][0]
    engine = resolve(str(folder)).load(max_batch=8, prefix_cache=0)
    lm = engine.lm
    assert lm.shares_buffer and Batch(lm).shared
    ids = np.array([engine.prompt([{"role": "user", "content": "Where is the port?"}])], np.int64)
    logits, cache = lm.step(ids, np.ones_like(ids), lm.empty_cache(1), last=True)
    token = np.array([[int(logits[0, -1].argmax())]], np.int64)
    mask = np.ones((1, ids.shape[1] + 1), np.int64)
    want, grown = lm.step(token, mask, cache, last=True)
    buffer = {n: np.pad(v, ((0, 0), (0, 0), (0, 5), (0, 0))) for n, v in cache.items()}
    held = {n: v.ctypes.data for n, v in buffer.items()}
    got = lm.step_into(token, mask, buffer)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert {n: v.ctypes.data for n, v in buffer.items()} == held
    for n, v in grown.items():
        np.testing.assert_allclose(buffer[n][:, :, :v.shape[2]], v, atol=1e-6)
    with pytest.raises(ValueError, match="as wide as the mask"):
        lm.step_into(token, np.ones((1, buffer[lm.past_names[0]].shape[2] + 1), np.int64), buffer)

    prompts = [engine.prompt([{"role": "user", "content": m}]) for m in
               ("Hi", "Where is the port of Rotterdam, and how deep is it?", "Bye now", "ok")]
    limits = [ROOM + 20, 10, ROOM + 5, 30]
    want = [_copied_pasts_greedy(lm, p, n, engine.stop) for p, n in zip(prompts, limits)]
    assert max(map(len, want)) > ROOM
    assert generate_ids(lm, prompts, limits, engine.stop) == want
    assert [list(engine.batcher.submit(p, n, engine.stop, None).tokens()) for p, n in zip(prompts, limits)] == \
        [[t for t in w if t not in engine.stop] for w in want]
