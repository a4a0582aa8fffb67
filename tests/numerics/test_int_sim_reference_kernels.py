"""The oracle's whole-tensor kernels equal their scalar / int64 definitions exactly."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms.int_sim_reference import quantize_multiplier_exact, requant_ref
from qpasses.algorithms.int_sim_reference_kernels import (bit_length_vec, conv_exact,
                                                          exact_matmul, isqrt_vec,
                                                          quantize_multipliers_exact)

from .conv_definition import conv_int64


@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.lists(st.one_of(st.floats(min_value=1e-12, max_value=1e6), st.just(0.0),
                          st.just(1.0), st.just(0.5 - 2 ** -40), st.floats(-5, 0)),
                min_size=1, max_size=20),
       st.sampled_from([31, 15, 7]))
def test_vector_multipliers_equal_the_fraction_version(reals, bits):
    mult, shift = quantize_multipliers_exact(np.array(reals), bits)
    want = [quantize_multiplier_exact(r, bits) for r in reals]
    assert list(zip(mult.tolist(), shift.tolist())) == want


def test_vector_multiplier_ties_round_half_up():
    # f·2^31 = k + 1/2 exactly: half up
    r = (2 ** 30 + 0.5) / 2 ** 31
    assert quantize_multipliers_exact(np.array([r]))[0][0] == 2 ** 30 + 1
    assert quantize_multiplier_exact(r) == (2 ** 30 + 1, 0)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(st.lists(st.integers(0, 2 ** 62 - 1), min_size=1, max_size=30))
def test_isqrt_and_bit_length_equal_python_integers(vs):
    edges = [0, 1, 2, 3, 4, 2 ** 52 - 1, 2 ** 53 + 1, 2 ** 61 - 1, 2 ** 61, 2 ** 62 - 1,
             (2 ** 31 - 1) ** 2, (2 ** 31 - 1) ** 2 - 1, (2 ** 30) ** 2 - 1]
    v = np.array(vs + edges, dtype=np.int64)
    assert isqrt_vec(v).tolist() == [math.isqrt(int(a)) for a in v]
    assert bit_length_vec(v).tolist() == [int(a).bit_length() for a in v]


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.sampled_from([(1, 4, 4), (2, 4, 2), (4, 4, 8), (1, 3, 6)]), st.integers(1, 3),
       st.integers(1, 2), st.integers(1, 2), st.sampled_from([255, 2 ** 12, 2 ** 24]),
       st.integers(0, 10 ** 6))
def test_conv_exact_equals_int64_loops(gco, k, s, d, hi, seed):
    groups, c, o = gco
    rng = np.random.default_rng(seed)
    # hi picks the path: accumulator bound below 2^24 (float32), 2^53 (float64), else int64
    xs = rng.integers(-hi, hi, size=(2, c, 7, 6), dtype=np.int64)
    wz = rng.integers(-hi, hi, size=(o, c // groups, k, k), dtype=np.int64)
    out = [(7 - d * (k - 1) - 1) // s + 1, (6 - d * (k - 1) - 1) // s + 1]
    got = conv_exact(xs, wz, (s, s), (d, d), out, groups)
    assert got.dtype == np.int64
    assert np.array_equal(got, conv_int64(xs, wz, (s, s), (d, d), out, groups))


@settings(deadline=None, max_examples=20, derandomize=True)
@given(st.integers(1, 40), st.sampled_from([255, 2 ** 20, 2 ** 26]), st.integers(0, 10 ** 6))
def test_exact_matmul_equals_python_integers(k, hi, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-hi, hi, size=(3, k), dtype=np.int64)
    b = rng.integers(-hi, hi, size=(k, 4), dtype=np.int64)
    want = [[sum(int(a[i, t]) * int(b[t, j]) for t in range(k)) for j in range(4)]
            for i in range(3)]
    assert exact_matmul(a, b).tolist() == want


def _round_exact(fr: Fraction, mode: str) -> int:
    fl = math.floor(fr)
    rem = fr - fl
    if rem != Fraction(1, 2):
        return fl + (rem > Fraction(1, 2))
    if mode == "rhu":
        return fl + 1
    if mode == "rha":
        return fl + (fr > 0)
    return fl + (fl % 2)                                   # rne: to the even neighbour


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.lists(st.integers(-2 ** 20, 2 ** 20), min_size=4, max_size=4),
       st.sampled_from(["single", "hawq"]), st.integers(0, 10 ** 6))
def test_per_channel_requant_rounds_ties_by_its_contract(xs, rounding, seed):
    """Per-channel shifts broadcast (never expanded) with ties: reals 2^-k and a non-dyadic one."""
    rng = np.random.default_rng(seed)
    ks = [int(rng.integers(1, 12)) for _ in range(3)]
    reals = np.array([2.0 ** -k for k in ks] + [0.3])
    x = np.array(xs, dtype=np.int64).reshape(1, 1, 4) * np.ones((1, 4, 1), dtype=np.int64)
    for c, k in enumerate(ks):                      # exact ties x/2^k = ±odd/2
        x[0, c, :2] = np.array([3, -3]) * 2 ** (k - 1)
    got = requant_ref(x, reals, rounding, 31, 1, 0, -2 ** 40, 2 ** 40)
    mode = "rhu" if rounding == "single" else "rne"
    for c, r in enumerate(reals):
        m, e = quantize_multiplier_exact(float(r), 31)
        for j in range(4):
            want = _round_exact(Fraction(int(x[0, c, j]) * m, 2 ** (31 - e)), mode)
            assert int(got[0, c, j]) == want
