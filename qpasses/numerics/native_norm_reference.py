"""A compiled integer LayerNorm / L2 normalization for the integer oracle (``verify-int-sim``).

:func:`layer_norm_codes` evaluates the normalization contract of docs/int-sim.md ("Transformer
kernels") on rows of ``n`` codes in one C function (two passes over a row): the centred codes
``x = q − z_in``, the mean ``mu = floor((Σx·2^(k+1) + n) / 2n)`` (0 for the L2 form), ``c =
x·2^k − mu``, ``T = Σc²`` (a 128-bit sum), ``t = T + n·E`` (or ``max(T, E)``), ``u = (62 −
bitlen max(t, 1)) // 2``, ``r = isqrt(max(t, 1)·4^u)`` (a float estimate corrected by integer
comparisons), ``inv = floor((2^62 + r) / 2r)``, ``nv = (c·2^u·inv + 2^30) >> 31``, then
``clamp(z_y + round((nv·g + b) / 2^R), qmin, qmax)`` with gemmlowp's half-away, single's half-up
or hawq's half-even rounding (:data:`qpasses.numerics.native_reference.ROUND_DIV_C`). Every
product and sum is checked (``__builtin_*_overflow``): a value leaving int64, ``|c| >= 2^31`` or
``t`` within 2^42 of 2^62 (where the contract's own check is a float64 sum) makes the call return
None and the caller's numpy path run (and raise where the contract does). Built and loaded by
:mod:`qpasses.numerics.native_build`; a self-test against Python integers (``math.isqrt``) runs at
load; without the library, or with ``native_reference.ENABLED`` False, it returns None.
"""
from __future__ import annotations

import ctypes
import functools
import math

import numpy as np

from qpasses.numerics import native_reference
from qpasses.numerics.native_build import build_library, checked_library, declare

__all__ = ["layer_norm_codes", "layer_norm_python"]

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
%ROUND_DIV%
/* The LayerNorm contract (docs/int-sim.md, "Transformer kernels") on rows of n codes, per row:
   x = q - zin; mu = floor((sum x * 2^(k+1) + n) / 2n) (0 without centring); c = x * 2^k - mu;
   T = sum c^2; t = T + n*eps (centring) or max(T, eps); u = (62 - bitlen(max(t, 1))) / 2;
   r = isqrt(max(t, 1) * 4^u); inv = floor((2^62 + r) / 2r); nv = (c * 2^u * inv + 2^30) >> 31;
   y = clamp(zp + round(nv * gain + bias, 2^R), qmin, qmax). Returns 0, or 1 where a value
   leaves the contract's checked ranges (|c| >= 2^31, t near 2^62) or int64 (nothing to use). */
static inline int64_t floor_div(int64_t a, int64_t b) {          /* b > 0 */
    int64_t q = a / b;
    return q - ((a % b != 0) & (a < 0));
}
static inline int64_t isqrt62(int64_t v) {                        /* 0 <= v < 2^62 */
    int64_t r = (int64_t)sqrt((double)v);
    while (r * r > v) --r;
    while ((r + 1) * (r + 1) <= v) ++r;
    return r;
}
/* the last pass: y = clamp(zp + round(((c*2^u*inv + 2^30) >> 31) * g + b, 2^R)); the caller
   has bounded every product and sum below 2^63 for this row */
#define LN_OUT_PASS(MODE)                                                                    \
    for (int64_t i = 0; i < n; ++i) {                                                        \
        int64_t c = ((int64_t)qr[i] - zin) * pk - mu;                                        \
        int64_t nv = (c * pu * inv + (((int64_t)1) << 30)) >> 31;                            \
        int64_t acc = nv * gain[i] + bias[i];                                                \
        int64_t y = rbits > 0 ? round_div(acc, rbits, mask, half, MODE) : acc;               \
        y += zp;                                                                             \
        y = y < qmin ? qmin : y;                                                             \
        y = y > qmax ? qmax : y;                                                             \
        yr[i] = (TOUT_)y;                                                                    \
    }
