"""Calibrated 4-bit weights: GPTQ on the merged PyTorch model, a per-layer sensitivity report, mixed
precision where that report shows it pays, and the exported graph's MatMuls rewritten as
``MatMulNBits`` with exactly those weights.

Why not round to nearest: on Gemma 3 270M RTN 4-bit loses +45% perplexity (base) and +251% after
fine-tuning. GPTQ quantizes each linear's input columns one at a time and spreads each rounding
error over the columns still to come, weighted by the inverse Hessian ``H = X^T X`` of that
linear's inputs on calibration sequences from the training data, so the *output* error is what
is minimised, not the weight error. Each block of ``block_size`` weights gets its own scale,
searched over a few clipping ratios (importance-weighted error, ``diag(H)``).

Units of the sensitivity report: each decoder block (its linears together) and the LM head (with a
tied embedding, the embedding too: one table). A unit's contribution is what it costs when only that
unit is 4-bit, measured on held-out rows: the divergence from the fp32 model's next-token
distributions (``KL``, read as the perplexity change it implies, ``exp(KL) - 1``), which unlike a
perplexity change on a few dozen rows is not noise of either sign. 8-bit candidates are taken most harmful per
stored byte first while the stored model (codes and scales, the weights outside the plan, the
graph) stays within ``max_size_ratio`` of the fp32 model's bytes (the size goal): each block whose contribution is at least
``min_contribution_pct``, and the LM head *row by row*. A large vocabulary is mostly tokens one
domain never uses (Gemma 3: 262k rows, 62% of the weights): the head's measured contribution is
shared among its rows by a second-order estimate (``head_row_scores``: each row's logit error
weighted by the probability the model puts on that token), so the rows that matter go 8-bit and
the rest stay 4-bit. The graph then computes the head as two ``MatMulNBits`` and puts the logits
back in vocabulary order; a tied embedding reads both parts. 8-bit codes use a coarser block
(``block_size_8bit``): their scales add 3% instead of 12.5% to each weight's byte.

The plan knows each linear's weight by a fingerprint of its exported ``MatMul`` weight, and the
fused weight of linears that read one input (onnxruntime-genai's builder packs q/k/v into one
``qkv_proj``), so it applies to the ``torch.onnx`` graph and to the builder's alike.

Pipeline: ``calibrate(model, ...)`` while the PyTorch model is loaded (one forward pass per
calibration sequence collects every Hessian at once; then GPTQ per linear, the report, the plan),
then ``write(onnx_in, onnx_out, plan)`` over the fp32 export (the model is freed by then).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .basequant import block_of, dequantize, linear_units, round_to_nearest, wide_block  # noqa: F401 (this module's API)

CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


# -- GPTQ ------------------------------------------------------------------------------------

def _best_scales(w: torch.Tensor, importance: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per row of ``w`` ``[rows, block]``: the scale (absmax x clip ratio / qmax) whose rounding error,
    weighted by the columns' ``importance``, is smallest."""
    import torch

    absmax = w.abs().amax(dim=1).clamp_min(1e-12)
    best, best_err = None, None
    for ratio in CLIP_RATIOS:
        s = absmax * ratio / qmax
        err = ((w - torch.clamp(torch.round(w / s[:, None]), qmin, qmax) * s[:, None]) ** 2 * importance).sum(1)
        if best is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def gptq(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block_size: int,
         percdamp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of ``weight`` ``[out, in]`` (symmetric, one scale per ``block_size`` inputs of an output
    row). Returns ``(q, scales)``: ``q`` uint8 ``[out, in]`` offset by ``2**(bits-1)`` (what
    ``MatMulNBits`` stores without zero points), ``scales`` float32 ``[out, in // block_size]``."""
    import torch

    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    H = hessian.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diag(H).to(torch.float32)
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)
    Q = torch.zeros(rows, cols, dtype=torch.int16)
    scales = torch.zeros(rows, cols // block_size)
    step = block_size * max(1, 128 // block_size)          # lazy-update width: whole scale blocks
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % block_size == 0:
                scales[:, col // block_size] = _best_scales(W1[:, i:i + block_size],
                                                            importance[col:col + block_size], qmin, qmax)
            s = scales[:, col // block_size]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / s), qmin, qmax)
            Q[:, col] = q.to(torch.int16)
            err = (w - q * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return (Q - qmin).to(torch.uint8).numpy(), scales.numpy().astype(np.float32)


# -- the model side ----------------------------------------------------------------------------

def hessians(model: Any, sequences: list[list[int]], linears: dict[str, torch.nn.Linear],
             shared_inputs: list[list[str]] | None = None,
             inputs: dict[str, list[torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """``X^T X / tokens`` of every linear's input over ``sequences`` (one forward each, unpadded).
    ``shared_inputs``, when given, receives the groups of linears (in call order) that read the
    very same input tensor (q/k/v, gate/up): exporters may fuse such a group into one ``MatMul``.
    ``inputs``, when given, ``{name: []}``: those linears' input rows are kept there too."""
    import torch

    H = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    count = {"tokens": 0}
    readers: dict[int, tuple[torch.Tensor, list[str]]] = {}   # the tensor is held: its id stays its own
    kept = inputs if inputs is not None else {}

    def hook(name: str) -> Callable[..., None]:
        def fn(_module: Any, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            if count["tokens"] == 0:                     # the first sequence: who reads which tensor
                readers.setdefault(id(inputs[0]), (inputs[0], []))[1].append(name)
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            H[name].addmm_(x.T, x)
            if name in kept:
                kept[name].append(x.clone())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.inference_mode():
            for ids in sequences:
                model(input_ids=torch.tensor([ids]), use_cache=False)
                count["tokens"] += len(ids)
    finally:
        for h in handles:
            h.remove()
    if shared_inputs is not None:
        shared_inputs.extend(g for _, g in readers.values() if len(g) > 1)
    return {n: h / max(count["tokens"], 1) for n, h in H.items()}


def fingerprint(matmul_weight: np.ndarray) -> str:
    """Identifies a linear's weight in the graph: the ONNX ``MatMul`` weight is the torch weight
    transposed (``[in, out]``); its shape and first rows, byte for byte."""
    head = np.ascontiguousarray(matmul_weight[:8], dtype=np.float32)
    return f"{matmul_weight.shape}:{hashlib.blake2b(head.tobytes(), digest_size=16).hexdigest()}"


def fused_fingerprint(weights: list[Any]) -> str:
    """The fingerprint of the ``MatMul`` an exporter builds for linears sharing one input
    (onnxruntime-genai's builder: ``qkv_proj``): their transposed weights side by side."""
    return fingerprint(np.concatenate([w.detach().T.numpy() for w in weights], axis=1))


def unit_bytes(params: int, bits: int, block_size: int) -> float:
    """Stored size of ``params`` weights as ``MatMulNBits``: the codes plus one fp32 scale per block."""
    return params * (bits / 8 + 4 / block_size)


def head_row_scores(weight: torch.Tensor, quantized: torch.Tensor, hidden: torch.Tensor,
                    softcap: float | None = None, chunk: int = 128) -> np.ndarray:
    """Per vocabulary row of the LM head: how much its 4-bit error costs, to second order.

    The cross-entropy's Hessian in the logits is ``diag(p) - p p^T``; its diagonal weights row
    ``v``'s logit error ``d_v = (W4_v - W_v) . h`` by the model's own probability ``p_v``:
    ``score_v = sum_t p_v(t) d_v(t)^2`` over the head's calibration inputs ``h_t`` (rows of
    ``hidden``). A row the model never puts mass on costs nothing, whatever its error: most of a
    large vocabulary (Gemma 3: 262k tokens) is such rows for one domain's text."""
    import torch

    delta = (quantized - weight.detach()).to(torch.float32)
    W = weight.detach().to(torch.float32)
    score = torch.zeros(W.shape[0], dtype=torch.float64)
    with torch.inference_mode():
        for i in range(0, hidden.shape[0], chunk):
            h = hidden[i:i + chunk]
            logits = h @ W.T
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            p = torch.softmax(logits, dim=-1)
            del logits
            score += (p * (h @ delta.T) ** 2).sum(0, dtype=torch.float64)
    return score.numpy()


@dataclass
class SplitRows:
    """An LM head whose vocabulary rows are split by precision: ``rows8`` (sorted) in 8 bits, the
    others (sorted) in 4; the graph computes both parts and puts the logits back in vocabulary order."""
    rows8: np.ndarray
    q8: np.ndarray
    s8: np.ndarray
    rows4: np.ndarray
    q4: np.ndarray
    s4: np.ndarray


@dataclass
class Plan:
    """What ``write`` puts into the graph: per linear (by fingerprint) its bits, codes and scales,
    or its rows split by precision (``split``: the LM head)."""
    block_size: int                       # the 4-bit codes' block (8-bit codes: see ``wide_block``)
    weights: dict[str, tuple[int, np.ndarray, np.ndarray]] = field(default_factory=dict)
    split: dict[str, SplitRows] = field(default_factory=dict)
    # asymmetric weights (``tuneops.export.adapters``): fingerprint -> fp32 zero points [N, K / block]
    zero_points: dict[str, np.ndarray] = field(default_factory=dict)
    units: dict[str, dict[str, Any]] = field(default_factory=dict)   # the sensitivity report
    perplexity: dict[str, float] = field(default_factory=dict)        # fp32, all 4-bit, the plan
    tied: bool = False
    other_bytes: float = 0.0              # what the graph stores besides the plan's linears (see ``other_bytes``,
                                          # plus the graph's own bytes: ``reserved_bytes``)
    model_bytes: float = 0.0              # the fp32 model's parameter bytes

    def report(self) -> dict[str, Any]:
        eight = [u for u, r in self.units.items() if r["bits"] == 8]
        stored = sum(r["bytes"] for r in self.units.values())
        fp32 = 4 * sum(r["params"] for r in self.units.values()) or 1
        head = self.units.get("lm_head", {})
        order = 4 * sum(len(sp.rows8) + len(sp.rows4) for sp in self.split.values())
        return {"algorithm": "GPTQ (block scales with clip search) + mixed precision per block and per LM-head row",
                "block_size": self.block_size, "units_8bit": eight, "weights_size_ratio": stored / fp32,
                "model_size_ratio": (stored + self.other_bytes + order) / (self.model_bytes or fp32),
                "lm_head_rows_8bit": head.get("rows_8bit", 0), "calibration_perplexity": self.perplexity,
                "sensitivity": self.units}


def calibrate(model: Any, sequences: list[list[int]], score: Callable[[], float], block_size: int,
              percdamp: float, min_contribution_pct: float, max_size_ratio: float,
              sensitivity: bool = True, head_rows: bool = True, head_positions: int = 1024,
              block_size_8bit: int | None = None, gate_score: Callable[[], float] | None = None,
              reserved_bytes: float = 0.0) -> Plan:
    """Hessians, GPTQ per linear, the per-unit sensitivity report and the mixed-precision plan.
    ``score()`` measures the PyTorch model as it is now (called with swapped weights) on held-out
    rows: ``{"perplexity", "kl"}`` (``lm.torch_distortion``; units are ranked by the KL), or a bare
    perplexity (units ranked by its change). ``gate_score()``, when given, is the perplexity on the
    gate's rows: the plan's weights are scored there too (``plan_pytorch_gate_rows``: what the
    quantized graph must reproduce). ``reserved_bytes`` (what quantization leaves as it is: the
    graph, norms, rotary caches; ``exporter.overhead_bytes``) count against the size goal with the
    weights outside the plan.

    8-bit candidates, taken most harmful per byte first while the size goal allows: each decoder
    block whose contribution is at least ``min_contribution_pct``, and (``head_rows``) the LM head
    row by row, its measured contribution shared among its rows by ``head_row_scores`` (on up to
    ``head_positions`` of the calibration tokens). 8-bit codes use ``wide_block(block_size_8bit)``."""
    import torch

    units = linear_units(model)
    linears = {n: m for members in units.values() for n, m in members
               if m.in_features % block_size == 0}
    head = next((n for n, _ in units.get("lm_head", []) if n in linears), None)
    groups: list[list[str]] = []
    kept: dict[str, list[torch.Tensor]] = {head: []} if head and sensitivity and head_rows else {}
    H = hessians(model, sequences, linears, groups, kept)
    q4 = {n: gptq(m.weight, H.pop(n), 4, block_size, percdamp) for n, m in linears.items()}
    params = {u: sum(m.weight.numel() for n, m in members if n in linears) for u, members in units.items()}
    total = sum(params.values()) or 1
    plan = Plan(block_size=block_size, tied=bool(getattr(model.config, "tie_word_embeddings", False)),
                other_bytes=other_bytes(model, linears) + reserved_bytes,
                model_bytes=4.0 * sum(p.numel() for p in model.parameters()))
    rows8: dict[str, np.ndarray] = {}            # linear -> its 8-bit rows (all of them: the whole linear)
    block8 = {n: wide_block(m.in_features, block_size, block_size_8bit or block_size) for n, m in linears.items()}

    def cost8(n: str, rows: int | None = None) -> float:
        """Bytes that ``rows`` (default: all) output rows of linear ``n`` add in 8-bit instead of 4."""
        m = linears[n]
        size = m.in_features * (m.out_features if rows is None else rows)
        return unit_bytes(size, 8, block8[n]) - unit_bytes(size, 4, block_size)

    codes8: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def rtn8(n: str) -> tuple[np.ndarray, np.ndarray]:
        """Linear ``n``'s 8-bit codes, rounded once (the plan's checks and its entries reuse them)."""
        if n not in codes8:
            codes8[n] = round_to_nearest(linears[n].weight, 8, block8[n])
        return codes8[n]

    def weight(n: str) -> torch.Tensor:
        """The plan's dequantized weight of linear ``n`` (4-bit, 8-bit, or rows of both)."""
        rows = rows8.get(n)
        if rows is None or len(rows) == 0:
            return dequantize(*q4[n], 4, block_size)
        w8 = dequantize(*rtn8(n), 8, block8[n])
        if len(rows) == linears[n].out_features:
            return w8
        w4 = dequantize(*q4[n], 4, block_size)
        w4[torch.from_numpy(rows)] = w8[torch.from_numpy(rows)]
        return w4

    def measured(scorer: Callable[[], Any] = score) -> dict[str, Any]:
        got = scorer()
        return got if isinstance(got, dict) else {"perplexity": got, "kl": None}

    def swapped(names: list[str], scorer: Callable[[], Any] = score) -> dict[str, Any]:
        saved = {n: linears[n].weight.data.clone() for n in names}
        try:
            for n in names:
                linears[n].weight.data.copy_(weight(n))
            return measured(scorer)
        finally:
            for n in names:
                linears[n].weight.data.copy_(saved[n])

    fp32 = measured()["perplexity"]
    plan.perplexity["pytorch_fp32"] = fp32
    for unit, members in units.items():
        names = [n for n, _ in members if n in linears]
        r = plan.units[unit] = {"params": params[unit], "ppl_change_pct_alone_4bit": None, "bits": 4,
                                "params_8bit": 0}
        if sensitivity and names:
            got = swapped(names)
            r["ppl_change_pct_alone_4bit"] = 100.0 * (got["perplexity"] / fp32 - 1.0)
            if got["kl"] is not None:
                r["kl_alone_4bit"] = got["kl"]
            # what ranks the units: the expected perplexity change the divergence implies
            # (exp(KL) - 1: the loss rise if the data were the model's own), else the measured change
            r["contribution_pct"] = (100.0 * math.expm1(got["kl"]) if got["kl"] is not None
                                     else r["ppl_change_pct_alone_4bit"])
    if sensitivity:
        plan.perplexity["all_4bit"] = swapped(list(linears))["perplexity"]
        row_bytes = 0.0
        candidates: list[tuple[float, str, int, float]] = []  # (contribution per byte, unit, row or -1, bytes)
        for unit, r in plan.units.items():
            change = r.get("contribution_pct")
            if change is None or change < min_contribution_pct:
                continue
            if unit == "lm_head" and kept.get(head):
                m = linears[head]
                scores = head_row_scores(m.weight, dequantize(*q4[head], 4, block_size),
                                         _spread(torch.cat(kept.pop(head)), head_positions),
                                         getattr(model.config, "final_logit_softcapping", None))
                row_bytes = cost8(head, 1)
                share = change * scores / max(scores.sum(), 1e-30) / row_bytes
                candidates += [(float(share[v]), unit, int(v), row_bytes) for v in np.flatnonzero(share > 0)]
            else:
                extra = sum(cost8(n) for n, _ in units[unit] if n in linears)
                candidates.append((change / extra, unit, -1, extra))
        # bytes left under the size goal once everything is 4-bit; each 8-bit unit costs the difference
        # (the size goal is the whole model's: the other weights and a split head's vocab-order table count)
        budget = (max_size_ratio * plan.model_bytes - unit_bytes(total, 4, block_size) - plan.other_bytes
                  - (4 * linears[head].out_features if row_bytes else 0))
        chosen_rows: list[int] = []
        for _, unit, row, extra in sorted(candidates, reverse=True):
            if extra > budget:
                continue
            budget -= extra
            if row >= 0:
                chosen_rows.append(row)
            else:
                plan.units[unit].update(bits=8, params_8bit=params[unit])
        if chosen_rows:
            m = linears[head]
            rows8[head] = np.array(sorted(chosen_rows), dtype=np.int64)
            plan.units["lm_head"].update(rows_8bit=len(chosen_rows), params_8bit=len(chosen_rows) * m.in_features)
            if len(chosen_rows) == m.out_features:
                plan.units["lm_head"]["bits"] = 8
    for unit, r in plan.units.items():
        names = [n for n, _ in units[unit] if n in linears]
        if r["bits"] == 8:
            rows8.update({n: np.arange(linears[n].out_features) for n in names})
        r["bytes"] = sum(unit_bytes(linears[n].weight.numel(), 4, block_size) + cost8(n, len(rows8.get(n, ())))
                         for n in names)
    chosen: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    for members in units.values():
        for n, m in members:
            if n not in linears:
                continue
            key = fingerprint(m.weight.detach().T.numpy())
            rows = rows8.get(n, np.zeros(0, dtype=np.int64))
            if 0 < len(rows) < m.out_features:        # rows of both widths (the LM head)
                q8, s8 = rtn8(n)
                rest = np.setdiff1d(np.arange(m.out_features), rows)
                plan.split[key] = SplitRows(rows, q8[rows], s8[rows], rest, q4[n][0][rest], q4[n][1][rest])
                continue
            q, s = rtn8(n) if len(rows) else q4[n]
            chosen[n] = plan.weights[key] = (8 if len(rows) else 4, q, s)
    for group in groups:                 # a fused MatMul: the members' rows stacked (one unit, one width)
        entries = [chosen.get(n) for n in group]
        if all(entries) and len({e[0] for e in entries}) == 1:
            plan.weights[fused_fingerprint([linears[n].weight for n in group])] = (
                entries[0][0], np.concatenate([e[1] for e in entries]), np.concatenate([e[2] for e in entries]))
    plan.perplexity["plan_pytorch"] = swapped(list(linears))["perplexity"]   # every linear as the graph has it
    if gate_score is not None:
        plan.perplexity["plan_pytorch_gate_rows"] = swapped(list(linears), gate_score)["perplexity"]
    return plan


def other_bytes(model: Any, linears: dict[str, Any]) -> float:
    """Bytes the quantized graph stores for the parameters outside ``linears``: an untied token
    embedding as int8 rows with one fp32 scale each (``passes.quantize_embedding_rows``), the rest
    (norms, biases) fp32. A tied embedding is the LM head's table: it is not counted twice."""
    inside = {id(m.weight) for m in linears.values()}
    embedding = model.get_input_embeddings().weight
    size = 0.0
    for p in model.parameters():
        if id(p) in inside:
            continue
        size += p.numel() + 4 * p.shape[0] if p is embedding else 4 * p.numel()
    return size


def _spread(x: torch.Tensor, n: int) -> torch.Tensor:
    """At most ``n`` rows of ``x``, evenly spaced (every calibration sequence is represented)."""
    import torch

    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).long()]


# -- the graph side ----------------------------------------------------------------------------

def pack(q: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """``MatMulNBits`` layout of offset codes ``q`` ``[N, K]``: ``[N, K / block, block * bits / 8]``
    uint8, 4-bit codes two per byte, the even element in the low nibble."""
    n, k = q.shape
    if bits == 4:
        q = (q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)
    return np.ascontiguousarray(q.reshape(n, k // block_size, block_size * bits // 8), dtype=np.uint8)


def _nbits_node(model: Any, x: str, name: str, bits: int, q: np.ndarray, scales: np.ndarray, block_size: int,
                out: str, accuracy_level: int | None, zero_points: np.ndarray | None = None) -> list[Any]:
    """A ``MatMulNBits`` of ``x`` with codes ``q`` ``[N, K]`` (its initializers added to ``model``), as
    a list of nodes. ``zero_points`` (fp32, one per block, unpacked): ``(q - zero) * scale`` instead of the
    symmetric ``(q - 2**(bits-1)) * scale``, stored as the symmetric op plus ``blocksum(x) @ offsets``
    (``basequant.asym_offsets``; the block sums by one small ``MatMul`` with a 0/1 matrix shared by every
    node of that ``K``): ONNX Runtime's float zero points run a reference kernel that dequantizes the
    whole weight on every call (SmolLM2's int4 base: 1.07 s per decode step against a few ms)."""
    from onnx import helper, numpy_helper

    from .basequant import asym_offsets

    n, k = q.shape
    packed = numpy_helper.from_array(pack(q, bits, block_size), f"{name}_Q{bits}")
    scale = numpy_helper.from_array(scales.reshape(-1).astype(np.float32), f"{name}_Q{bits}_scales")
    model.graph.initializer.extend([packed, scale])
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block_size}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    sym = out if zero_points is None else f"{out}_sym"
    nodes = [helper.make_node("MatMulNBits", [x, packed.name, scale.name], [sym], name=f"{name}_MatMulNBits{bits}",
                              domain="com.microsoft", **attrs)]
    if zero_points is None:
        return nodes
    blocks = k // block_size
    offsets = numpy_helper.from_array(np.ascontiguousarray(asym_offsets(scales.reshape(n, blocks),
                                                                        zero_points.reshape(n, blocks), bits).T),
                                      f"{name}_Q{bits}_offsets")
    model.graph.initializer.append(offsets)
    sums = f"blocksum_K{k}_B{block_size}"
    if not any(i.name == sums for i in model.graph.initializer):
        ones = np.zeros((k, blocks), np.float32)
        ones[np.arange(k), np.arange(k) // block_size] = 1.0
        model.graph.initializer.append(numpy_helper.from_array(ones, sums))
    return nodes + [
        helper.make_node("MatMul", [x, sums], [f"{out}_blocksum"], name=f"{name}_blocksum"),
        helper.make_node("MatMul", [f"{out}_blocksum", offsets.name], [f"{out}_offset"], name=f"{name}_offset"),
        helper.make_node("Add", [sym, f"{out}_offset"], [out], name=f"{name}_asym")]


def apply(model: Any, plan: Plan, accuracy_level: int | None) -> dict[str, int]:
    """Rewrite each ``MatMul`` whose weight the plan knows as ``MatMulNBits`` with the plan's codes
    (in place); MatMuls the plan does not know stay as they are. A split LM head becomes two
    ``MatMulNBits`` (8-bit rows, 4-bit rows), ``Concat`` and a ``Gather`` back to vocabulary order.
    Returns counts per bit width (a split head counts once as ``split``)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    users: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    counts = {"4": 0, "8": 0, "split": 0, "unmatched": 0}
    nodes: list[Any] = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            nodes.append(node)
            continue
        B = numpy_helper.to_array(inits[node.input[1]])
        key = fingerprint(B) if B.ndim == 2 else None
        entry, split = plan.weights.get(key), plan.split.get(key)
        name, x = node.input[1], node.input[0]
        if entry is not None:
            bits, q, scales = entry
            nodes += _nbits_node(model, x, name, bits, q, scales, block_of(q, scales), node.output[0],
                                 accuracy_level, plan.zero_points.get(key))
            counts[str(bits)] += 1
        elif split is not None:
            order = np.empty(len(split.rows8) + len(split.rows4), dtype=np.int32)
            order[np.concatenate([split.rows8, split.rows4])] = np.arange(len(order))  # vocab id -> its column
            model.graph.initializer.append(numpy_helper.from_array(order, f"{name}_order"))
            nodes += [*_nbits_node(model, x, f"{name}_rows8", 8, split.q8, split.s8, block_of(split.q8, split.s8),
                                   f"{name}_logits8", accuracy_level),
                      *_nbits_node(model, x, f"{name}_rows4", 4, split.q4, split.s4, block_of(split.q4, split.s4),
                                   f"{name}_logits4", accuracy_level),
                      helper.make_node("Concat", [f"{name}_logits8", f"{name}_logits4"], [f"{name}_logits84"],
                                       name=f"{name}_concat", axis=-1),
                      helper.make_node("Gather", [f"{name}_logits84", f"{name}_order"], list(node.output),
                                       name=f"{name}_vocab_order", axis=-1)]
            counts["split"] += 1
        else:
            counts["unmatched"] += 1
            nodes.append(node)
            continue
        users[name] -= 1
        if users[name] == 0:
            model.graph.initializer.remove(inits.pop(name))
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return counts


def write(src: Path, dst: Path, plan: Plan, accuracy_level: int | None) -> dict[str, Any]:
    """The fp32 export at ``src`` with the plan's weights, the embedding table stored once (the tied
    LM head's codes, split or not, else int8 rows), saved at ``dst``."""
    import onnx

    from .passes import fresh, quantize_embedding_rows, share_split_embedding, share_tied_embedding
    from .passes import untie_transposed_weights

    model = untie_transposed_weights(onnx.load(str(src)))
    counts = apply(model, plan, accuracy_level)
    shared = 0
    if plan.tied:
        shared = share_split_embedding(model) if counts["split"] else share_tied_embedding(model, tied=True)
    if not shared:
        quantize_embedding_rows(model)
    fresh(dst)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return {"matmuls": counts, "embedding": "shared with the LM head's codes" if shared else "int8 rows"}
