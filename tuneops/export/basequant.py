"""The base quantizer of quantization-aware LoRA, one definition for training and export.

``BaseQuant`` (``BASE_QUANTS`` by name) says how the shared base graph (``tuneops/export/adapters.py``)
stores the frozen weights; ``fake_quantize`` gives a PyTorch model exactly those weights (what
method ``qat_int4`` trains against, ``tuneops/training/methods.py``), ``base_codes`` the codes the
graph's ``MatMulNBits`` store. ``int4``: every linear of the decoder blocks asymmetric 4-bit, one
fp32 scale and zero point per block of 32 inputs (``quantize_asym`` / ``dequantize_asym``); the LM
head (and a tied embedding) 8-bit symmetric round to nearest (``round_to_nearest``, also the
calibrated recipe's 8-bit units: ``tuneops/export/calibrated.py`` imports the shared helpers from
here). ``read_base`` / ``check_base``: the base graph an exported adapter needs, checked before it
is served. Only numpy and torch: the stages that train and serve import it without the export package.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER_FILE = "adapter.onnx_adapter"     # an exported adapter (ONNX Runtime adapter format)
ADAPTER_JSON = "adapter.json"             # ... and the base graph it needs
BASE_JSON = "base.json"                   # beside a base graph: what it is (md5, quant, model, LoRA slots)


class BaseMismatch(ValueError):
    """An adapter whose base graph is not the one offered (another model or another quantization)."""


def linear_units(model: Any) -> dict[str, list[tuple[str, torch.nn.Linear]]]:
    """``{unit: [(module name, Linear)]}``: ``layer.<i>`` per decoder block, then ``lm_head`` (the
    output embedding; with tied embeddings the same table as the input embedding)."""
    import torch

    names = {id(m): n for n, m in model.named_modules()}
    units: dict[str, list[tuple[str, torch.nn.Linear]]] = {}
    for i, layer in enumerate(model.get_decoder().layers):
        units[f"layer.{i}"] = [(names[id(m)], m) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        units["lm_head"] = [(names[id(head)], head)]
    return units


def round_to_nearest(weight: torch.Tensor, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round to nearest, absmax scale per block (the 8-bit units; ~lossless at 8 bits)."""
    import torch

    W = weight.detach().to(torch.float32)
    rows, cols = W.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    blocks = W.reshape(rows, cols // block_size, block_size)
    s = blocks.abs().amax(-1).clamp_min(1e-12) / qmax
    q = torch.clamp(torch.round(blocks / s[..., None]), qmin, qmax).reshape(rows, cols)
    return (q - qmin).to(torch.uint8).numpy(), s.numpy().astype(np.float32)


def dequantize(q: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> torch.Tensor:
    import torch

    rows, cols = q.shape
    x = (q.astype(np.float32) - 2 ** (bits - 1)).reshape(rows, cols // block_size, block_size)
    return torch.from_numpy((x * scales[..., None]).reshape(rows, cols))


def block_of(q: np.ndarray, scales: np.ndarray) -> int:
    """The block size of codes ``q`` ``[N, K]`` with ``scales`` ``[N, K / block]``."""
    return q.shape[1] // scales.shape[1]


def wide_block(in_features: int, block_size: int, block_size_8bit: int) -> int:
    """The 8-bit units' block: ``block_size_8bit`` (a coarser block: 8-bit codes barely need the
    finer scales, and the bytes saved buy more 8-bit units), halved until it divides the input width."""
    b = max(block_size_8bit, block_size)
    while in_features % b and b > block_size:
        b //= 2
    return b


@dataclass(frozen=True)
class BaseQuant:
    """How the shared base graph stores the frozen weights (``bits=0``: not quantized)."""

    name: str
    bits: int = 4                 # decoder-block linears: asymmetric, fp32 scale + zero point per block
    block_size: int = 32
    head_bits: int = 8            # the LM head (+ a tied embedding): symmetric round to nearest
    head_block: int = 128         # its block (halved until it divides the hidden size)

    @property
    def id(self) -> str:
        if not self.bits:
            return self.name
        return f"{self.name}(asym{self.bits} block {self.block_size}, head sym{self.head_bits} block {self.head_block})"


BASE_QUANTS: dict[str, BaseQuant] = {q.name: q for q in (BaseQuant("fp32", bits=0), BaseQuant("int4"))}


def base_quant(name: str) -> BaseQuant:
    if name not in BASE_QUANTS:
        raise ValueError(f"unknown base quantization {name!r}; known: {sorted(BASE_QUANTS)} (tuneops/export/adapters.py)")
    return BASE_QUANTS[name]


def quantize_asym(weight: Any, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric min-max quantization of ``weight`` ``[N, K]``, one scale and zero point per block
    of ``block_size`` consecutive inputs. Returns ``(q, scales, zero_points)``: ``q`` uint8 ``[N, K]``
    in ``0 .. 2**bits - 1``, ``scales`` and ``zero_points`` fp32 ``[N, K / block]``; the weight is
    ``(q - zero) * scale`` (``dequantize_asym``). A block on an affine grid of ``2**bits`` levels
    spanning its min and max (a Q4_1 block) is represented as it is."""
    w = weight.detach().to("cpu").float().numpy() if hasattr(weight, "detach") else np.asarray(weight, np.float32)
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"quantize_asym: {k} inputs are not a multiple of the block size {block_size}")
    blocks = w.reshape(n, k // block_size, block_size)
    lo, hi = blocks.min(-1), blocks.max(-1)
    levels = np.float32(2 ** bits - 1)
    scales = ((hi - lo) / levels).astype(np.float32)
    scales = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float32)   # a constant block: any scale
    zero = (-lo / scales).astype(np.float32)
    q = np.clip(np.rint((blocks - lo[..., None]) / scales[..., None]), 0, levels).astype(np.uint8)
    return q.reshape(n, k), scales, zero


def asym_offsets(scales: np.ndarray, zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Per block, what an asymmetric weight adds to the symmetric ``MatMulNBits``'s ``(q - 2**(bits-1)) * scale``:
    ``(2**(bits-1) - zero) * scale``, fp32 ``[N, K / block]``. The graph stores the codes symmetric (ONNX
    Runtime's fast int4 kernels take integer zero points only; a Q4_1 block's is fractional) and adds
    ``blocksum(x) @ offsets`` (``calibrated._nbits_node``)."""
    return ((np.float32(2 ** (bits - 1)) - zero_points.astype(np.float32)) * scales.astype(np.float32)).astype(np.float32)


def dequantize_asym(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, block_size: int,
                    bits: int = 4) -> np.ndarray:
    """``(q - zero) * scale`` per block, fp32 ``[N, K]``, computed as the graph stores it: the symmetric
    ``(q - 2**(bits-1)) * scale`` plus the block's offset (``asym_offsets``)."""
    n, k = q.shape
    sym = (q.astype(np.float32).reshape(n, k // block_size, block_size) - np.float32(2 ** (bits - 1))) \
        * scales.astype(np.float32)[..., None]
    x = sym + asym_offsets(scales, zero_points, bits)[..., None]
    return x.reshape(n, k).astype(np.float32)


@dataclass
class Codes:
    """One linear's stored weights: ``bits``, codes ``q`` ``[N, K]``, ``scales``, ``zero_points``
    (None: symmetric, the ``calibrated`` layout)."""
    bits: int
    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None

    def dequantize(self) -> np.ndarray:
        block = block_of(self.q, self.scales)
        if self.zero_points is not None:
            return dequantize_asym(self.q, self.scales, self.zero_points, block, self.bits)
        return dequantize(self.q, self.scales, self.bits, block).numpy()


def base_codes(model: Any, quant: BaseQuant) -> dict[str, Codes]:
    """The stored weights of every linear ``quant`` quantizes, by module name: the decoder blocks'
    linears (``bits``, asymmetric) and the LM head (``head_bits``, symmetric)."""
    if not quant.bits:
        return {}
    codes: dict[str, Codes] = {}
    for unit, members in linear_units(model).items():
        for name, m in members:
            if unit == "lm_head":
                if m.in_features % quant.block_size == 0:
                    block = wide_block(m.in_features, quant.block_size, quant.head_block)
                    codes[name] = Codes(quant.head_bits, *round_to_nearest(m.weight, quant.head_bits, block),
                                        None)
            elif m.in_features % quant.block_size == 0:
                codes[name] = Codes(quant.bits, *quantize_asym(m.weight, quant.bits, quant.block_size))
    return codes


def fake_quantize(model: Any, quant: BaseQuant) -> dict[str, Codes]:
    """Replace the weights ``quant`` stores quantized by their dequantized values (in place, fp32 or
    the model's dtype): the forward then computes with exactly the base the export writes (a tied
    embedding is the LM head's table: it gets the head's values, as the graph's shared lookup does).
    Returns the codes (``base_codes``)."""
    import torch

    codes = base_codes(model, quant)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, c in codes.items():
            w = modules[name].weight
            w.data.copy_(torch.from_numpy(c.dequantize()).to(w.dtype))
    return codes


# -- which base graph an adapter needs (read by the runtimes) -------------------------------

def read_base(path: Path) -> dict[str, Any]:
    f = Path(path).parent / BASE_JSON
    if not f.is_file():
        raise BaseMismatch(f"{path}: not an adapter base graph (no {BASE_JSON} beside it)")
    return json.loads(f.read_text())


def describe(base: dict[str, Any]) -> str:
    return f"{base.get('model') or 'model'} {base['quant']} base graph md5 {base['md5']}"


def check_base(adapter_dir: Path, base_path: Path) -> dict[str, Any]:
    """The adapter's record, after checking that ``base_path`` is the base graph it needs;
    ``BaseMismatch`` names both otherwise."""
    adapter_dir = Path(adapter_dir)
    f = adapter_dir / ADAPTER_JSON
    if not f.is_file():
        raise BaseMismatch(f"{adapter_dir}: no {ADAPTER_JSON} (not an exported adapter)")
    info = json.loads(f.read_text())
    need, have = info["base"], read_base(base_path)
    if need["md5"] != have["md5"] or need["quant"] != have["quant"]:
        raise BaseMismatch(f"adapter {adapter_dir} needs the {describe(need)}; {base_path} is the {describe(have)}: "
                           f"refused (serve it over its own base)")
    return info