#define LN(NAME, TIN, TOUT)                                                                  \
int64_t NAME(const TIN* restrict q, int64_t rows, int64_t n, TOUT* restrict out,             \
             int64_t zin, int64_t k, int64_t eps, int64_t center,                            \
             const int64_t* restrict gain, const int64_t* restrict bias, int64_t rbits,      \
             int64_t mode, int64_t zp, int64_t qmin, int64_t qmax, int64_t gmax,             \
             int64_t bmax) {                                                                 \
    typedef TOUT TOUT_;                                                                      \
    const int64_t two31 = (int64_t)1 << 31, edge = ((int64_t)1 << 62) - ((int64_t)1 << 42);  \
    const int64_t mask = (((int64_t)1) << rbits) - 1;                                        \
    const int64_t half = rbits > 0 ? ((int64_t)1) << (rbits - 1) : ((int64_t)1) << 62;       \
    const int64_t pk = ((int64_t)1) << k;                                                    \
    for (int64_t row = 0; row < rows; ++row) {                                               \
        const TIN* restrict qr = q + row * n;                                                \
        TOUT* restrict yr = out + row * n;                                                   \
        uint64_t usum = 0;                      /* wraps (defined) until checked below */    \
        int64_t qlo = qr[0], qhi = qr[0];                                                    \
        for (int64_t i = 0; i < n; ++i) {                                                    \
            int64_t v = (int64_t)qr[i];                                                      \
            usum += (uint64_t)v;                                                             \
            qlo = v < qlo ? v : qlo;                                                         \
            qhi = v > qhi ? v : qhi;                                                         \
        }                                                                                    \
        /* |q - zin| < 2^31 (so n*|x|*2^(k+1) < 2^62: the caller's n, k bound) */            \
        if (qhi - zin >= two31 || qlo - zin <= -two31) return 1;                             \
        const int64_t total = (int64_t)usum - n * zin;   /* exact: |q| < 2^32 here */     \
        const int64_t mu = center ? floor_div(total * (pk * 2) + n, 2 * n) : 0;              \
        /* c is monotone in q: its extremes are at qlo and qhi */                            \
        const int64_t clo = (qlo - zin) * pk - mu, chi = (qhi - zin) * pk - mu;              \
        const int64_t cmax = chi > -clo ? chi : -clo;                                        \
        if (cmax >= two31) return 1;                                                         \
        unsigned __int128 tsum = 0;                                                          \
        if ((unsigned __int128)cmax * (unsigned __int128)cmax * (unsigned __int128)n          \
                < ((unsigned __int128)1 << 63)) {                                            \
            int64_t s = 0;                     /* every partial sum below 2^63: exact */     \
            for (int64_t i = 0; i < n; ++i) {                                                \
                int64_t c = ((int64_t)qr[i] - zin) * pk - mu;                                \
                s += c * c;                                                                  \
            }                                                                                \
            tsum = (unsigned __int128)s;                                                     \
        } else {                                                                             \
            for (int64_t i = 0; i < n; ++i) {                                                \
                int64_t c = ((int64_t)qr[i] - zin) * pk - mu;                                \
                tsum += (unsigned __int128)(c * c);                                          \
            }                                                                                \
        }                                                                                    \
        if (tsum + (unsigned __int128)(center ? n * eps : 0) >= (unsigned __int128)edge)     \
            return 1;                                                                        \
        int64_t t = (int64_t)tsum;                                                           \
        t = center ? t + n * eps : (t > eps ? t : eps);                                      \
        const int64_t tv = t > 1 ? t : 1;                                                    \
        const int64_t u = (62 - (64 - __builtin_clzll((unsigned long long)tv))) / 2;         \
        const int64_t r = isqrt62(tv << (2 * u));                                            \
        const int64_t inv = ((((int64_t)1) << 62) + r) / (2 * r);                            \
        const int64_t pu = ((int64_t)1) << u;                                                \
        /* bounds: |c*2^u*inv| + 2^30 < 2^63, |nv| <= nvmax, |nv*g + b| + 2^40 < 2^63 */       \
        __int128 big = (__int128)cmax * pu * inv + (((int64_t)1) << 30);                     \
        if (big >= ((__int128)1 << 63)) return 1;                                            \
        __int128 nvmax = (big >> 31) + 1;                                                    \
        if (nvmax * gmax + bmax + ((__int128)1 << 40) >= ((__int128)1 << 63)) return 1;      \
        if (mode == 0) { LN_OUT_PASS(0) }                                                    \
        else if (mode == 1) { LN_OUT_PASS(1) }                                               \
        else { LN_OUT_PASS(2) }                                                              \
    }                                                                                        \
    return 0;                                                                                \
}
#define LN_OUT(NI, TIN)                                                                      \
    LN(lnref_##NI##_i8, TIN, int8_t) LN(lnref_##NI##_i16, TIN, int16_t)                       \
    LN(lnref_##NI##_i32, TIN, int32_t)
LN_OUT(u8, uint8_t)
LN_OUT(i8, int8_t)
LN_OUT(i16, int16_t)
LN_OUT(i32, int32_t)
LN_OUT(i64, int64_t)
""".replace("%ROUND_DIV%", native_reference.ROUND_DIV_C)

_LN_IN = {np.dtype(np.uint8): "u8", np.dtype(np.int8): "i8", np.dtype(np.int16): "i16",
          np.dtype(np.int32): "i32", np.dtype(np.int64): "i64"}
_LN_OUT = {np.dtype(np.int8): "i8", np.dtype(np.int16): "i16", np.dtype(np.int32): "i32"}
_LN_MODE = {"rha": 0, "rhu": 1, "rne": 2}
_I64 = ctypes.c_int64
_P = ctypes.c_void_p


def _load() -> ctypes.CDLL | None:
    dll = build_library("native_norm_reference", _SOURCE)
    if dll is None:
        return None
    declare(dll, (f"lnref_{i}_{o}" for i in _LN_IN.values() for o in _LN_OUT.values()), _I64,
            [_P, _I64, _I64, _P] + [_I64] * 4 + [_P, _P] + [_I64] * 7)
    return dll


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return checked_library(_load, _self_test)


def layer_norm_codes(q: np.ndarray, n: int, in_zp: int, k: int, eps: int, center: bool,
                     gain: np.ndarray, bias: np.ndarray, out_frac_bits: int, mode: str,
                     out_zp: int, qmin: int, qmax: int, out_dtype: type) -> np.ndarray | None:
    """The integer LayerNorm (``center``) or L2 normalization of the rows of ``n`` codes of a
    C-ordered ``q`` (see the C source: the contract of docs/int-sim.md, in int64 and a 128-bit sum
    of squares), rounded ``mode`` (rha/rhu/rne) by ``2^out_frac_bits``, as a new ``out_dtype``
    array of ``q``'s shape; None where it does not apply (dtypes, layout, parameters whose
    products could leave int64, a value beyond the contract's checked ranges: the caller's numpy
    path then runs, and raises where the contract does)."""
    if not native_reference.ENABLED or not isinstance(q, np.ndarray):
        return None
    n, k, eps = int(n), int(k), int(eps)
    if not q.flags.c_contiguous and q.itemsize <= 2:
        q = np.ascontiguousarray(q)             # narrow codes: a cheap copy in row order
    if not (q.dtype in _LN_IN
            and np.dtype(out_dtype) in _LN_OUT and mode in _LN_MODE and q.flags.c_contiguous
            and q.size and n > 0 and q.size % n == 0 and 0 <= k and 0 <= out_frac_bits <= 62
            and n.bit_length() + k + 32 <= 62 and 0 <= eps and n * eps < 2 ** 61
            and abs(int(in_zp)) < 2 ** 31 and abs(int(out_zp)) < 2 ** 40):
        return None
    info = np.iinfo(out_dtype)
    g, b = np.asarray(gain).reshape(-1), np.asarray(bias).reshape(-1)
    if not (info.min <= qmin <= qmax <= info.max and g.size in (1, n) and b.size in (1, n)
            and g.dtype.kind in "iu" and b.dtype.kind in "iu"):
        return None
    gmax, bmax = (max(abs(int(v.max())), abs(int(v.min()))) for v in (g, b))
    if max(gmax, bmax) >= 2 ** 62:
        return None
    g, b = (np.ascontiguousarray(np.broadcast_to(v, (n,)), dtype=np.int64) for v in (g, b))
    dll = _library()
    return None if dll is None else _ln_run(dll, q, n, in_zp, k, eps, center, g, b,
                                            out_frac_bits, mode, out_zp, qmin, qmax, out_dtype,
                                            gmax, bmax)


def _ln_run(dll: ctypes.CDLL, q: np.ndarray, n: int, in_zp: int, k: int, eps: int, center: bool,
            g: np.ndarray, b: np.ndarray, rbits: int, mode: str, out_zp: int, qmin: int, qmax: int,
            out_dtype: type, gmax: int, bmax: int) -> np.ndarray | None:
    out = np.empty(q.shape, dtype=out_dtype)
    bad = getattr(dll, f"lnref_{_LN_IN[q.dtype]}_{_LN_OUT[out.dtype]}")(
        q.ctypes.data, q.size // n, n, out.ctypes.data, int(in_zp), int(k), int(eps),
        int(bool(center)), g.ctypes.data, b.ctypes.data, int(rbits), _LN_MODE[mode],
        int(out_zp), int(qmin), int(qmax), int(gmax), int(bmax))
    return None if bad else out


def _round(v: int, r: int, mode: str) -> int:
    if r == 0:
        return v
    q, rem, half = v >> r, v & ((1 << r) - 1), 1 << (r - 1)
    if rem != half:
        return q + (rem > half)
    return q + {"rha": v >= 0, "rhu": True, "rne": q & 1}[mode]


def layer_norm_python(row: list[int], in_zp: int, k: int, eps: int, center: bool,
                      gain: list[int], bias: list[int], rbits: int, mode: str, out_zp: int,
                      qmin: int, qmax: int) -> list[int]:
    """One row of the contract in Python integers (the self-test's and the tests' reference)."""
    n = len(row)
    x = [v - in_zp for v in row]
    mu = (sum(x) * 2 ** (k + 1) + n) // (2 * n) if center else 0
    c = [v * 2 ** k - mu for v in x]
    t = sum(v * v for v in c)
    t = t + n * eps if center else max(t, eps)
    tv = max(t, 1)
    u = (62 - tv.bit_length()) // 2
    r = math.isqrt(tv << (2 * u))
    inv = ((1 << 62) + r) // (2 * r)
    out = []
    for ci, g, b in zip(c, gain, bias):
        nv = (ci * 2 ** u * inv + 2 ** 30) >> 31
        out.append(min(max(_round(nv * g + b, rbits, mode) + out_zp, qmin), qmax))
    return out


def _self_test(dll: ctypes.CDLL) -> bool:
    """The kernel against :func:`layer_norm_python` on random rows (one constant row, ties of
    the output rounding likely with small ``R``), both forms, every rounding."""
    rng = np.random.default_rng(0)
    n = 24
    q = rng.integers(-128, 128, (3, n)).astype(np.int8)
    q[1] = 5
    gain = rng.integers(-2 ** 20, 2 ** 20, n)
    bias = rng.integers(-2 ** 30, 2 ** 30, n)
    for center in (True, False):
        for mode, rbits in (("rha", 20), ("rhu", 1), ("rne", 2)):
            got = _ln_run(dll, q, n, 3, 8, 1000, center, gain, bias, rbits, mode, -2, -128, 127,
                          np.int8, 2 ** 20, 2 ** 30)
            if got is None:
                return False
            for row, g in zip(q.tolist(), got.tolist()):
                if g != layer_norm_python(row, 3, 8, 1000, center, gain.tolist(), bias.tolist(),
                                          rbits, mode, -2, -128, 127):
                    return False
    return True
