"""The oracle's arithmetic for the transformer modules (:class:`IntMatMul`, :class:`IntSoftmax`,
:class:`IntLayerNorm`), written from docs/int-sim.md ("Transformer kernels") in numpy int64 and
Python integers: the matmul as ``np.matmul`` of centred int64 codes, the softmax exponent table
re-derived with ``math.exp`` and the division by floor division, the LayerNorm square root by
``math.isqrt`` and bit lengths by ``int.bit_length``, the requantizations by
:func:`qpasses.algorithms.int_sim_reference.requant_ref` (multipliers re-derived from the real
scales). Hooked into :class:`~qpasses.algorithms.int_sim_reference.ReferenceInterpreter`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_transformer import IntLayerNorm, IntMatMul, IntSoftmax

__all__ = ["TRANSFORMER_IMPLS", "exp_table_ref", "layer_norm_ref", "normalized_ref",
           "softmax_probabilities_ref"]

_I64 = np.int64


def _requant(rq: Requantize, x: np.ndarray) -> np.ndarray:
    from qpasses.algorithms.int_sim_reference import requant_ref   # (it imports this module)
    return requant_ref(x, rq.real.numpy(), rq.rounding, rq.multiplier_bits, None,
                       rq.out_zero_point, rq.qmin, rq.qmax, rq.scale_f32.numpy())


def _matmul(mod: IntMatMul, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ca = a.astype(_I64) - mod.a_zero_point
    cb = b.astype(_I64) - mod.b_zero_point
    k = ca.shape[-1]
    if k * max(int(np.abs(ca).max(initial=0)), 1) * max(int(np.abs(cb).max(initial=0)), 1) \
            >= 2 ** 63:
        raise ValueError("matmul accumulator may leave int64")
    acc = np.matmul(ca, cb)
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
    fl = np.floor_divide(v, p)
    rem = v - fl * p
    half = p // 2
    tie = rem == half
    if mode == "rhu":
        up = (rem > half) | tie
    elif mode == "rha":
        up = (rem > half) | (tie & (v >= 0))
    else:
        up = (rem > half) | (tie & (fl % 2 == 1))
    return fl + up.astype(_I64)


_MODE = {"gemmlowp": "rha", "single": "rhu", "hawq": "rne", "float-rne": "rne"}


def layer_norm_ref(q: np.ndarray, mod: IntLayerNorm) -> np.ndarray:
    """The LayerNorm contract: numpy int64 for the elementwise steps, Python integers for the
    per-row square root and reciprocal."""
    lead = q.shape[:q.ndim - mod.n_dims]
    x = q.astype(_I64).reshape(lead + (mod.n,)) - mod.in_zero_point
    nv = normalized_ref(x, mod.n, mod.frac_bits, mod.eps_codes)
    acc = nv * mod.gain.numpy() + mod.bias.numpy()
    y = _round_pow2(acc, mod.out_frac_bits, _MODE[mod.rounding])
    return np.clip(y + mod.out_zero_point, mod.qmin, mod.qmax).reshape(q.shape)


def normalized_ref(x: np.ndarray, n: int, k: int, eps_codes: int) -> np.ndarray:
    """``n_i`` of centred codes ``x`` (last dim = the n normalized values)."""
    total = x.sum(-1, keepdims=True)
    mu = np.floor_divide(total * 2 ** (k + 1) + n, 2 * n)
    c = x * 2 ** k - mu
    if np.abs(c).max(initial=0) >= 2 ** 31:
        raise ValueError("layer norm: centred value beyond 2^31")
    sq = c * c
    if float(sq.astype(np.float64).sum(-1).max(initial=0)) + n * eps_codes >= 2.0 ** 62:
        raise ValueError("layer norm: T reached 2^62")
    t = sq.sum(-1, keepdims=True) + n * eps_codes
    shift = np.zeros_like(t)
    inv = np.zeros_like(t)
    for idx in np.ndindex(*t.shape):
        tv = max(int(t[idx]), 1)
        u = (62 - tv.bit_length()) // 2
        r = math.isqrt(tv * 4 ** u)
        shift[idx], inv[idx] = u, (2 ** 62 + r) // (2 * r)
    prod = (c * np.power(2, shift)) * inv
    return np.floor_divide(prod + 2 ** 30, 2 ** 31)


def _layer_norm(mod: IntLayerNorm, q: np.ndarray) -> np.ndarray:
    return layer_norm_ref(q, mod)


TRANSFORMER_IMPLS: dict[type, Any] = {IntMatMul: _matmul, IntSoftmax: _softmax,
                                      IntLayerNorm: _layer_norm}
