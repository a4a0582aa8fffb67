"""A compiled requantization for the integer oracle (``verify-int-sim``), on int64 integers.

:func:`requant_codes` computes ``clamp(z + contract(v·M), qmin, qmax)`` of ``v = x·2^shift + b``
(``x`` an integer array, or a float array holding integers; ``b`` an optional integer bias; ``M =
m·2^(e − bits)`` per channel or per tensor) in one pass of a small C kernel, written from the
*integer* definitions of the contracts (docs/int-sim.md, "Integer arithmetic"), not from the fast
simulation's float64 windows (:mod:`qpasses.numerics.native_requant`, which it checks; only the
build machinery, :mod:`qpasses.numerics.native_build`, is shared):

* ``gemmlowp``: ``l = max(e, 0)``, ``t = max(−e, 0)``, ``m31 = m·2^(31 − bits)``; ``h = (v·2^l·m31 +
  2^30) >> 31`` (SRDHM: the floor of the quotient, an arithmetic shift; ``m31 >= 0`` never meets
  its saturating case), then RDBPOT ``rha(h / 2^t)``; ``|v·2^l| <= 2^31`` is required (the
  definition's int32 operand), so ``|v·2^l·m31| < 2^62``;
* ``single`` / ``hawq``: ``t = bits − e``; ``p = v·m·2^max(−t, 0)`` and ``rhu`` / ``rne`` of
  ``p / 2^max(t, 0)``;
* rounding ``v / 2^t`` (``t >= 1``): the floor quotient ``q = v >> t`` and the remainder ``r = v &
  (2^t − 1)`` in ``[0, 2^t)``; up by one where ``r > 2^(t−1)``, or on the tie ``r = 2^(t−1)`` when
  ``v >= 0`` (rha), always (rhu) or when ``q`` is odd (rne);
* ``y = clamp(q + z, qmin, qmax)`` stored in the caller's code dtype.

Every step is int64 arithmetic, its range checked per element: an element whose value the
definition does not keep in range (an input beyond ``2^(62 − shift)``, ``2^(61 − shift)`` for a
float, or a float that is not an integer; gemmlowp's ``|v·2^l| > 2^31``; single/hawq's ``|p| >=
2^63``; the bias is checked below ``2^62``) makes the call return None, so the
caller's numpy path runs (and raises or refuses as it always did). The library is built once per
machine and checked against a Python-integer evaluation of the definitions when first loaded;
without a compiler, on a build or load error or a failed self-test (and with :data:`ENABLED`
False) :func:`requant_codes` returns None everywhere. Single-threaded.

:func:`add_codes` is the oracle's exact residual add ``clamp(a + b + c, qmin, qmax)`` of two code
arrays (``c = z_y − z_a − z_b``) in int64, one pass, under the same rules.
"""
from __future__ import annotations

import ctypes
import functools
import math

import numpy as np

from qpasses.numerics.native_build import build_library, checked_library, declare

__all__ = ["ENABLED", "ROUND_DIV_C", "add_codes", "native_reference_available", "requant_codes",
           "requant_python"]

# Switch for tests and benchmarks (False: the callers' numpy paths everywhere).
ENABLED = True

# rounding v / 2^t from the floor quotient and the remainder (also used by native_norm_reference)
ROUND_DIV_C = r"""
#include <stdint.h>
/* v / 2^t rounded (t >= 0; t = 0 returns v): MODE 0 half away from zero, 1 half up, 2 half to
   even. q = v >> t is the floor quotient (arithmetic shift), r = v & mask (mask = 2^t - 1) the
   remainder in [0, 2^t), half = 2^(t-1) (t = 0: 2^62, never reached as r = 0). The caller
   passes mask and half per channel (computed shifts per lane would stop the vectorizer). */
static inline int64_t round_div(int64_t v, int64_t t, int64_t mask, int64_t half, int MODE) {
    int64_t q = v >> t;
    int64_t r = v & mask;
    int64_t up;
    if (MODE == 0) up = r + (v >= 0) > half;
    else if (MODE == 1) up = r >= half;
    else up = r + (q & 1) > half;
    return q + up;
}
"""

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

