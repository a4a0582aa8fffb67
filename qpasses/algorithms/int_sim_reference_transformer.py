"""The oracle's arithmetic for the transformer modules (:class:`IntMatMul`, :class:`IntSoftmax`,
:class:`IntLayerNorm`), written from docs/int-sim.md ("Transformer kernels") in numpy int64 and
Python integers: the matmul as ``np.matmul`` of centred int64 codes, the softmax exponent table
re-derived with ``math.exp`` and the division by floor division, the LayerNorm square root and
bit lengths exact on whole int64 arrays (a float estimate corrected by integer comparisons,
:mod:`qpasses.algorithms.int_sim_reference_kernels`), the requantizations by
:func:`qpasses.algorithms.int_sim_reference.requant_ref` (multipliers re-derived from the real
scales). Hooked into :class:`~qpasses.algorithms.int_sim_reference.ReferenceInterpreter`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qpasses.algorithms.int_sim_reference_kernels import (bit_length_vec, code_dtype,
                                                          exact_matmul, isqrt_vec)
from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_transformer import (IntL2Normalize, IntLayerNorm, IntMatMul,
                                                 IntSoftmax)
from qpasses.numerics.native_norm_reference import layer_norm_codes

__all__ = ["TRANSFORMER_IMPLS", "exp_table_ref", "layer_norm_ref", "matmul_acc",
           "normalized_ref", "requant_of", "softmax_probabilities_ref"]

_I64 = np.int64


def requant_of(rq: Requantize, x: np.ndarray) -> np.ndarray:
    """``rq`` applied to an accumulator, multipliers re-derived from its real scales."""
    return _requant(rq, x)


def _requant(rq: Requantize, x: np.ndarray) -> np.ndarray:
    from qpasses.algorithms.int_sim_reference import requant_ref   # (it imports this module)
    return requant_ref(x, rq.real.numpy(), rq.rounding, rq.multiplier_bits, None,
                       rq.out_zero_point, rq.qmin, rq.qmax, rq.scale_f32.numpy())


def matmul_acc(mod: IntMatMul, a: np.ndarray, b: np.ndarray,
               keep_float: bool = False) -> np.ndarray:
    """``(a − z_a) @ (b − z_b)`` exactly (float BLAS only under its exactness bound, else int64;
    ``keep_float``: the exact float result as it is, for a requantization to read)."""
    return exact_matmul(a, b, keep_float=keep_float,
                        zero_points=(mod.a_zero_point, mod.b_zero_point))


def _matmul(mod: IntMatMul, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    acc = matmul_acc(mod, a, b)
    return acc if mod.requant is None else _requant(mod.requant, acc)


def exp_table_ref(scale: float, span: int, frac_bits: int, given: np.ndarray) -> np.ndarray:
    """``rne(exp(−s·d)·2^F)`` by ``math.exp``; where a float64 product lies within 2^-20 of a
    tie the two libraries may round apart, so there (only) the module's entry is taken, and it
    must be one of the two neighbours."""
    out = np.empty(span + 1, dtype=_I64)
    for d in range(span + 1):
        v = math.exp(-scale * d) * (1 << frac_bits)
        r = round(v)
        if abs(v - math.floor(v) - 0.5) < 2.0 ** -20 and int(given[d]) in (math.floor(v),
                                                                          math.ceil(v)):
            r = int(given[d])
        out[d] = r
    if given.shape != out.shape or not np.array_equal(given, out):
        raise ValueError("softmax exponent table differs from exp(−s·d)·2^F")
    return out


def softmax_probabilities_ref(q: np.ndarray, dim: int, table: np.ndarray,
                              frac_bits: int) -> np.ndarray:
    """``p_i = floor((e_i·2^(F+1) + S) / 2S)`` with ``e_i = E[max q − q_i]``."""
    x = q.astype(_I64)
    d = np.max(x, axis=dim, keepdims=True) - x
    e = table[d]
    s = np.sum(e, axis=dim, keepdims=True)
    return np.floor_divide(e * (2 ** (frac_bits + 1)) + s, 2 * s)


def _softmax(mod: IntSoftmax, q: np.ndarray) -> np.ndarray:
    table = exp_table_ref(mod.in_scale, mod.table.numel() - 1, mod.frac_bits, mod.table.numpy())
    return _requant(mod.requant, softmax_probabilities_ref(q, mod.dim, table, mod.frac_bits))


def _round_pow2(v: np.ndarray, r: int, mode: str) -> np.ndarray:
    """``v / 2^r`` rounded half away / up / even, by floor division."""
    if r == 0:
        return v
    p = 1 << r
    fl = np.right_shift(v, r)                   # floor(v / 2^r): arithmetic shift of int64
    rem = np.bitwise_and(v, p - 1)              # v − fl·2^r, in [0, 2^r) (two's complement)
    half = p // 2
    tie = rem == half
    if mode == "rhu":
        up = (rem > half) | tie
    elif mode == "rha":
        up = (rem > half) | (tie & (v >= 0))
    else:
        up = (rem > half) | (tie & (np.bitwise_and(fl, 1) == 1))
    return fl + up.astype(_I64)


_MODE = {"gemmlowp": "rha", "single": "rhu", "hawq": "rne", "float-rne": "rne"}


def layer_norm_ref(q: np.ndarray, mod: IntLayerNorm) -> np.ndarray:
    """The LayerNorm contract: compiled from the same definitions where it applies
    (:func:`qpasses.numerics.native_norm_reference.layer_norm_codes`), else numpy int64 for the
    elementwise steps and whole-array integer square roots and reciprocals per row."""
    dt = code_dtype(mod.qmin, mod.qmax)
    y = layer_norm_codes(q, mod.n, mod.in_zero_point, mod.frac_bits, mod.eps_codes,
                         not isinstance(mod, IntL2Normalize), mod.gain.numpy(), mod.bias.numpy(),
                         mod.out_frac_bits, _MODE[mod.rounding], mod.out_zero_point, mod.qmin,
                         mod.qmax, dt)          # compiled, three passes per row; else numpy:
    if y is not None:
        return y
    lead = q.shape[:q.ndim - mod.n_dims]
    x = q.astype(_I64).reshape(lead + (mod.n,)) - mod.in_zero_point
    nv = normalized_ref(x, mod.n, mod.frac_bits, mod.eps_codes,
                        center=not isinstance(mod, IntL2Normalize))
    acc = nv * mod.gain.numpy() + mod.bias.numpy()
    y = _round_pow2(acc, mod.out_frac_bits, _MODE[mod.rounding])
    return np.clip(y + mod.out_zero_point, mod.qmin, mod.qmax).astype(dt).reshape(q.shape)


def normalized_ref(x: np.ndarray, n: int, k: int, eps_codes: int,
                   center: bool = True) -> np.ndarray:
    """``n_i`` of centred codes ``x`` (last dim = the n normalized values); ``center=False``:
    the L2 normalization (no mean, ``T = max(Σc², E)``)."""
    total = x.sum(-1, keepdims=True)
    mu = np.floor_divide(total * 2 ** (k + 1) + n, 2 * n) if center else 0
    c = x * 2 ** k - mu
    if np.abs(c).max(initial=0) >= 2 ** 31:
        raise ValueError("layer norm: centred value beyond 2^31")
    sq = c * c
    if float(sq.astype(np.float64).sum(-1).max(initial=0)) + \
            (n * eps_codes if center else 0) >= 2.0 ** 62:
        raise ValueError("layer norm: T reached 2^62")
    t = sq.sum(-1, keepdims=True) + n * eps_codes if center else \
        np.maximum(sq.sum(-1, keepdims=True), eps_codes)
    # per row, as whole arrays: u = (62 − bitlen T) // 2, r = isqrt(T·4^u), 1/r in 2^61 units
    tv = np.maximum(t, 1)
    shift = (62 - bit_length_vec(tv)) // 2
    r = isqrt_vec(tv << (2 * shift))
    inv = ((1 << 62) + r) // (2 * r)
    prod = (c * np.power(2, shift)) * inv
    return np.right_shift(prod + 2 ** 30, 31)    # floor(/2^31): arithmetic shift of int64


def _layer_norm(mod: IntLayerNorm, q: np.ndarray) -> np.ndarray:
    return layer_norm_ref(q, mod)


def _l2_normalize(mod: IntL2Normalize, q: np.ndarray) -> np.ndarray:
    return np.moveaxis(layer_norm_ref(np.moveaxis(q, mod.dim, -1), mod), -1, mod.dim)


TRANSFORMER_IMPLS: dict[type, Any] = {IntMatMul: _matmul, IntSoftmax: _softmax,
                                      IntLayerNorm: _layer_norm, IntL2Normalize: _l2_normalize}
