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
import math
from typing import Any

import numpy as np
import torch

from qpasses.numerics.native_reference import add_codes, requant_codes

__all__ = ["bit_length_vec", "block_slices", "channel_slice", "code_dtype", "conv_exact",
           "exact_add", "exact_matmul", "isqrt_vec", "quantize_multipliers_exact",
           "requant_f64", "requant_fixed"]

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


def _range(a: np.ndarray) -> tuple[int, int]:
    return (int(a.min()), int(a.max())) if a.size else (0, 0)


def _exact_type(bound: int, raw: int) -> type:
    """:func:`_float_type` of an accumulator ``bound`` whose operands (before centring) and zero
    points are at most ``raw`` in magnitude: a float type only where those are exact in it too."""
    dt = _float_type(bound)
    if dt is np.float32 and raw >= _EXACT32:
        dt = np.float64 if bound < _EXACT else _I64
    if dt is np.float64 and raw >= _EXACT:
        dt = _I64
    return dt


def _centre(a: np.ndarray, zp: int, dt: type) -> np.ndarray:
    """``a − zp`` in ``dt`` (exact: the caller's :func:`_exact_type` bound)."""
    out = a.astype(dt)
    if zp:
        out -= dt(zp)
    return out


def exact_matmul(a: np.ndarray, b: np.ndarray, keep_float: bool = False,
                 zero_points: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``(a − z_a) @ (b − z_b)`` of integer arrays as int64, on float BLAS only where it is
    provably exact (``keep_float``: the float32/float64 result as it is, every value an exact
    integer); the operands are centred in the type the bound picks (no int64 copies)."""
    za, zb = (int(z) for z in zero_points)
    k = a.shape[-1]
    (alo, ahi), (blo, bhi) = _range(a), _range(b)
    bound = k * max(abs(alo - za), abs(ahi - za)) * max(abs(blo - zb), abs(bhi - zb))
    if bound >= 2 ** 63:
        raise ValueError("matmul accumulator may leave int64")
    dt = _exact_type(bound, max(abs(alo), abs(ahi), abs(blo), abs(bhi), abs(za), abs(zb)))
    if dt is not _I64:
        out = _f64_matmul(_centre(a, za, dt), _centre(b, zb, dt))
        return out if keep_float else out.astype(_I64)
    return np.matmul(_centre(a, za, _I64), _centre(b, zb, _I64))


def _f64_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of float64/float32 arrays (exact by the caller's bound) on torch's BLAS."""
    ta, tb = torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(b)
    if tb.dim() == 2 and ta.dim() > 2:
        lead = ta.shape[:-1]
        return torch.matmul(ta.reshape(-1, ta.shape[-1]), tb).reshape(
            lead + (tb.shape[-1],)).numpy()
    return torch.matmul(ta, tb).numpy()


def conv_exact(xs: np.ndarray, wz: np.ndarray, stride: tuple[int, ...],
               dilation: tuple[int, ...], out: list[int], groups: int,
               keep_float: bool = False, x_zp: int = 0) -> np.ndarray:
    """``Σ_offsets slice(xs − x_zp)·w[offset]`` for a padded input ``xs`` (n, c, *spatial;
    integer codes, padded with ``x_zp``; centred in the type the bound picks) and centred
    weights ``wz`` (o, c/groups, *kernel); int64 result (n, o, *out) (``keep_float``: the exact
    float32/float64 accumulator as it is)."""
    nd = wz.ndim - 2
    ks = wz.shape[2:]
    n, c = xs.shape[:2]
    o = wz.shape[0]
    cg, og = c // groups, o // groups
    k_total = cg * int(np.prod(ks))
    xlo, xhi = _range(xs)
    bound = k_total * max(abs(xlo - x_zp), abs(xhi - x_zp)) * _absmax(wz)
    if bound >= 2 ** 63:
        raise ValueError("convolution accumulator may leave int64")
    dt = _exact_type(bound, max(abs(xlo), abs(xhi), abs(int(x_zp)), _absmax(wz)))
    xd = _centre(xs, int(x_zp), dt)
    wg = wz.astype(dt).reshape((groups, og, cg) + tuple(ks))
    if cg == 1 and og == 1 and dt is np.float32 and 1 <= nd <= 3 and _torch_conv_exact():
        acc = _depthwise_torch(xd, wz.astype(dt), stride, dilation, groups)
        return acc if keep_float else acc.astype(_I64)
    if cg == 1 and og == 1 and dt is not _I64:
        return _depthwise(xd, wz.astype(dt), stride, dilation, out, keep_float)
    if cg > 1 and math.prod(ks) > 1 and dt is not _I64:
        acc = _im2col_matmul(xd, wg, stride, dilation, out)
        acc = acc.reshape((n, o) + tuple(out))
        return acc if keep_float else acc.astype(_I64)
    p = int(np.prod(out)) if out else 1
    acc = None if math.prod(ks) == 1 else np.zeros((n, groups, og, p), dtype=dt)
    for off in itertools.product(*[range(k) for k in ks]):
        idx = tuple(slice(off[i] * dilation[i], off[i] * dilation[i] + stride[i] * (out[i] - 1)
                          + 1, stride[i]) for i in range(nd))
        sl = xd[(slice(None), slice(None)) + idx].reshape(n, groups, cg, p)
        wk = wg[(slice(None), slice(None), slice(None)) + off]          # (g, og, cg)
        if cg == 1:
            term = sl * wk[None, :, :, 0, None]                        # depthwise: broadcast
        elif dt is not _I64:
            term = _f64_matmul(wk[None], sl)
        else:
            term = np.matmul(wk[None], sl)
        if acc is None:                                                 # one offset (1x1)
            acc = term
        else:
            acc += term
    acc = acc.reshape((n, o) + tuple(out))
    return acc if keep_float else acc.astype(_I64)


def _torch_conv_exact() -> bool:
    """Whether torch's float32 convolutions run in IEEE float32 (no TF32/bf16 internals)."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    for owner in (torch.backends, getattr(torch.backends, "mkldnn", None),
                  getattr(getattr(torch.backends, "mkldnn", None), "conv", None)):
        if getattr(owner, "fp32_precision", "none") not in ("none", "ieee"):
            return False
    return True


def _depthwise_torch(xd: np.ndarray, wd: np.ndarray, stride: tuple[int, ...],
                     dilation: tuple[int, ...], groups: int) -> np.ndarray:
    """Depthwise :func:`conv_exact` on torch's float32 convolution (the input already padded and
    centred). Exact: every product and every partial sum of a channel's products is an integer
    below the caller's 2^24 bound, so each is representable in float32 and each addition is
    exact in any order — provided the convolution sums the products themselves, which a
    depthwise (grouped, one channel per group) convolution does: it has no Winograd/FFT
    algorithm (those transform the operands by non-integers and are only offered for dense
    convolutions), and :func:`_torch_conv_exact` rules out TF32/bf16 internals."""
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d,
            torch.nn.functional.conv3d)[wd.ndim - 3]
    with torch.no_grad():
        y = conv(torch.from_numpy(np.ascontiguousarray(xd)), torch.from_numpy(wd),
                 stride=stride, dilation=dilation, groups=groups)
    return y.contiguous().numpy()


def _im2col_matmul(xd: np.ndarray, wg: np.ndarray, stride: tuple[int, ...],
                   dilation: tuple[int, ...], out: list[int]) -> np.ndarray:
    """A dense (``c/groups > 1``) convolution with a kernel of several offsets: per sample, the
    strided slices of every offset stacked as the rows of one matrix (im2col) and ONE exact
    float matmul with the ``(og, cg·K)`` weights (each output's full sum; exact in any order
    under the caller's bound); ``(n, groups, og, p)``."""
    nd = wg.ndim - 3
    g, og, cg = wg.shape[:3]
    ks = wg.shape[3:]
    kk = math.prod(ks)
    n = xd.shape[0]
    p = math.prod(out) if out else 1
    w2 = np.ascontiguousarray(wg.reshape(g, og, cg * kk))
    acc = np.empty((n, g, og, p), dtype=xd.dtype)
    cols = np.empty((g, cg, kk, p), dtype=xd.dtype)
    grid = cols.reshape((g, cg, kk) + tuple(out))                     # a view of cols
    for i in range(n):
        for j, off in enumerate(itertools.product(*[range(k) for k in ks])):
            idx = tuple(slice(off[a] * dilation[a], off[a] * dilation[a] + stride[a] *
                              (out[a] - 1) + 1, stride[a]) for a in range(nd))
            grid[:, :, j] = xd[(i, slice(None)) + idx].reshape((g, cg) + tuple(out))
        acc[i] = _f64_matmul(w2, cols.reshape(g, cg * kk, p))
    return acc


def _depthwise(xd: np.ndarray, wd: np.ndarray, stride: tuple[int, ...],
               dilation: tuple[int, ...], out: list[int], keep_float: bool) -> np.ndarray:
    """Depthwise :func:`conv_exact` (one input channel per output channel, exact float type):
    per block of channels, ``Σ_offsets`` of the strided slice (a view) times that offset's
    weight per channel, accumulated in place while the block is in cache."""
    nd = wd.ndim - 2
    ks = wd.shape[2:]
    n, c = xd.shape[:2]
    acc = np.zeros((n, c) + tuple(out), dtype=xd.dtype)
    per_channel = max(1, n * int(np.prod(out)))
    cb = max(1, BLOCK // per_channel)
    tmp = np.empty((n, min(cb, c)) + tuple(out), dtype=xd.dtype)
    bshape = (1, -1) + (1,) * nd
    for c0 in range(0, c, cb):
        a = acc[:, c0:c0 + cb]
        t = tmp[:, :a.shape[1]]
        for off in itertools.product(*[range(k) for k in ks]):
            idx = tuple(slice(off[i] * dilation[i], off[i] * dilation[i] + stride[i] *
                              (out[i] - 1) + 1, stride[i]) for i in range(nd))
            w = wd[(slice(c0, c0 + cb), 0) + off].reshape(bshape)
            np.multiply(xd[(slice(None), slice(c0, c0 + cb)) + idx], w, out=t)
            a += t
    return acc if keep_float else acc.astype(_I64)


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



def requant_f64(x: np.ndarray, m: np.ndarray, e: np.ndarray, rounding: str, bits: int,
                amax: int, out_zp: int = 0, qmin: int = -(2 ** 62),
                qmax: int = 2 ** 62, bias: np.ndarray | None = None,
                shift: int = 0) -> np.ndarray | None:
    """The fixed-point requantization ``clamp(z + contract(x·M))`` of an integer array ``x``
    (int or integer-valued float64, ``max|x| = amax``) with channel-shaped multipliers
    ``m·2^(e − bits)`` (arrays of ``x.ndim`` dims, or 0-d), in float64 where every step is
    provably exact (docs/int-sim.md, "Verifying it fast"), as :func:`code_dtype` integers; None
    where the bound does not hold (the caller's int64 path then runs). Blocks of at most
    :data:`BLOCK` values go through all the steps while they are in cache. ``shift``, ``bias``:
    ``x·2^shift + bias`` (a channel-shaped float64 array of integers) is requantized, formed in
    the block (a layer's ``A·2^shift + b_q``: exact, ``amax`` then bounding its magnitude, which
    must be below 2^53).

    gemmlowp (all ``e <= 0``, ``bits <= 31``): SRDHM ``floor((x·m31 + 2^30) / 2^31)`` is
    ``floor(x·(m31·2^−31) + 1/2)``: under ``amax·max m31 + 2^30 < 2^53`` the product ``x·m31`` and
    the sum are integers below 2^53 (exact), scaling by 2^−31 is exact; then RDBPOT (half away)
    by ``2^t``, ``t = −e``: ``v = high·2^−t`` is exact and ``trunc(v ± 1/2)`` rounds it, the sum
    being ``(high ± 2^(t−1)) / 2^t`` with an integer numerator below 2^53. single / hawq:
    ``v = x·m·2^−(bits − e)`` is exact under ``amax·max m·2^max(e − bits, 0) < 2^53``; ``floor(v)``
    and the remainder ``v − floor(v)`` (a representable difference: exact) decide the rounding
    against 1/2 (ties up, or to the even neighbour)."""
    if rounding == "gemmlowp":
        if bits > 31:
            return None
        m31 = m * (1 << (31 - bits))
        left = np.maximum(e, 0)
        # a left shift past int32 is the int64 path's to refuse
        if amax * 2 ** int(left.max(initial=0)) <= 2 ** 31:
            one = gemmlowp_one_rounding(x, m31, np.maximum(-e, 0), amax, out_zp, qmin, qmax,
                                        bias, shift, left)
            if one is not None:
                return one
        if np.any(e > 0) or amax * int(m31.max(initial=0)) + 2 ** 30 >= _EXACT:
            return None
        scale = np.ldexp(m31.astype(np.float64), -31)
        down = np.ldexp(1.0, e.astype(np.int32)) if np.any(e < 0) else None
    else:
        t = bits - e
        up_shift = int(np.maximum(-t, 0).max(initial=0))
        if amax * int(m.max(initial=0)) * 2 ** up_shift >= _EXACT:
            return None
        scale, down = np.ldexp(m.astype(np.float64), (-t).astype(np.int32)), None
    out = np.empty(x.shape, dtype=code_dtype(qmin, qmax))
    for idx in block_slices(x.shape):
        sc = scale[channel_slice(idx, scale)]
        if bias is None and not shift:
            y = x[idx] * sc
        else:
            y = np.multiply(x[idx], float(1 << shift), dtype=np.float64) if shift else \
                x[idx].astype(np.float64)
            if bias is not None:
                y += bias[channel_slice(idx, bias)]
            y *= sc
        if rounding == "gemmlowp":
            y += 0.5
            np.floor(y, out=y)
            if down is not None:
                y *= down[channel_slice(idx, down)]
                y += np.copysign(0.5, y)
                np.trunc(y, out=y)
        else:
            f = np.floor(y)
            y -= f                                                  # the remainder, in [0, 1)
            up = y >= 0.5 if rounding == "single" else \
                (y > 0.5) | ((y == 0.5) & (np.remainder(f, 2.0) == 1.0))   # hawq: half to even
            y = f
            y += up
        y += out_zp
        np.clip(y, qmin, qmax, out=y)
        out[idx] = y
    return out


def requant_fixed(x: np.ndarray, m: np.ndarray, e: np.ndarray, rounding: str, bits: int,
                  amax: int, out_zp: int = 0, qmin: int = -(2 ** 62),
                  qmax: int = 2 ** 62, bias: np.ndarray | None = None,
                  shift: int = 0) -> np.ndarray | None:
    """:func:`requant_f64`'s requantization (same arguments, same codes), first by the compiled
    int64 evaluation of the contracts' integer definitions
    (:func:`qpasses.numerics.native_reference.requant_codes`: one pass, ~3x faster, and valid
    beyond the float64 bound too), else by :func:`requant_f64`; None where neither applies (the
    caller's int64 path then runs)."""
    y = requant_codes(x, m, e, rounding, bits, out_zp, qmin, qmax, code_dtype(qmin, qmax), bias,
                      shift)
    if y is not None:
        return y
    return requant_f64(x, m, e, rounding, bits, amax, out_zp, qmin, qmax, bias, shift)


def exact_add(qs: tuple[np.ndarray, ...], zero_points: Any, out_zp: int, qmin: int,
              qmax: int) -> np.ndarray:
    """``clamp(Σ(q_i − z_i) + z_y, qmin, qmax)`` as :func:`code_dtype` codes: two C-ordered
    inputs of one shape in one compiled pass (:func:`qpasses.numerics.native_reference.add_codes`,
    int64 sums of ``q_a + q_b + (z_y − z_a − z_b)``), else in int64 numpy."""
    dt = code_dtype(qmin, qmax)
    if len(qs) == 2:
        c = int(out_zp) - int(zero_points[0]) - int(zero_points[1])
        y = add_codes(qs[0], qs[1], c, qmin, qmax, dt)
        if y is not None:
            return y
    centred = [q.astype(_I64) - z for q, z in zip(qs, zero_points)]
    return np.clip(sum(centred) + out_zp, qmin, qmax).astype(dt, copy=False)


def gemmlowp_one_rounding(x: np.ndarray, m31: np.ndarray, t: np.ndarray, amax: int,
                          out_zp: int, qmin: int, qmax: int, bias: np.ndarray | None = None,
                          shift: int = 0, left: np.ndarray | None = None) -> np.ndarray | None:
    """gemmlowp's ``RDBPOT(SRDHM(v·2^left, m31), t)`` of ``v = x·2^shift + bias`` (channel-shaped
    ``m31 >= 0``, ``t >= 0`` and ``left >= 0``: a multiplier above one shifts left first; the
    caller checks ``v·2^left`` stays in int32), clamped ``z + ·`` codes, with ONE floor per value
    in float64; None where its bound does not hold (:func:`requant_f64`'s two-step path, or the
    int64 one, then runs). Below, ``v`` stands for ``v·2^left``.

    With ``N = v·m31 + 2^30``, SRDHM is ``h = floor(N / 2^31)`` and, for ``t >= 1``, RDBPOT (half
    away from zero) is ``floor((h + 2^(t−1)) / 2^t)`` for ``h >= 0`` and ``ceil((h − 2^(t−1)) /
    2^t) = floor((h + 2^(t−1) − 1) / 2^t)`` for ``h < 0``. Since ``floor((floor(a) + j) / d) =
    floor((a + j) / d)`` for an integer ``j`` and a positive integer ``d``, and ``h < 0`` exactly
    when ``N < 0``, the result is ``floor(y − [N < 0]·2^−t)`` with ``y = N·2^−(31+t) + 1/2``
    (``floor(N·2^−31)`` for ``t = 0``). Per block: ``u = x·k + c`` with per-channel ``k =
    m31·2^(shift−31−t)`` and ``c = (bias·m31 + 2^30)·2^−(31+t) + 1/2 − 2^−t/2``, so ``u − (1/2 −
    2^−t/2) = N·2^−(31+t)`` carries the sign of ``N`` (``+0.0`` for ``N = 0``), and ``u +
    copysign(2^−t/2, that)`` is ``y`` or ``y − 2^−t``. Every value involved (``x·2^shift·m31``,
    ``bias·m31``, ``c``, the sums) is an integer multiple of ``2^−(31+t)`` whose numerator is at
    most ``(amax + max|bias|)·2^left·max m31 + 2^31 + 2^(30+t)`` in magnitude: under ``2^53``
    each is representable, so every product and sum is exact. Then ``clamp(floor(·), qmin − z,
    qmax − z)`` is stored and ``z`` added to the stored codes: seven float passes over a block
    instead of the two-step path's twelve (tested against the int64 definition, ties and the
    edge of the bound included)."""
    if x.dtype.kind not in "iuf" or not x.ndim:
        return None
    m31max = int(m31.max(initial=0))
    tmax = int(t.max(initial=0))
    left = np.zeros((), dtype=np.int32) if left is None else left.astype(np.int32)
    lmax = int(left.max(initial=0))
    bmax = 0 if bias is None else int(np.abs(bias).max(initial=0))
    if tmax > 52 or lmax > 31 or \
            (amax + bmax) * 2 ** lmax * m31max + 2 ** 31 + 2 ** (30 + tmax) >= _EXACT:
        return None
    m = m31.astype(np.float64)
    te = t.astype(np.int32)
    k = np.ldexp(m, shift + left - 31 - te)
    num = np.float64(2 ** 30) if bias is None else np.ldexp(bias * m, left) + 2.0 ** 30
    half = np.where(te > 0, 0.5, 0.0)                   # the 1/2 of y (t >= 1)
    w2 = np.where(te > 0, np.ldexp(0.5, -te), 0.0)       # 2^−t / 2 (0 for t = 0)
    c = np.ldexp(num, -31 - te) + half - w2
    thr = half - w2                                      # u − thr = N·2^−(31+t)
    lo, hi = float(qmin - out_zp), float(qmax - out_zp)
    out = np.empty(x.shape, dtype=code_dtype(qmin, qmax))
    late = np.iinfo(out.dtype).min <= out_zp <= np.iinfo(out.dtype).max
    for idx in block_slices(x.shape):
        y = np.multiply(x[idx], k[channel_slice(idx, k)], dtype=np.float64)
        y += c[channel_slice(idx, c)]
        if tmax:
            # + 2^−t/2 where N >= 0, − 2^−t/2 where N < 0 (N = 0: +0.0, so +2^−t/2)
            sgn = np.subtract(y, thr[channel_slice(idx, thr)])
            np.copysign(w2[channel_slice(idx, w2)], sgn, out=sgn)
            y += sgn
        np.floor(y, out=y)
        np.clip(y, lo, hi, out=y)
        if not late:
            y += out_zp
        out[idx] = y
    if late and out_zp:                 # in the narrow codes (exact: the clamp bounds them)
        out += out.dtype.type(out_zp)
    return out


BLOCK = 1 << 15


def block_slices(shape: tuple[int, ...], limit: int = BLOCK) -> Any:
    """Index tuples (slices, leading dims first) cutting an array of ``shape`` into blocks of at
    most ``limit`` values (or single rows of the innermost dim)."""
    if not shape or math.prod(shape) <= limit:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= limit or len(shape) == 1:
        step = max(1, limit // max(inner, 1))
        for i in range(0, shape[0], step):
            yield (slice(i, i + step),)
        return
    for i in range(shape[0]):
        for rest in block_slices(shape[1:], limit):
            yield (slice(i, i + 1),) + rest


def channel_slice(idx: tuple[slice, ...], a: np.ndarray) -> tuple[slice, ...]:
    """``idx`` for a broadcast (channel-shaped) array: dims of extent 1 are taken whole."""
    if a.ndim == 0:
        return ()
    return tuple(s if a.shape[k] > 1 else slice(None) for k, s in enumerate(idx))


def code_dtype(lo: int, hi: int) -> type:
    """The narrowest numpy integer type holding ``[lo, hi]`` (the oracle keeps clamped codes in
    it: the graph's codes are compared, and read by the next op, in a few bytes per value)."""
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return _I64
