"""The oracle's fast paths added for verify-int-sim's cost (docs/int-sim.md, "Verifying it fast")
equal their definitions: the lookup-table gather (byte translation of 1-byte codes, blocked
``np.take`` of wider ones) on every code of the dtype, in any memory layout and across block
boundaries; the int64 requantization run a block at a time equals the Python-integer definition
of every rounding contract (per channel, ties, values beyond the float64 bound); the LayerNorm's
shifts equal floor division by powers of two, negative values included."""
from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms import int_sim_reference_kernels as kern
from qpasses.algorithms import int_sim_reference_lut as lut
from qpasses.algorithms.int_sim_reference import quantize_multiplier_exact, requant_ref
from qpasses.algorithms.int_sim_reference_transformer import layer_norm_ref, normalized_ref

_UNSIGNED = {1: np.uint8, 2: np.uint16}


def _layouts(a: np.ndarray) -> list[np.ndarray]:
    """``a`` itself, channels-last, permuted, reversed and strided views of it."""
    out = [a, a.transpose(0, 2, 3, 1).copy().transpose(0, 3, 1, 2),
           a.transpose(3, 1, 0, 2), a[:, ::-1], a[..., ::2]]
    return [v for v in out if v.size]


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.sampled_from([np.int8, np.uint8, np.int16, np.uint16]),
       st.sampled_from([np.int8, np.uint8, np.int16, np.int32]),
       st.sampled_from([1, 7, 64, 1 << 15]), st.integers(0, 10 ** 6))
def test_gather_equals_take_in_every_layout(qdt, tdt, block, seed):
    rng = np.random.default_rng(seed)
    info = np.iinfo(qdt)
    q = rng.integers(int(info.min), int(info.max), size=(2, 3, 5, 6), endpoint=True).astype(qdt)
    q.reshape(-1)[:2] = info.min, info.max                    # both ends of the span
    tinfo = np.iinfo(tdt)
    full = rng.integers(int(tinfo.min), int(tinfo.max), endpoint=True,
                        size=1 << (8 * q.itemsize)).astype(tdt)
    old = lut.GATHER_BLOCK
    lut.GATHER_BLOCK = block                      # many blocks, a partial last one
    try:
        for v in _layouts(q):
            got = lut.gather(full, v)
            want = full[v.view(_UNSIGNED[v.itemsize]).astype(np.int64)]
            assert got.dtype == full.dtype and got.shape == v.shape
            assert np.array_equal(got, want)
            if v.flags.c_contiguous or v.flags.f_contiguous:
                # the result walks memory in the order the codes do
                assert np.argsort([-abs(s) for s in got.strides]).tolist() == \
                    np.argsort([-abs(s) for s in v.strides]).tolist()
            got[...] = 0                           # writable (the oracle may work in place)
    finally:
        lut.GATHER_BLOCK = old


def test_gather_of_empty_and_scalar_codes():
    full = np.arange(256, dtype=np.int64).astype(np.uint8).view(np.int8)
    assert lut.gather(full, np.zeros((0, 4), np.int8)).shape == (0, 4)
    assert int(lut.gather(full, np.array(-1, np.int8))) == int(full[255])


def _contract(x: int, real: float, rounding: str, bits: int) -> int:
    """``contract(x·M)`` in Python integers, M re-derived by QuantizeMultiplier (exact)."""
    mult, e = quantize_multiplier_exact(real, bits)
    if rounding == "gemmlowp":
        m31 = mult << (31 - bits)
        v = x << max(e, 0)
        h = (v * m31 + (1 << 30)) >> 31                            # SRDHM
        t = max(-e, 0)
        if not t:
            return h
        q, r = h >> t, h & ((1 << t) - 1)
        half = 1 << (t - 1)
        return q + (r > half or (r == half and h >= 0))           # RDBPOT: half away from 0
    v = Fraction(x * mult) / Fraction(2) ** (bits - e)
    f = math.floor(v)
    rem = v - f
    if rounding == "single":
        return f + (rem >= Fraction(1, 2))
    return f + (rem > Fraction(1, 2) or (rem == Fraction(1, 2) and f % 2 == 1))


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.sampled_from(["gemmlowp", "single", "hawq"]), st.sampled_from([1, 5, 16, 1 << 15]),
       st.booleans(), st.integers(0, 10 ** 6))
