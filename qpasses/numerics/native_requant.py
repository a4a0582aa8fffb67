"""Compiled one-pass forms of the fast integer simulation's elementwise hot spots: the conv/linear
epilogue (:meth:`RequantPlan.apply <qpasses.numerics.fast_requant.RequantPlan.apply>`,
:func:`native_apply`), the exact residual add of 8-bit codes (:func:`native_add`), requantization
tables (:func:`native_lut`) and :class:`~qpasses.numerics.fast_requant.AffineFloor`
(:func:`native_affine`). Each computes exactly what it replaces, element by element, in one pass
of a small C kernel; the rest of this docstring is about the epilogue, the only one with an
argument (the add sums 8-bit codes in int32, the table is the table, and the affine map repeats
the same float32 operations in the same order, IEEE and uncontracted).

The eager plan runs its exact float64 formulas as 6–10 tensor passes per block of accumulators;
this module runs the *same* formulas element by element in one pass of a small C kernel (compiled
once per machine with the system C compiler, loaded with :mod:`ctypes`, no torch headers):

* ``a = clamp(double(acc)·2^k + add[c], lo[c], hi[c])`` (the plan's exact window, step 1 of
  :class:`~qpasses.numerics.fast_requant.RequantPlan`);
* ``gemmlowp``: ``y = floor(a·S[c] + C[c] − [a < 0]·R[c])``; ``single``: ``y = floor(a·S[c] +
  C[c])``; ``hawq``: ``y = rint(a·S[c]) + z`` (round half to even, the default rounding mode);
* ``out = (code) clamp(y, qmin, qmax)``.

Exactness is the plan's (its step 3): in ``float64`` mode every term is a multiple of the plan's
unit and below 2^53 of them, so each operation — and any association of the sums — is exact:
``fma(a, S, C)`` (one rounding) equals ``a·S + C`` (two) since neither rounds, and
``floor``/``rint`` see the exact value. ``a`` itself is exact: int32 accumulators convert exactly,
and float32 ones (oneDNN's, :mod:`~qpasses.numerics.int_conv_onednn`) are exact integers wherever
the window does not clamp them. The final clamp is the identity unless the plan needs it. Only the
plan's ``float64`` mode with the integer contracts, int32/float32 accumulators and uint8/int8
codes in dense rows are handled (:func:`native_apply` returns False otherwise and the caller runs
the eager plan). A self-test against the eager plan on every contract, accumulator and output
dtype runs when the library is first loaded; any failure (no compiler, a build or load error, a
mismatch) disables the kernels for the process. They are single-threaded: with more than
:data:`MAX_THREADS` intra-op threads the (parallel) tensor passes run instead.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
from typing import Any

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.layout import is_dense
from qpasses.numerics.native_build import build_library, checked_library, declare

__all__ = ["ENABLED", "MAX_THREADS", "native_add", "native_apply", "native_affine", "native_available",
           "native_lut"]

# Switch for tests and benchmarks (False: the eager plan everywhere).
ENABLED = True
# The kernels run on one thread, about 3x faster than one thread of the tensor passes: with more
# intra-op threads than this the (parallel) tensor passes run instead.
MAX_THREADS = 3


def _on() -> bool:
    return ENABLED and torch.get_num_threads() <= MAX_THREADS

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* one row loop per (contract, with 2^k, with the output clamp): no per-element branches */
#define ROWS(KIND, PRE, CLAMP)                                                               \
    for (int64_t r = 0; r < rows; ++r) {                                                     \
        const TIN_* ar = acc + r * acc_stride;                                               \
        TOUT_* orow = out + r * out_stride;                                                  \
        for (int64_t c = 0; c < ch; ++c) {                                                   \
            double a = (double)ar[c];                                                        \
            if (PRE) a = a * pre;                                                            \
            a = a + add[c];                                                                  \
            a = a < lo[c] ? lo[c] : a;                                                       \
            a = a > hi[c] ? hi[c] : a;                                                       \
            double y;                                                                        \
            if (KIND == 0) y = floor(fma(a, S[c], C[c]) - (a < 0.0 ? R[c] : 0.0));             \
            else if (KIND == 1) y = floor(fma(a, S[c], C[c]));                                 \
            else y = rint(a * S[c]) + z;                                                     \
            if (CLAMP) { y = y < qmin ? qmin : y; y = y > qmax ? qmax : y; }                 \
            orow[c] = (TOUT_)(int32_t)y;                                                     \
        }                                                                                    \
    }
#define KIND_ROWS(KIND)                                                                      \
    if (pre != 1.0) { if (clamp) { ROWS(KIND, 1, 1) } else { ROWS(KIND, 1, 0) } }             \
    else { if (clamp) { ROWS(KIND, 0, 1) } else { ROWS(KIND, 0, 0) } }

#define KERNEL(NAME, TIN, TOUT)                                                              \
void NAME(const TIN* acc, int64_t rows, int64_t ch, int64_t acc_stride, TOUT* out,           \
          int64_t out_stride, const double* add, const double* lo, const double* hi,         \
          const double* S, const double* C, const double* R, double pre, int kind, double z, \
          double qmin, double qmax, int clamp) {                                             \
    typedef TIN TIN_;                                                                        \
    typedef TOUT TOUT_;                                                                      \
    if (kind == 0) { KIND_ROWS(0) } else if (kind == 1) { KIND_ROWS(1) } else { KIND_ROWS(2) } \
}

KERNEL(rq_i32_u8, int32_t, uint8_t)
KERNEL(rq_i32_i8, int32_t, int8_t)
KERNEL(rq_f32_u8, float, uint8_t)
KERNEL(rq_f32_i8, float, int8_t)

/* out = clamp(a + b + c, qmin, qmax) over n dense elements (int32 sums of 8-bit codes: exact) */
#define ADD2(NAME, TA, TB, TO)                                                               \
void NAME(const TA* a, const TB* b, TO* out, int64_t n, int32_t c, int32_t qmin,             \
          int32_t qmax) {                                                                    \
    for (int64_t i = 0; i < n; ++i) {                                                        \
        int32_t y = (int32_t)a[i] + (int32_t)b[i] + c;                                       \
        y = y < qmin ? qmin : y;                                                             \
        y = y > qmax ? qmax : y;                                                             \
        out[i] = (TO)y;                                                                      \
    }                                                                                        \
}
#define ADD2_ALL(TA, NA, TB, NB)                                                             \
    ADD2(add_##NA##_##NB##_u8, TA, TB, uint8_t)                                              \
    ADD2(add_##NA##_##NB##_i8, TA, TB, int8_t)                                               \
    ADD2(add_##NA##_##NB##_i16, TA, TB, int16_t)
ADD2_ALL(uint8_t, u8, uint8_t, u8)
ADD2_ALL(uint8_t, u8, int8_t, i8)
ADD2_ALL(int8_t, i8, uint8_t, u8)
ADD2_ALL(int8_t, i8, int8_t, i8)

/* out = table[q - base] over n dense codes; returns how many codes fell outside the table */
#define LUT(NAME, TI, TO)                                                                    \
int64_t NAME(const TI* q, TO* out, int64_t n, const TO* table, int64_t size, int64_t base) { \
    int64_t bad = 0;                                                                         \
    for (int64_t i = 0; i < n; ++i) {                                                        \
        int64_t k = (int64_t)q[i] - base;                                                    \
        int64_t ok = (k >= 0) & (k < size);                                                  \
        bad += 1 - ok;                                                                       \
        out[i] = table[ok ? k : 0];                                                          \
    }                                                                                        \
    return bad;                                                                              \
}
/* one instance per (input codes, output codes) pair: u8/i8/i16 -> u8/i8 (_build's argtypes) */
#define CODE_PAIRS(K, P)                                                                     \
    K(P##_u8_u8, uint8_t, uint8_t) K(P##_u8_i8, uint8_t, int8_t)                             \
    K(P##_i8_u8, int8_t, uint8_t) K(P##_i8_i8, int8_t, int8_t)                               \
    K(P##_i16_u8, int16_t, uint8_t) K(P##_i16_i8, int16_t, int8_t)
CODE_PAIRS(LUT, lut)

/* AffineFloor.apply's float32 operations in its order: y = floor((float)q * s + c), clamped to
   [lo, hi], stored as (int)y + off */
#define AFF(NAME, TI, TO)                                                                    \
void NAME(const TI* q, TO* out, int64_t n, float s, float c, float lo, float hi, int32_t off) { \
    for (int64_t i = 0; i < n; ++i) {                                                        \
        float y = (float)q[i] * s;                                                           \
        y = y + c;                                                                           \
        y = floorf(y);                                                                       \
        y = y < lo ? lo : y;                                                                 \
        y = y > hi ? hi : y;                                                                 \
        out[i] = (TO)((int32_t)y + off);                                                     \
    }                                                                                        \
}
CODE_PAIRS(AFF, aff)
"""