#define TWO62 ((int64_t)1 << 62)

%ROUND_DIV%
/* LOAD(xi, a, bad): a = the integer value of input element xi (checked against alim) */
#define LOAD_INT(xi, a)                                                                      \
    int64_t a = (int64_t)(xi);                                                               \
    bad |= (a > alim) | (a < -alim);                                                         \
    a = a > alim ? alim : a;                                                                 \
    a = a < -alim ? -alim : a;
#define LOAD_FLT(xi, a)                                                                      \
    double d_ = (double)(xi);                                                                \
    double c_ = d_ > flim ? flim : d_;                                                       \
    c_ = c_ < -flim ? -flim : c_;                                                            \
    int64_t a = (int64_t)c_;                                                                 \
    bad |= (c_ != d_) | ((double)a != d_);      /* beyond alim, NaN, or not an integer */

/* one element: y = clamp(z + contract(a*2^shift + B), qmin, qmax); per-channel K, P, T, L,
   MK (2^T - 1), H (2^(T-1), or 2^62 for T = 0) */
#define ELEM(LOAD, xi, yo, KIND, B, K, P, T, L, MK, H)                                       \
    {                                                                                        \
        LOAD(xi, a)                                                                          \
        int64_t v = a * pshift + (B);                                                        \
        bad |= (v > (L)) | (v < -(L));                                                       \
        v = v > (L) ? (L) : v;                                                               \
        v = v < -(L) ? -(L) : v;                                                             \
        int64_t y;                                                                           \
        if (KIND == 0) {                                                                     \
            int64_t n = v * (P) * (K) + ((int64_t)1 << 30);                                  \
            y = round_div(n >> 31, (T), (MK), (H), 0);                                       \
        } else {                                                                             \
            y = round_div(v * (K), (T), (MK), (H), KIND);                                    \
        }                                                                                    \
        y += zp;                                                                             \
        y = y < qmin ? qmin : y;                                                             \
        y = y > qmax ? qmax : y;                                                             \
        yo = (TOUT_)y;                                                                       \
    }

/* rows (outer x ch) of `inner` contiguous values; inner == 1: channels innermost */
#define LOOPS(LOAD, KIND)                                                                    \
    if (inner == 1) {                                                                        \
        for (int64_t o = 0; o < outer; ++o) {                                                \
            const TIN_* restrict xr = x + o * ch;                                            \
            TOUT_* restrict yr = out + o * ch;                                               \
            for (int64_t c = 0; c < ch; ++c)                                                 \
                ELEM(LOAD, xr[c], yr[c], KIND, B[c], K[c], P[c], T[c], L[c], MK[c], H[c])    \
        }                                                                                    \
    } else {                                                                                 \
        for (int64_t o = 0; o < outer; ++o)                                                  \
            for (int64_t c = 0; c < ch; ++c) {                                               \
                const TIN_* xr = x + (o * ch + c) * inner;                                   \
                TOUT_* yr = out + (o * ch + c) * inner;                                      \
                const int64_t bc = B[c], kc = K[c], pc = P[c], tc = T[c], lc = L[c];         \
                const int64_t mc = MK[c], hc = H[c];                                         \
                for (int64_t i = 0; i < inner; ++i)                                          \
                    ELEM(LOAD, xr[i], yr[i], KIND, bc, kc, pc, tc, lc, mc, hc)               \
            }                                                                                \
    }

/* returns 0, or nonzero where some element leaves the definition's range (nothing to use) */
#define KERNEL(NAME, TIN, TOUT, LOAD)                                                        \
int64_t NAME(const TIN* restrict x, int64_t outer, int64_t ch, int64_t inner,              \
             TOUT* restrict out, const int64_t* restrict B, const int64_t* restrict K,       \
             const int64_t* restrict P, const int64_t* restrict T,                           \
             const int64_t* restrict L, const int64_t* restrict MK,                          \
             const int64_t* restrict H, int64_t shift, int64_t kind, int64_t zp,             \
             int64_t qmin, int64_t qmax) {                                                   \
    typedef TIN TIN_;                                                                        \
    typedef TOUT TOUT_;                                                                      \
    const int64_t pshift = (int64_t)1 << shift;                                              \
    const int64_t alim = (((int64_t)1) << (62 - shift)) - 1;                                 \
    const double flim = (double)(((int64_t)1) << (61 - shift));  /* exact, below alim */     \
    (void)flim;                                                                              \
    int64_t bad = 0;                                                                         \
    if (kind == 0) { LOOPS(LOAD, 0) }                                                        \
    else if (kind == 1) { LOOPS(LOAD, 1) }                                                   \
    else { LOOPS(LOAD, 2) }                                                                  \
    return bad;                                                                              \
}

