"""The oracle's compiled requantization (``native_reference.requant_codes``) equals the contracts'
integer definitions: element for element against Python integers (``requant_python``) and the
oracle's numpy int64 path, for every contract, per channel and per tensor, with left and right
shifts, ties, negative values, a bias and a pre-shift, every input and output dtype, the edges of
the ranges it accepts (and refuses beyond them); without the library the oracle gives the same
codes."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms import int_sim_reference as ref
from qpasses.algorithms import int_sim_reference_kernels as kern
from qpasses.numerics import native_reference as nr
from qpasses.numerics.native_reference import requant_codes, requant_python

# without a C compiler the oracle runs its numpy paths; with one, the kernel must build and pass
# its self-test (a wrong kernel disables itself there: these tests then fail, not skip)
pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                reason="no C compiler")


def test_the_kernel_builds_and_passes_its_self_test():
    assert nr.native_reference_available()

_OUT = {np.int8: (-128, 127), np.int16: (-2 ** 15, 2 ** 15 - 1),
        np.int32: (-2 ** 31, 2 ** 31 - 1), np.int64: (-2 ** 62, 2 ** 62)}
_IN = [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.int64, np.float32, np.float64]
_ROUNDINGS = ["gemmlowp", "single", "hawq"]


def _want(x, m, e, rounding, bits, zp, lo, hi, bias=None, shift=0):
    """The definition per element in Python integers (m, e, bias broadcast to x)."""
    mb, eb = np.broadcast_to(m, x.shape), np.broadcast_to(e, x.shape)
    bb = np.broadcast_to(0 if bias is None else bias, x.shape)
    out = np.empty(x.shape, dtype=np.int64)
    for i in np.ndindex(x.shape):
        v = (int(x[i]) << shift) + int(bb[i])
        out[i] = requant_python(v, int(mb[i]), int(eb[i]), rounding, bits, zp, lo, hi)
    return out


def _values(rng, dtype, shape, log_hi):
    if np.dtype(dtype).kind == "u":
        hi = min(2 ** log_hi, np.iinfo(dtype).max + 1)
        return rng.integers(0, hi, shape).astype(dtype)
    info_hi = 2 ** 24 if dtype == np.float32 else \
        (np.iinfo(dtype).max + 1 if np.dtype(dtype).kind == "i" else 2 ** 40)
    hi = min(2 ** log_hi, info_hi)
    return rng.integers(-hi, hi, shape).astype(dtype)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.sampled_from(_ROUNDINGS), st.sampled_from(_IN), st.sampled_from(list(_OUT)),
       st.sampled_from([31, 15, 7]), st.integers(1, 24), st.integers(0, 3),
       st.sampled_from([None, 0, 1, 2]), st.booleans(), st.integers(0, 3), st.integers(0, 10 ** 6))
def test_kernel_equals_the_integer_definition(rounding, in_dt, out_dt, bits, log_hi, shift,
                                              axis, with_bias, kind, seed):
    rng = np.random.default_rng(seed)
    shape = (2, 3, 5)
    x = _values(rng, in_dt, shape, log_hi)
    x.reshape(-1)[:2] = 0 if np.dtype(in_dt).kind == "u" else [0, -1]
    ch = 1 if axis is None else shape[axis]
    cshape = [1, 1, 1]
    if axis is not None:
        cshape[axis] = ch
    m = rng.integers(2 ** (bits - 1), 2 ** bits, ch)
    e = {0: rng.integers(-12, 1, ch),            # right shifts
         1: rng.integers(-3, 4, ch),             # both (a multiplier above one: left)
         2: np.full(ch, -1),                     # M ~ 1/4: many exact ties
         3: rng.integers(-31, -20, ch)}[kind]     # tiny multipliers
    if kind == 2:
        m[:] = 2 ** (bits - 1)
    bias = rng.integers(-3000, 3000, ch).reshape(cshape) if with_bias else None
    lo, hi = _OUT[out_dt]
    if rng.integers(2):
        lo, hi = lo // 2 + 1, hi // 2 - 1         # a clamp inside the dtype
    zp = int(rng.integers(-5, 6))
    m_c, e_c = m.reshape(cshape), e.reshape(cshape)
    got = requant_codes(x, m_c, e_c, rounding, bits, zp, lo, hi, out_dt, bias, shift)
    # where the definition leaves its operand range the kernel declines (the caller's numpy
    # path then raises or refuses): gemmlowp's int32 operand, single/hawq's int64 product
    vb = np.broadcast_to(0 if bias is None else bias, shape)
    mb, eb = np.broadcast_to(m_c, shape), np.broadcast_to(e_c, shape)
    out_of_range = False
    for i in np.ndindex(shape):
        v = (int(x[i]) << shift) + int(vb[i])
        if rounding == "gemmlowp":
            out_of_range |= abs(v) << max(int(eb[i]), 0) > 2 ** 31
        else:
            out_of_range |= abs(v) * int(mb[i]) << max(int(eb[i]) - bits, 0) >= 2 ** 63
    if out_of_range:
        assert got is None
        return
    want = _want(x, m_c, e_c, rounding, bits, zp, lo, hi, bias, shift)
    assert got is not None and got.dtype == out_dt and got.flags.c_contiguous
    assert np.array_equal(got.astype(np.int64), want)


@pytest.mark.parametrize("rounding", _ROUNDINGS)
def test_every_tie_rounds_as_its_contract(rounding):
    """M = 1/2 (single, hawq) or 1/4 (gemmlowp: SRDHM rounds up, then RDBPOT half away): every
    odd value is an exact tie, both signs."""
    x = np.arange(-41, 42, dtype=np.int32)
    e = np.array(-1 if rounding == "gemmlowp" else 0)
    got = requant_codes(x, np.array(2 ** 30), e, rounding, 31, 0, -128, 127, np.int8)
    want = _want(x, np.array(2 ** 30), e, rounding, 31, 0, -128, 127)
    assert np.array_equal(got, want)
    if rounding == "single":
        assert got[x == -3].item() == -1 and got[x == 3].item() == 2       # half up
    if rounding == "hawq":
        assert got[x == -3].item() == -2 and got[x == 5].item() == 2       # half to even


def test_the_range_edges_are_computed_then_refused():
    # gemmlowp: |v·2^left| = 2^31 is the definition's edge (int32 operand)
    m, e = np.array(2 ** 31 - 1), np.array(1)
    x = np.array([2 ** 30, -(2 ** 30)], dtype=np.int64)
    got = requant_codes(x, m, e, "gemmlowp", 31, 0, -2 ** 62, 2 ** 62, np.int64)
    assert np.array_equal(got, _want(x, m, e, "gemmlowp", 31, 0, -2 ** 62, 2 ** 62))
    assert requant_codes(x + 1, m, e, "gemmlowp", 31, 0, -128, 127, np.int8) is None
    # single/hawq: |v·m·2^(e−bits)| may reach int64's largest magnitude (a left shift, e > bits)
    mm, ee = 2 ** 31 - 1, 40                      # K = m·2^9
    lim = (2 ** 63 - 1) // (mm << 9)
    x = np.array([lim, -lim, lim - 1], dtype=np.int64)
    for rounding in ("single", "hawq"):
        got = requant_codes(x, np.array(mm), np.array(ee), rounding, 31, 0, -2 ** 62, 2 ** 62,
                            np.int64)
        assert np.array_equal(got, _want(x, np.array(mm), np.array(ee), rounding, 31, 0,
                                         -2 ** 62, 2 ** 62))
        assert requant_codes(x + 1, np.array(mm), np.array(ee), rounding, 31, 0, -128, 127,
                             np.int8) is None
    # a bias and a pre-shift at the edge of int64
    x = np.array([2 ** 40], dtype=np.int64)
    assert requant_codes(x, np.array(2 ** 30), np.array(-30), "single", 31, 0, -128, 127,
                         np.int8, np.array(2 ** 62), 30) is None


def test_floats_must_hold_integers():
    m, e = np.array(2 ** 30), np.array(-3)
    for bad in (0.5, np.nan, np.inf, 2.0 ** 62):
        x = np.array([1.0, bad, 3.0])
        assert requant_codes(x, m, e, "single", 31, 0, -128, 127, np.int8) is None
    x = np.array([1.0, -2.0 ** 31, 3.0], dtype=np.float64)
    got = requant_codes(x, m, e, "hawq", 31, 0, -2 ** 62, 2 ** 62, np.int64)
    assert np.array_equal(got, _want(x.astype(np.int64), m, e, "hawq", 31, 0, -2 ** 62, 2 ** 62))


def test_declines_what_it_does_not_handle():
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    m, e = np.array(2 ** 30), np.array(-2)
    assert requant_codes(x.T, m, e, "single", 31, 0, -128, 127, np.int8) is None   # layout
    assert requant_codes(x, m, e, "float-rne", 31, 0, -128, 127, np.int8) is None
    assert requant_codes(x, m, e, "single", 31, 0, -128, 200, np.int8) is None      # qmax > dtype
    both = np.full((3, 4), 2 ** 30)                                                  # two dims
    assert requant_codes(x, both, e, "single", 31, 0, -128, 127, np.int8) is None
    assert requant_codes(x, m, e, "single", 31, 0, -128, 127, np.uint8) is None
    assert requant_codes(x[:0], m, e, "single", 31, 0, -128, 127, np.int8) is None


@pytest.mark.parametrize("rounding", _ROUNDINGS)
def test_the_oracle_without_the_library_gives_the_same_codes(rounding, monkeypatch):
    rng = np.random.default_rng(7)
    acc = rng.integers(-2 ** 22, 2 ** 22, (2, 6, 4, 5))
    reals = rng.uniform(1e-5, 3.0, 6)
    cases = [(acc, reals, 1, 3, -128, 127), (acc.astype(np.float32), reals[:1], None, 0, 0, 255),
             (acc[:, :, 0, 0].copy(), reals, -1, -2, -2 ** 15, 2 ** 15 - 1)]
    calls = []
    keep = nr.requant_codes
    monkeypatch.setattr(kern, "requant_codes", lambda *a, **k: calls.append(1) or keep(*a, **k))
    with_lib = [ref.requant_ref(x, r, rounding, 31, ax, zp, lo, hi) for x, r, ax, zp, lo, hi in
                cases]
    assert calls
    monkeypatch.setattr(nr, "_library", lambda: None)          # no compiler / failed build
    assert not nr.native_reference_available()
    without = [ref.requant_ref(x, r, rounding, 31, ax, zp, lo, hi) for x, r, ax, zp, lo, hi in
               cases]
    for a, b in zip(with_lib, without):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_failing_self_test_disables_the_kernel(monkeypatch):
    nr._library.cache_clear()
    try:
        monkeypatch.setattr(nr, "_self_test", lambda dll: False)
        assert not nr.native_reference_available()
        x = np.arange(4, dtype=np.int32)
        assert requant_codes(x, np.array(2 ** 30), np.array(0), "single", 31, 0, -128, 127,
                             np.int8) is None
    finally:
        nr._library.cache_clear()


_ADD_IN = [np.uint8, np.int8, np.int16, np.int64]


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.sampled_from(_ADD_IN), st.sampled_from(_ADD_IN), st.sampled_from([np.int8, np.int16]),
       st.integers(-300, 300), st.booleans(), st.integers(0, 10 ** 6))
def test_exact_add_equals_the_definition(da, db, out_dt, c, inner_clamp, seed):
    rng = np.random.default_rng(seed)
    a = _values(rng, da, (3, 17), 15)
    b = _values(rng, db, (3, 17), 15)
    lo, hi = _OUT[out_dt]
    if inner_clamp:
        lo, hi = lo + 3, hi - 5
    got = nr.add_codes(a, b, c, lo, hi, out_dt)
    want = np.clip(a.astype(np.int64) + b.astype(np.int64) + c, lo, hi)
    assert got is not None and got.dtype == out_dt and np.array_equal(got, want)
    # the oracle's IntAdd form: zero points folded into c, the same codes without the library
    zps, zy = (int(rng.integers(-9, 9)), int(rng.integers(-9, 9))), int(rng.integers(-9, 9))
    with_lib = kern.exact_add((a, b), zps, zy, lo, hi)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nr, "ENABLED", False)
        without = kern.exact_add((a, b), zps, zy, lo, hi)
    assert with_lib.dtype == without.dtype and np.array_equal(with_lib, without)


def test_exact_add_declines_what_it_does_not_handle():
    a = np.arange(12, dtype=np.int8).reshape(3, 4)
    assert nr.add_codes(a, a.copy(), 0, -128, 127, np.int8) is not None
    assert nr.add_codes(a, a.T.copy().T, 0, -128, 127, np.int8) is None       # F order
    assert nr.add_codes(a, a.T, 0, -128, 127, np.int8) is None                # layout / shape
    assert nr.add_codes(a, a[:1], 0, -128, 127, np.int8) is None              # broadcast
    assert nr.add_codes(a, a.astype(np.int32), 0, -128, 127, np.int8) is None  # dtype
    assert nr.add_codes(a, a, 0, -128, 200, np.int8) is None                  # qmax > dtype
    big = np.array([2 ** 61 + 1] + [0] * 11, dtype=np.int64).reshape(3, 4)
    assert nr.add_codes(a, big, 0, -128, 127, np.int8) is None                # beyond 2^61