_NAMES = {(torch.int32, torch.uint8): "rq_i32_u8", (torch.int32, torch.int8): "rq_i32_i8",
          (torch.float32, torch.uint8): "rq_f32_u8", (torch.float32, torch.int8): "rq_f32_i8"}
_KIND = {"gemmlowp": 0, "single": 1, "hawq": 2}
_SHORT = {torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16"}
_D = ctypes.c_double
_F = ctypes.c_float
_I64 = ctypes.c_int64
_P = ctypes.c_void_p


def _build() -> ctypes.CDLL | None:
    dll = build_library("native_requant", _SOURCE)
    if dll is None:
        return None
    declare(dll, _NAMES.values(), None, [_P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _P,
                                         _D, ctypes.c_int, _D, _D, _D, ctypes.c_int])
    i32 = ctypes.c_int32
    declare(dll, (f"add_{a}_{b}_{o}" for a, b, o in itertools.product(
        ("u8", "i8"), ("u8", "i8"), ("u8", "i8", "i16"))), None, [_P, _P, _P, _I64, i32, i32, i32])
    pairs = list(itertools.product(("u8", "i8", "i16"), ("u8", "i8")))
    declare(dll, (f"lut_{i}_{o}" for i, o in pairs), _I64, [_P, _P, _I64, _P, _I64, _I64])
    declare(dll, (f"aff_{i}_{o}" for i, o in pairs), None, [_P, _P, _I64, _F, _F, _F, _F, i32])
    return dll


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    return checked_library(_build, _self_test)


def native_available() -> bool:
    """The compiled kernels are built, loaded and passed their self-test (and :data:`ENABLED`;
    whatever the thread count)."""
    return ENABLED and _library() is not None


def _vectors(plan: Any, n: int) -> tuple[Tensor, ...]:
    """(add, lo, hi, S, C, R) as float64 vectors of ``n`` channels (a per-tensor plan's numbers
    repeated), cached on the plan."""
    cache = plan.__dict__.setdefault("native_vectors", {})
    out = cache.get(n)
    if out is None:
        zeros = torch.zeros(n, dtype=torch.float64)

        def vec(name: str) -> Tensor:
            t = plan.vecs.get(name)
            return zeros if t is None else \
                t.to(torch.float64).reshape(-1).expand(n).contiguous()
        out = cache[n] = tuple(vec(k) for k in ("add", "lo", "hi", "S", "C", "R"))
    return out


def _call(dll: ctypes.CDLL, plan: Any, acc: Tensor, out: Tensor) -> None:
    add, lo, hi, s, c, r = _vectors(plan, acc.shape[1])
    fn = getattr(dll, _NAMES[(acc.dtype, out.dtype)])
    rows, ch = acc.shape
    fn(acc.data_ptr(), rows, ch, acc.stride(0), out.data_ptr(), out.stride(0), add.data_ptr(),
       lo.data_ptr(), hi.data_ptr(), s.data_ptr(), c.data_ptr(), r.data_ptr(),
       float(2.0 ** plan.pre_shift), _KIND[plan.rounding], float(plan.zero_point),
       float(plan.qmin), float(plan.qmax), int(bool(plan.clamp)))


def native_apply(plan: Any, acc: Tensor, out: Tensor) -> bool:
    """Write ``plan``'s requantization of the (rows, channels) accumulator block ``acc`` into
    ``out`` in one compiled pass and return True; False (nothing written) where the kernel does not
    apply: see the module docstring."""
    if not (_on() and plan.mode == "float64" and plan.rounding in _KIND
            and (acc.dtype, out.dtype) in _NAMES and acc.dim() == 2 and acc.shape == out.shape
            and not acc.is_cuda and not out.is_cuda
            and acc.stride(1) == 1 and out.stride(1) == 1
            and plan.channels in (1, acc.shape[1])
            and acc.shape[0] > 0):
        return False
    dll = _library()
    if dll is None:
        return False
    _call(dll, plan, acc, out)
    return True


def _same_dense(*ts: Tensor) -> bool:
    """Every tensor on CPU, non-overlapping and dense, with the same shape and strides (so one
    flat index walks them all alike)."""
    t0 = ts[0]
    return all(not t.is_cuda and t.shape == t0.shape and t.stride() == t0.stride()
               for t in ts) and t0.numel() > 0 and is_dense(t0.shape, t0.stride())


def native_add(a: Tensor, b: Tensor, c: int, qmin: int, qmax: int,
               out_dtype: torch.dtype) -> Tensor | None:
    """``clamp(a + b + c, qmin, qmax)`` of two 8-bit code tensors in one pass (int32 sums, exact)
    as a new ``out_dtype`` tensor in ``a``'s layout, or None where it does not apply."""
    if not (_on() and a.dtype in (torch.uint8, torch.int8) and b.dtype in (torch.uint8,
            torch.int8) and out_dtype in _SHORT and abs(int(c)) < 2 ** 20
            and _same_dense(a, b)):
        return None
    info = torch.iinfo(out_dtype)
    if qmin < info.min or qmax > info.max:
        return None
    got = _library_and_output(a, out_dtype)
    if got is None:
        return None
    dll, out = got
    getattr(dll, f"add_{_SHORT[a.dtype]}_{_SHORT[b.dtype]}_{_SHORT[out_dtype]}")(
        a.data_ptr(), b.data_ptr(), out.data_ptr(), a.numel(), int(c), int(qmin), int(qmax))
    return out


def _library_and_output(like: Tensor, dtype: torch.dtype
                        ) -> tuple[ctypes.CDLL, Tensor] | None:
    """The loaded kernels and a new ``dtype`` tensor in ``like``'s layout (element for element,
    as the kernels write it), or None without the library or with another layout."""
    dll = _library()
    if dll is None:
        return None
    out = torch.empty_like(like, dtype=dtype)
    return (dll, out) if out.stride() == like.stride() else None


def native_lut(table: Tensor, q: Tensor, base: int) -> Tensor | None:
    """``table[q − base]`` in one pass as a new tensor in ``q``'s layout (None where it does not
    apply); a code outside the table raises :class:`NumericsError` like ``lut_gather``."""
    if not (_on() and q.dtype in _SHORT and table.dtype in (torch.uint8, torch.int8)
            and table.dim() == 1 and table.is_contiguous() and not table.is_cuda
            and _same_dense(q)):
        return None
    got = _library_and_output(q, table.dtype)
    if got is None:
        return None
    dll, out = got
    bad = getattr(dll, f"lut_{_SHORT[q.dtype]}_{_SHORT[table.dtype]}")(
        q.data_ptr(), out.data_ptr(), q.numel(), table.data_ptr(), table.numel(), int(base))
    if bad:
        raise NumericsError(f"lookup table of {table.numel()} entries: {bad} input codes lie "
                            f"outside the range it was built for")
    return out


def native_affine(affine: Any, q: Tensor, out_dtype: torch.dtype) -> Tensor | None:
    """:meth:`AffineFloor.apply <qpasses.numerics.fast_requant.AffineFloor.apply>` in one pass:
    the same float32 operations in the same order (IEEE, correctly rounded, no contraction), so
    the codes it was verified on come out alike; a new tensor in ``q``'s layout, or None."""
    if not (_on() and q.dtype in _SHORT and out_dtype in (torch.uint8, torch.int8)
            and _same_dense(q)):
        return None
    got = _library_and_output(q, out_dtype)
    if got is None:
        return None
    dll, out = got
    off = 128 if out_dtype == torch.uint8 else 0
    f32 = functools.partial(torch.tensor, dtype=torch.float32)
    # the eager form adds the Python number c − off, which torch rounds to float32 first
    c, lo, hi = (float(f32(v)) for v in (affine.c - off, affine.qmin - off, affine.qmax - off))
    getattr(dll, f"aff_{_SHORT[q.dtype]}_{_SHORT[out_dtype]}")(
        q.data_ptr(), out.data_ptr(), q.numel(), float(f32(affine.s)), c, lo, hi, off)
    return out


def _self_test(dll: ctypes.CDLL) -> bool:
    """The kernel against the eager plan on random accumulators well beyond the windows, every
    contract, both accumulator and both output dtypes, with and without an added vector."""
    from qpasses.numerics.fast_requant import RequantPlan
    g = torch.Generator().manual_seed(0)
    n = 24
    for rounding in _KIND:
        for qmin, qmax, odt in ((0, 255, torch.uint8), (-128, 127, torch.int8),
                                (3, 200, torch.uint8)):
            m = torch.randint(2 ** 29, 2 ** 31 - 1, (n,), generator=g)
            shift = torch.randint(-14, 0, (n,), generator=g)
            add = torch.randint(-3000, 3000, (n,), generator=g)
            for pre_add in (None, add):
                plan = RequantPlan(rounding, multiplier=m, shift=shift, zero_point=qmin + 5,
                                   qmin=qmin, qmax=qmax, bound=2 ** 30, pre_add=pre_add)
                if plan.mode != "float64":
                    continue
                acc = torch.randint(-2 ** 21, 2 ** 21, (37, n), generator=g, dtype=torch.int32)
                acc[0] = 0
                acc[1] = -1
                for a in (acc, acc.to(torch.float32)):
                    want = torch.empty((37, n), dtype=odt)
                    plan.apply(a.clone(), want)
                    got = torch.empty((37, n), dtype=odt)
                    _call(dll, plan, a, got)
                    if not torch.equal(got, want):
                        return False
    return True
