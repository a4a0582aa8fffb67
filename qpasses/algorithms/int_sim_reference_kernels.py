"""Whole-tensor kernels of the integer oracle (:mod:`qpasses.algorithms.int_sim_reference`).

Written from docs/int-sim.md ("Integer arithmetic", "Transformer kernels" and "Verifying it
fast") in numpy, independent of ``qpasses.numerics``:

* :func:`quantize_multipliers_exact` — TFLite QuantizeMultiplier for a whole vector of real
  multipliers in exact integer arithmetic: ``frexp`` splits ``m = f·2^e`` exactly, the 53-bit
  mantissa ``M = f·2^53`` is an integer, and ``round_half_up(f·2^bits)`` is
  ``(M + 2^(52−bits)) >> (53−bits)``;
* :func:`exact_matmul` — an integer matrix product; on float64 BLAS only when the accumulator bound
  ``K·max|a|·max|b| < 2^53`` proves every partial sum exact (float32 under ``2^24``, when torch's
  float32 matmul precision is "highest", i.e. no reduced-precision internals), else int64 (the
  float products run
  through ``torch.matmul``, which honours ``torch.set_num_threads``: numpy's own BLAS pool
  oversubscribes a shared machine);
* :func:`conv_exact` — convolution as a sum over kernel offsets of strided slices, each offset one
  (batched) exact matmul, depthwise as a broadcast multiply;
* :func:`isqrt_vec` and :func:`bit_length_vec` — ``floor(√v)`` and ``int.bit_length`` for int64
  arrays below 2^62: a float estimate corrected by integer comparisons.
"""
from __future__ import annotations

import itertools
import numpy as np
import torch

__all__ = ["bit_length_vec", "conv_exact", "exact_matmul", "isqrt_vec",
           "quantize_multipliers_exact"]

_I64 = np.int64
_EXACT = 2 ** 53
_EXACT32 = 2 ** 24


def _float_type(bound: int) -> type:
    """The narrowest float type whose integers up to ``bound`` are exact (every partial sum of
    the products is at most the bound), or int64."""
    if bound < _EXACT32 and torch.get_float32_matmul_precision() == "highest":
        return np.float32
    return np.float64 if bound < _EXACT else _I64


def quantize_multipliers_exact(reals: np.ndarray, bits: int = 31) -> tuple[np.ndarray, np.ndarray]:
    """``(mult, shift)`` int64 arrays with ``m ≈ mult·2^(shift − bits)`` (0, 0 for m <= 0 or
    shift < −31), element for element equal to the scalar Fraction version."""
    if not 1 <= bits <= 52:
        raise ValueError(f"multiplier bits must be in 1..52, got {bits}")
    r = np.asarray(reals, dtype=np.float64).reshape(-1)
    pos = r > 0
    f, e = np.frexp(np.where(pos, r, 1.0))
    mant = (f * float(_EXACT)).astype(_I64)                     # exact: f·2^53 < 2^53
    mult = (mant + (1 << (52 - bits))) >> (53 - bits)
    e = e.astype(_I64)
    top = mult == (1 << bits)
    mult = np.where(top, mult // 2, mult)
    e = np.where(top, e + 1, e)
    keep = pos & (e >= -31)
    return np.where(keep, mult, 0), np.where(keep, e, 0)


def _absmax(a: np.ndarray) -> int:
    if a.size == 0:
        return 0
    return max(int(a.max()), -int(a.min()))


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of int64 arrays as int64, on float64 only where it is provably exact."""
    k = a.shape[-1]
    bound = k * _absmax(a) * _absmax(b)
    if bound >= 2 ** 63:
        raise ValueError("matmul accumulator may leave int64")
    dt = _float_type(bound)
    if dt is not _I64:
        return _f64_matmul(a.astype(dt), b.astype(dt)).astype(_I64)
    return np.matmul(a.astype(_I64), b.astype(_I64))


def _f64_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of float64/float32 arrays (exact by the caller's bound) on torch's BLAS."""
    ta, tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(b)
    if tb.dim() == 2 and ta.dim() > 2:
        lead = ta.shape[:-1]
        return torch.matmul(ta.reshape(-1, ta.shape[-1]), tb).reshape(
            lead + (tb.shape[-1],)).numpy()
    return torch.matmul(ta, tb).numpy()


def conv_exact(xs: np.ndarray, wz: np.ndarray, stride: tuple[int, ...],
               dilation: tuple[int, ...], out: list[int], groups: int) -> np.ndarray:
    """``Σ_offsets slice(xs)·w[offset]`` for a zero-padded centred input ``xs`` (n, c, *spatial)
    and centred weights ``wz`` (o, c/groups, *kernel); int64 result (n, o, *out)."""
    nd = wz.ndim - 2
    ks = wz.shape[2:]
    n, c = xs.shape[:2]
    o = wz.shape[0]
    cg, og = c // groups, o // groups
    k_total = cg * int(np.prod(ks))
    bound = k_total * _absmax(xs) * _absmax(wz)
    if bound >= 2 ** 63:
        raise ValueError("convolution accumulator may leave int64")
    dt = _float_type(bound)
    xd = xs.astype(dt)
    wg = wz.astype(dt).reshape((groups, og, cg) + tuple(ks))
    p = int(np.prod(out)) if out else 1
    acc = np.zeros((n, groups, og, p), dtype=dt)
    for off in itertools.product(*[range(k) for k in ks]):
        idx = tuple(slice(off[i] * dilation[i], off[i] * dilation[i] + stride[i] * (out[i] - 1)
                          + 1, stride[i]) for i in range(nd))
        sl = xd[(slice(None), slice(None)) + idx].reshape(n, groups, cg, p)
        wk = wg[(slice(None), slice(None), slice(None)) + off]          # (g, og, cg)
        if cg == 1:
            acc += sl * wk[None, :, :, 0, None]                        # depthwise: broadcast
        elif dt is not _I64:
            acc += _f64_matmul(wk[None], sl)
        else:
            acc += np.matmul(wk[None], sl)
    return acc.astype(_I64).reshape((n, o) + tuple(out))


def bit_length_vec(v: np.ndarray) -> np.ndarray:
    """``int(v).bit_length()`` for each element of an int64 array with 0 <= v < 2^62."""
    v = v.astype(_I64)
    _, e = np.frexp(v.astype(np.float64))
    e = e.astype(_I64)
    # float64 may round v up across a power of two: then 2^(e−1) > v
    e = np.where((e > 0) & ((np.int64(1) << np.maximum(e - 1, 0)) > v), e - 1, e)
    return np.where(v == 0, 0, e)


def isqrt_vec(v: np.ndarray) -> np.ndarray:
    """``math.isqrt`` of each element of an int64 array with 0 <= v < 2^62."""
    v = v.astype(_I64)
    r = np.floor(np.sqrt(v.astype(np.float64))).astype(_I64)
    for _ in range(2):           # the estimate is within one of the root; correct it exactly
        r = np.where(r * r > v, r - 1, r)
        r = np.where((r + 1) * (r + 1) <= v, r + 1, r)
    return r