#define OUTS(NI, TIN, LOAD)                                                                  \
    KERNEL(rqref_##NI##_i8, TIN, int8_t, LOAD)                                               \
    KERNEL(rqref_##NI##_i16, TIN, int16_t, LOAD)                                             \
    KERNEL(rqref_##NI##_i32, TIN, int32_t, LOAD)                                             \
    KERNEL(rqref_##NI##_i64, TIN, int64_t, LOAD)
OUTS(u8, uint8_t, LOAD_INT)
OUTS(i8, int8_t, LOAD_INT)
OUTS(u16, uint16_t, LOAD_INT)
OUTS(i16, int16_t, LOAD_INT)
OUTS(i32, int32_t, LOAD_INT)
OUTS(i64, int64_t, LOAD_INT)
OUTS(f32, float, LOAD_FLT)
OUTS(f64, double, LOAD_FLT)

/* out = clamp(a + b + c, qmin, qmax) over n values (inputs checked below 2^61: exact int64) */
#define ADD(NAME, TA, TB, TOUT)                                                              \
int64_t NAME(const TA* restrict a, const TB* restrict b, TOUT* restrict out, int64_t n,      \
             int64_t c, int64_t qmin, int64_t qmax) {                                        \
    const int64_t lim = ((int64_t)1) << 61;                                                  \
    int64_t bad = 0;                                                                         \
    for (int64_t i = 0; i < n; ++i) {                                                        \
        int64_t va = (int64_t)a[i], vb = (int64_t)b[i];                                      \
        bad |= (va > lim) | (va < -lim) | (vb > lim) | (vb < -lim);                          \
        va = va > lim ? lim : va;                                                            \
        va = va < -lim ? -lim : va;                                                          \
        vb = vb > lim ? lim : vb;                                                            \
        vb = vb < -lim ? -lim : vb;                                                          \
        int64_t y = va + vb + c;                                                             \
        y = y < qmin ? qmin : y;                                                             \
        y = y > qmax ? qmax : y;                                                             \
        out[i] = (TOUT)y;                                                                    \
    }                                                                                        \
    return bad;                                                                              \
}
#define ADD_B(NA, TA, NB, TB)                                                                \
    ADD(addref_##NA##_##NB##_i8, TA, TB, int8_t)                                             \
    ADD(addref_##NA##_##NB##_i16, TA, TB, int16_t)
#define ADD_A(NA, TA)                                                                        \
    ADD_B(NA, TA, u8, uint8_t) ADD_B(NA, TA, i8, int8_t) ADD_B(NA, TA, i16, int16_t)          \
    ADD_B(NA, TA, i64, int64_t)
ADD_A(u8, uint8_t)
ADD_A(i8, int8_t)
ADD_A(i16, int16_t)
ADD_A(i64, int64_t)
""".replace("%ROUND_DIV%", ROUND_DIV_C)

_IN = {np.dtype(np.uint8): "u8", np.dtype(np.int8): "i8", np.dtype(np.uint16): "u16",
       np.dtype(np.int16): "i16", np.dtype(np.int32): "i32", np.dtype(np.int64): "i64",
       np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_OUT = {np.dtype(np.int8): "i8", np.dtype(np.int16): "i16", np.dtype(np.int32): "i32",
        np.dtype(np.int64): "i64"}
_ADD_IN = {np.dtype(np.uint8): "u8", np.dtype(np.int8): "i8", np.dtype(np.int16): "i16",
           np.dtype(np.int64): "i64"}
_ADD_OUT = {np.dtype(np.int8): "i8", np.dtype(np.int16): "i16"}
_KIND = {"gemmlowp": 0, "single": 1, "hawq": 2}
_I64 = ctypes.c_int64
_P = ctypes.c_void_p
_MAX64 = 2 ** 63 - 1


def _load() -> ctypes.CDLL | None:
    dll = build_library("native_reference", _SOURCE)
    if dll is None:
        return None
    declare(dll, (f"rqref_{i}_{o}" for i in _IN.values() for o in _OUT.values()), _I64,
            [_P, _I64, _I64, _I64] + [_P] * 8 + [_I64] * 5)
    declare(dll, (f"addref_{a}_{b}_{o}" for a in _ADD_IN.values() for b in _ADD_IN.values()
                  for o in _ADD_OUT.values()), _I64, [_P, _P, _P] + [_I64] * 4)
    return dll


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return checked_library(_load, _self_test)


def native_reference_available() -> bool:
    """The kernel is built, loaded and passed its self-test (and :data:`ENABLED`)."""
    return ENABLED and _library() is not None


def _axis(x: np.ndarray, params: list[np.ndarray]) -> int | None:
    """The one dim along which the channel-shaped ``params`` vary (None: all per-tensor); -1
    where they do not fit ``x`` (several dims, or extents other than 1 and ``x``'s)."""
    ax = None
    for p in params:
        if p.size == 1:
            continue
        if p.ndim != x.ndim:
            return -1
        big = [k for k in range(p.ndim) if p.shape[k] != 1]
        if len(big) != 1 or p.shape[big[0]] != x.shape[big[0]] or (ax is not None and ax != big[0]):
            return -1
        ax = big[0]
    return ax


def _vector(p: np.ndarray, ch: int) -> np.ndarray:
    """A channel-shaped or 0-d array as ``ch`` int64 values."""
    return np.ascontiguousarray(np.broadcast_to(np.asarray(p).reshape(-1), (ch,)), dtype=np.int64)


def _constants(rounding: str, m: np.ndarray, e: np.ndarray, bits: int
               ) -> tuple[np.ndarray, ...] | None:
    """Per-channel ``(K, P, T, L)`` of the kernel (see the module docstring), or None where a
    shift leaves what int64 shifts can do."""
    if rounding == "gemmlowp":
        if bits > 31 or e.max(initial=0) > 31 or -e.min(initial=0) > 62:
            return None
        left = np.maximum(e, 0)
        k = m << (31 - bits)                                   # m31
        return k, np.left_shift(1, left), np.maximum(-e, 0), np.right_shift(1 << 31, left)
    t = bits - e
    up = np.maximum(-t, 0)
    if t.max(initial=0) > 62 or up.max(initial=0) > 62:
        return None
    k = [int(mc) << int(u) for mc, u in zip(m.tolist(), up.tolist())]
    if max(k, default=0) > _MAX64:
        return None
    lim = [_MAX64 // kc if kc else _MAX64 for kc in k]            # |v|·K <= 2^63 − 1
    return (np.array(k, dtype=np.int64), np.ones_like(t), np.maximum(t, 0),
            np.array(lim, dtype=np.int64))


def requant_codes(x: np.ndarray, m: np.ndarray, e: np.ndarray, rounding: str, bits: int,
                  out_zp: int, qmin: int, qmax: int, out_dtype: type,
                  bias: np.ndarray | None = None, shift: int = 0) -> np.ndarray | None:
    """``clamp(z + contract((x·2^shift + bias)·m·2^(e − bits)), qmin, qmax)`` as a new C-ordered
    ``out_dtype`` array (int8/16/32/64), or None where the kernel does not apply (no library,
    float-rne, a layout other than C-contiguous, parameters varying along several dims, a value
    outside the definition's range: see the module docstring). ``m``, ``e`` (int64 multipliers
    and shifts) and ``bias`` (integers, any numeric dtype) are 0-d, size-1 or channel-shaped
    (``x.ndim`` dims, one of them ``x``'s extent)."""
    if not ENABLED or rounding not in _KIND or not isinstance(x, np.ndarray) \
            or x.dtype not in _IN or np.dtype(out_dtype) not in _OUT or x.size == 0 \
            or not x.flags.c_contiguous or not 0 <= shift <= 30:
        return None
    info = np.iinfo(out_dtype)
    if not (info.min <= qmin <= qmax <= info.max) or abs(int(out_zp)) > 2 ** 40:
        return None
    m, e = np.asarray(m), np.asarray(e)
    params = [m, e] + ([] if bias is None else [np.asarray(bias)])
    ax = _axis(x, params)
    if ax == -1:
        return None
    dll = _library()
    return None if dll is None else _run(dll, x, m, e, rounding, bits, out_zp, qmin, qmax,
                                         out_dtype, bias, shift, ax)


def _run(dll: ctypes.CDLL, x: np.ndarray, m: np.ndarray, e: np.ndarray, rounding: str, bits: int,
         out_zp: int, qmin: int, qmax: int, out_dtype: type, bias: np.ndarray | None, shift: int,
         ax: int | None) -> np.ndarray | None:
    if ax is None:
        outer, ch, inner = 1, 1, x.size
    else:
        outer, ch, inner = math.prod(x.shape[:ax]), x.shape[ax], math.prod(x.shape[ax + 1:])
    key = (rounding, bits, ch, _key(m), _key(e), None if bias is None else _key(bias))
    consts = _PREPARED.get(key)
    if consts is None:
        if len(_PREPARED) >= 4096:
            _PREPARED.clear()
        consts = _PREPARED[key] = _prepare(rounding, bits, ch, m, e, bias)
    if not consts:
        return None
    out = np.empty(x.shape, dtype=out_dtype)
    fn = getattr(dll, f"rqref_{_IN[x.dtype]}_{_OUT[out.dtype]}")
    bad = fn(x.ctypes.data, outer, ch, inner, out.ctypes.data, *consts[1], int(shift),
             _KIND[rounding], int(out_zp), int(qmin), int(qmax))
    return None if bad else out


# per-channel constants by the parameters' values: (arrays, their addresses), or () where the
# kernel declines them (a layer's multipliers recur on every run)
_PREPARED: dict[tuple, tuple] = {}


def _key(a: np.ndarray) -> tuple:
    a = np.asarray(a)
    return a.dtype.str, a.shape, a.tobytes()


def _prepare(rounding: str, bits: int, ch: int, m: np.ndarray, e: np.ndarray,
             bias: np.ndarray | None) -> tuple:
    """``((B, K, P, T, L, MK, H), their addresses)`` for ``ch`` channels, or ``()``."""
    mv, ev = _vector(m, ch), _vector(e, ch)
    if mv.min(initial=0) < 0:
        return ()
    if bias is None:
        bv = np.zeros(ch, dtype=np.int64)
    else:
        bf = np.asarray(bias)
        if bf.dtype.kind == "f":
            bf = np.broadcast_to(bf.reshape(-1), (ch,))
            if not (np.all(np.abs(bf) <= 2.0 ** 62) and np.all(np.floor(bf) == bf)):
                return ()
        bv = _vector(bf, ch)
        if np.abs(bv).max(initial=0) > 2 ** 62:
            return ()
    consts = _constants(rounding, mv, ev, bits)
    if consts is None:
        return ()
    k, p, t, lim = (np.ascontiguousarray(c, dtype=np.int64) for c in consts)
    mask = (np.left_shift(1, t) - 1).astype(np.int64)
    half = np.where(t > 0, np.left_shift(1, np.maximum(t - 1, 0)), 1 << 62).astype(np.int64)
    arrays = (bv, k, p, t, lim, mask, half)
    return arrays, tuple(a.ctypes.data for a in arrays)


def add_codes(a: np.ndarray, b: np.ndarray, c: int, qmin: int, qmax: int,
              out_dtype: type) -> np.ndarray | None:
    """``clamp(a + b + c, qmin, qmax)`` of two integer arrays of one shape, both C-ordered, as a
    new ``out_dtype`` (int8/int16) array in one pass (int64 sums, exact); None where it does not
    apply (other dtypes or layouts, no library, a value beyond 2^61)."""
    if not (ENABLED and isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
            and a.dtype in _ADD_IN and b.dtype in _ADD_IN and np.dtype(out_dtype) in _ADD_OUT
            and a.shape == b.shape and a.size and a.flags.c_contiguous and b.flags.c_contiguous
            and abs(int(c)) < 2 ** 61):
        return None
    info = np.iinfo(out_dtype)
    if not info.min <= qmin <= qmax <= info.max:
        return None
    dll = _library()
    return None if dll is None else _add_run(dll, a, b, c, qmin, qmax, out_dtype)


def _add_run(dll: ctypes.CDLL, a: np.ndarray, b: np.ndarray, c: int, qmin: int, qmax: int,
             out_dtype: type) -> np.ndarray | None:
    out = np.empty(a.shape, dtype=out_dtype)
    bad = getattr(dll, f"addref_{_ADD_IN[a.dtype]}_{_ADD_IN[b.dtype]}_{_ADD_OUT[out.dtype]}")(
        a.ctypes.data, b.ctypes.data, out.ctypes.data, a.size, int(c), int(qmin), int(qmax))
    return None if bad else out


def _rounded(v: int, t: int, mode: str) -> int:
    """``v / 2^t`` rounded half away (rha), half up (rhu) or half to even (rne), in Python ints."""
    if t <= 0:
        return v << -t
    q, r = v >> t, v & ((1 << t) - 1)
    half = 1 << (t - 1)
    if r != half:
        return q + (r > half)
    return q + {"rha": v >= 0, "rhu": True, "rne": q & 1}[mode]


def requant_python(v: int, m: int, e: int, rounding: str, bits: int, out_zp: int, qmin: int,
                   qmax: int) -> int:
    """One value of the definition in Python integers (the kernel's self-test and the tests'
    reference): ``clamp(z + contract(v·m·2^(e − bits)), qmin, qmax)``."""
    if rounding == "gemmlowp":
        m31 = m << (31 - bits)
        high = ((v << max(e, 0)) * m31 + (1 << 30)) >> 31
        y = _rounded(high, max(-e, 0), "rha")
    else:
        y = _rounded(v * m, bits - e, "rhu" if rounding == "single" else "rne")
    return min(max(y + out_zp, qmin), qmax)


def _self_test(dll: ctypes.CDLL) -> bool:
    """The kernel against :func:`requant_python` on random values with ties, both signs, per
    channel and per tensor, left and right shifts, a bias and a pre-shift, every contract."""
    rng = np.random.default_rng(0)
    ch, n = 5, 7
    for rounding in _KIND:
        m = rng.integers(2 ** 29, 2 ** 31 - 1, ch)
        # channel 2: M = 1/2 (single/hawq) or 1/4 (gemmlowp), every other value a tie
        e = np.array([-9, -1, 0 if rounding != "gemmlowp" else -1, 1,
                      -30 if rounding == "gemmlowp" else 33])
        m[2] = 2 ** 30
        x = rng.integers(-2 ** 14, 2 ** 14, (2, ch, n)).astype(np.int32)
        x[0, :, 0] = 0
        x[0, :, 1] = -1
        bias = rng.integers(-500, 500, ch).reshape(1, ch, 1)
        for out_dt, (lo, hi), zp, shift in ((np.int8, (-128, 127), 3, 2),
                                            (np.int64, (-2 ** 62, 2 ** 62), 0, 0)):
            got = _run(dll, x, m.reshape(1, ch, 1), e.reshape(1, ch, 1), rounding, 31, zp, lo, hi,
                       out_dt, bias, shift, 1)
            if got is None:
                return False
            for (o, c, i), g in np.ndenumerate(got):
                v = (int(x[o, c, i]) << shift) + int(bias[0, c, 0])
                if int(g) != requant_python(v, int(m[c]), int(e[c]), rounding, 31, zp, lo, hi):
                    return False
    qa = rng.integers(-128, 128, 64).astype(np.int8)
    qb = rng.integers(-2000, 2000, 64)
    got = _add_run(dll, qa, qb, 7, -128, 127, np.int8)
    want = np.clip(qa.astype(np.int64) + qb + 7, -128, 127)
    return got is not None and np.array_equal(got, want)
