"""Accumulators between a conv/linear and its requantization (a ReLU clamp or a max pool on the
accumulator, then one requantization), exported so that onnxruntime computes the int-sim's
integers (docs/export.md, "Accumulators").

In ``format=qoperator`` the int32 accumulator of ConvInteger/MatMulInteger (+ the int32 bias) is
cast to float32 (``accf``: the float32 value of each accumulator, exactly the int-sim's
``float32(acc)``); a clamp is Max/Min with the integer bounds and a max pool is MaxPool on those
values (rounding to float32 is monotone, so both commute with it); the ``float-rne``
requantization is ``QuantizeLinear(float32(acc) · M, 1, z)`` with the int-sim's float32
multiplier ``M`` (one float32 product and one round-half-even, as the int-sim). In ``format=qdq``
the accumulator is the float Conv/Gemm output (real units): clamp and max pool run on it in float
and QuantizeLinear requantizes (float rounding order differs: not bit-exact by construction).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qpasses.errors import ExportError
from qpasses.export.onnx_values import OnnxGraph, Val

__all__ = ["acc_clamp", "acc_max_pool", "acc_requantize", "as_acc_values"]

FLOAT = 1      # onnx.TensorProto.FLOAT


def _channels(v: Val, rank: int) -> list[int]:
    """Broadcast shape of a per-channel constant on a rank-``rank`` accumulator."""
    return [-1] + [1] * (rank - 2) if v.axis == 1 and rank > 2 else [-1]


def as_acc_values(g: OnnxGraph, v: Val, name: str, rank: int) -> Val:
    """An int32 accumulator as float32 accumulator values (``accf``); other values unchanged."""
    if v.kind == "acc" and v.dtype == "int32":
        y = g.node("Cast", [v.name], f"{name}/acc_float", to=FLOAT)
        return Val(y, "accf", "float32", v.scale, 0, v.qmin, v.qmax, axis=v.axis, rank=rank)
    return v


def acc_clamp(g: OnnxGraph, v: Val, lo: np.ndarray, hi: np.ndarray, name: str,
              rank: int) -> Val:
    """Clamp an accumulator to the per-channel integer bounds ``[lo, hi]``."""
    v = as_acc_values(g, v, name, rank)
    if v.kind not in ("accf", "acc"):
        raise ExportError(f"export-onnx: '{name}': integer clamp on a {v.kind} value")
    # accf holds accumulator units; a float32 acc (qdq) holds real units
    unit = np.ones(1) if v.kind == "accf" else np.asarray(v.scale, dtype=np.float64).reshape(-1)
    lo_v, hi_v = lo.reshape(-1) * unit, hi.reshape(-1) * unit
    shape = _channels(v, rank)
    if np.all(lo_v == 0) and v.qmax and np.all(hi.reshape(-1) >= v.qmax):
        y = g.node("Relu", [v.name], name, out=name)
    else:
        y = g.node("Max", [v.name, g.const(f"{name}.lo", lo_v.reshape(shape), "float32")],
                   f"{name}/max")
        y = g.node("Min", [y, g.const(f"{name}.hi", hi_v.reshape(shape), "float32")], name,
                   out=name)
    return Val(y, v.kind, "float32", v.scale, 0, max(v.qmin, int(lo.min())),
               min(v.qmax, int(hi.max())), axis=v.axis, rank=rank)


def acc_max_pool(g: OnnxGraph, v: Val, name: str, attrs: dict[str, Any], rank: int) -> Val:
    """MaxPool on an accumulator (float32 values: ONNX MaxPool takes no int32)."""
    v = as_acc_values(g, v, name, rank)
    y = g.node("MaxPool", [v.name], name, out=name, **attrs)
    return Val(y, v.kind, "float32", v.scale, 0, v.qmin, v.qmax, axis=v.axis, rank=rank)


def acc_requantize(g: OnnxGraph, v: Val, rq: Any, grid: tuple[float, int, int, int], name: str,
                   rank: int) -> Val | None:
    """The ``float-rne`` requantization of accumulator values, bit-exact:
    ``QuantizeLinear(float32(acc) · M, 1, z)`` then the range clip; None when it does not apply
    (another contract, an input zero point, a float32 qdq accumulator)."""
    v = as_acc_values(g, v, name, rank)
    if v.kind != "accf" or rq.rounding != "float-rne" or rq.in_zero_point:
        return None
    s, z, lo, hi = grid
    m = rq.scale_f32.detach().numpy().astype(np.float32).reshape(-1)
    x = g.node("Mul", [v.name, g.const(f"{name}.multiplier", m.reshape(_channels(v, rank)
                                                                       if m.size > 1 else []),
                                         "float32")], f"{name}/scaled")
    q = g.quantize(x, f"{name}/unit", 1.0, z, lo, hi)
    # the codes are on the output grid (scale s); the unit-scale QuantizeLinear only rounded
    y = g.node("Identity", [q.name], name, out=name)
    return Val(y, "codes", q.dtype, float(s), z, q.qmin, q.qmax, shift=q.shift)