def test_int64_requant_in_blocks_equals_the_definition(rounding, block, per_channel, seed):
    rng = np.random.default_rng(seed)
    # accumulators near int32's edge and multipliers near one: beyond the float64 paths'
    # 2^53 bound, so the int64 path runs
    x = rng.integers(-(2 ** 31) + 1, 2 ** 31 - 1, size=(3, 4, 5), endpoint=True)
    x[0, 0, :3] = 2 ** 31 - 1, -(2 ** 31) + 1, 0
    reals = rng.uniform(0.4, 0.999, size=4 if per_channel else 1)
    reals[0] = 0.25                             # an exact power of two: rounding ties
    if rounding != "gemmlowp":
        reals = reals / 2.0 ** rng.integers(0, 12, size=reals.size)
    x[2, 0, :] = 1, 3, -1, -3, 6                 # (channel 0: small odd values tie)
    axis = 1 if per_channel else None
    old = kern.BLOCK
    kern.BLOCK = block
    try:
        got = requant_ref(x, reals, rounding, 31, axis, 3, -200, 180)
    finally:
        kern.BLOCK = old
    want = np.empty(x.shape, dtype=np.int64)
    for i in np.ndindex(x.shape):
        r = float(reals[i[1]] if per_channel else reals[0])
        want[i] = min(max(_contract(int(x[i]), r, rounding, 31) + 3, -200), 180)
    assert got.dtype == np.int16
    assert np.array_equal(got.astype(np.int64), want)


def test_int64_requant_refuses_a_left_shift_past_int32_in_any_block():
    x = np.zeros((4, 8), dtype=np.int64)
    x[3, 7] = 2 ** 30 + 1                              # in the last block only
    old = kern.BLOCK
    kern.BLOCK = 8
    try:
        with pytest.raises(ValueError, match="left shift"):
            requant_ref(x, np.array([3.0]), "gemmlowp", 31, None, 0, -128, 127)
    finally:
        kern.BLOCK = old


@settings(deadline=None, max_examples=25, derandomize=True)
@given(st.integers(2, 40), st.integers(0, 12), st.booleans(), st.integers(0, 10 ** 6))
def test_layer_norm_shifts_equal_floor_division(n, k, center, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(-300, 300, size=(3, n))
    x[0] = x[0, :1]                                    # a constant row (T from eps alone)
    got = normalized_ref(x, n, k, 5, center=center)
    for row, g in zip(x, got):
        vals = [int(v) for v in row]
        mu = (sum(vals) * 2 ** (k + 1) + n) // (2 * n) if center else 0
        c = [v * 2 ** k - mu for v in vals]
        t = sum(v * v for v in c) + n * 5 if center else max(sum(v * v for v in c), 5)
        t = max(t, 1)
        u = (62 - t.bit_length()) // 2
        r = math.isqrt(t << (2 * u))
        inv = ((1 << 62) + r) // (2 * r)
        assert [int(v) for v in g] == [((ci << u) * inv + 2 ** 30) // 2 ** 31 for ci in c]


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.sampled_from(["gemmlowp", "single", "hawq"]), st.sampled_from([1, 2, 3, 30, 31]),
       st.integers(0, 10 ** 6))
def test_layer_norm_output_rounding_equals_floor_division(rounding, out_frac, seed):
    rng = np.random.default_rng(seed)
    n = 8
    if out_frac < 30:        # gain 0: the output is the bias rounded, ties (odd halves) included
        gain = np.zeros(n, dtype=np.int64)
        bias = rng.integers(-2 ** (out_frac + 7), 2 ** (out_frac + 7), size=n)
        bias[:4] = np.array([1, -1, 3, -3]) << (out_frac - 1)
    else:                    # normalized values at their real scale (2^30 = 1.0)
        gain = rng.integers(-2 ** 8, 2 ** 8, size=n)
        bias = rng.integers(-2 ** 36, 2 ** 36, size=n)
    mod = SimpleNamespace(n_dims=1, n=n, in_zero_point=-3, frac_bits=8, eps_codes=2,
                          gain=torch.from_numpy(gain), bias=torch.from_numpy(bias),
                          out_frac_bits=out_frac, rounding=rounding, out_zero_point=4,
                          qmin=-128, qmax=127)
    q = rng.integers(-128, 128, size=(5, n)).astype(np.int8)
    got = layer_norm_ref(q, mod)
    x = q.astype(np.int64) - mod.in_zero_point
    acc = normalized_ref(x, n, 8, 2) * gain + bias
    mode = {"gemmlowp": "rha", "single": "rhu", "hawq": "rne"}[rounding]
    want = np.empty(acc.shape, dtype=np.int64)
    p = 1 << out_frac
    for i in np.ndindex(acc.shape):
        v = int(acc[i])
        fl, rem = v // p, v % p                      # Python: floor division and its remainder
        half = p // 2
        up = rem > half or (rem == half and (mode == "rhu" or (mode == "rha" and v >= 0)
                                             or (mode == "rne" and fl % 2 == 1)))
        want[i] = min(max(fl + up + 4, -128), 127)
    assert np.array_equal(got.astype(np.int64), want)
    assert len(np.unique(want)) > 2                  # not all clamped
