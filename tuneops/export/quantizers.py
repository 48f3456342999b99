"""Quantizers over an exported ONNX graph (ONNX Runtime's): weight-only ``MatMulNBits`` round to
nearest, dynamic INT8, HQQ 4-bit, and static INT8 QDQ calibrated on training sequences. The
calibrated 4-bit recipe (GPTQ on the PyTorch model, mixed precision) is in ``calibrated.py``."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .passes import fresh, quantize_embedding_rows, share_tied_embedding, untie_transposed_weights, untied_copy


def quantize_nbits(src: Path, dst: Path, bits: int, block_size: int, accuracy_level: int | None = None) -> Path:
    """Weight-only ``MatMulNBits`` (``bits`` = 4 or 8, symmetric, ``block_size`` weights per
    scale; the untied LM head included); the embedding table shares the 8-bit LM head's
    weights when they are tied (``share_tied_embedding``), else is stored int8 per row.
    ``accuracy_level=4`` lets the kernel quantize activations to int8 on the fly (faster
    on CPU); 0/None keeps fp32 activations. Measured on Gemma 3 270M (bench/results):
    weight-only INT8 leaves perplexity unchanged, 4-bit RTN weights raise it by ~40%
    (the accuracy level makes no difference), dynamic INT8 activations everywhere doubled it."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = untie_transposed_weights(onnx.load(str(src)))
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    out = quantizer.model.model
    if not share_tied_embedding(out):
        quantize_embedding_rows(out)
    quantizer.model.model = out
    fresh(dst)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst




def quantize_hqq4(src: Path, dst: Path, block_size: int, accuracy_level: int | None = None) -> Path:
    """HQQ 4-bit (half-quadratic optimisation of each block's scale and zero point; no calibration
    data), asymmetric ``MatMulNBits``; the embedding table int8 per row."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    model = untie_transposed_weights(onnx.load(str(src)))
    quantizer = MatMulNBitsQuantizer(model, accuracy_level=accuracy_level,
                                     algo_config=HQQWeightOnlyQuantConfig(block_size=block_size, bits=4))
    quantizer.process()
    quantize_embedding_rows(quantizer.model.model)
    fresh(dst)
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    return dst

def quantize_int8_dynamic(src: Path, dst: Path) -> Path:
    """``quantize_dynamic``: int8 per-channel weights, activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with untied_copy(src, dst) as tmp:
        quantize_dynamic(str(tmp), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, use_external_data_format=True)
    return dst


class Calibration:
    """``CalibrationDataReader`` over training sequences padded/truncated to a fixed shape."""

    def __init__(self, features: list[dict[str, list[int]]], shape: tuple[int, int], pad_id: int):
        self.batches: list[dict[str, np.ndarray]] = []
        b, s = shape
        for i in range(0, len(features), b):
            ids, mask = np.full((b, s), pad_id, np.int64), np.zeros((b, s), np.int64)
            for r, f in enumerate(features[i:i + b]):
                tok = f["input_ids"][:s]
                ids[r, :len(tok)], mask[r, :len(tok)] = tok, 1
            self.batches.append({"input_ids": ids, "attention_mask": mask})
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)


def quantize_qdq(src: Path, dst: Path, calibration: Calibration, op_types: list[str] | None) -> Path:
    """Static INT8 in QDQ format (uint8 activations, int8 per-channel weights, MinMax
    calibration); ``op_types=None`` quantizes every op ORT can (embedding Gather included)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return calibration.get_next()

    calibration.rewind()
    with untied_copy(src, dst) as tmp:
        quantize_static(str(tmp), str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=op_types,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=True, extra_options={"WeightSymmetric": True})
    return dst


def qdq_ops(op_types: list[str]) -> list[str] | None:
    return None if list(op_types) == ["all"] else list(op_types)


