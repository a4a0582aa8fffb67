"""Tests for qpasses.numerics.fixed_point.

The library works on int64 tensors; the references below are written independently with Python
ints and Fractions (exact), following the C formulations of gemmlowp where they differ from the
library's closed forms (nudge + truncating division for SRDHM, mask/threshold for RDBPOT).
"""
from __future__ import annotations

import math
import warnings
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qpasses.errors import NumericsError
from qpasses.numerics.fixed_point import (ROUNDING_CONTRACTS, dyadic_multiplier, fbgemm_scale,
                                          fixed_point_reciprocal, quantize_multiplier, requantize,
                                          requantize_float, requantize_from_scale, round_shift,
                                          rounding_divide_by_pot,
                                          saturating_rounding_doubling_high_mul)

I32_MIN, I32_MAX = -(2 ** 31), 2 ** 31 - 1
HALF = Fraction(1, 2)
FAST = settings(max_examples=150, deadline=None)


# ------------------------------------------------------------------------------------------
# independent Python-int references
# ------------------------------------------------------------------------------------------

def ref_multiplier(q: Fraction, bits: int = 31) -> tuple[int, int]:
    """QuantizeMultiplier of an exact positive rational (frexp by repeated halving/doubling)."""
    e = 0
    while q >= 1:
        q /= 2
        e += 1
    while q < HALF:
        q *= 2
        e -= 1
    m = math.floor(q * 2 ** bits + HALF)          # rha == rhu for positive values
    if m == 2 ** bits:
        m, e = m // 2, e + 1
    if e < -31:
        return 0, 0
    return m, e


def c_div(n: int, d: int) -> int:
    """C integer division (truncation toward zero)."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def ref_srdhm(a: int, b: int) -> int:
    if a == b == I32_MIN:
        return I32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    return c_div(ab + nudge, 1 << 31)


def ref_rdbpot(x: int, e: int) -> int:
    mask = (1 << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


def ref_gemmlowp(x: int, m: int, s: int, bits: int = 31) -> int:
    return ref_rdbpot(ref_srdhm(x * 2 ** max(s, 0), m * 2 ** (31 - bits)), max(-s, 0))


def exact(x: int, m: int, s: int, bits: int = 31) -> Fraction:
    return Fraction(x * m) * Fraction(2) ** (s - bits)


def ref_single(x: int, m: int, s: int, bits: int = 31) -> int:
    return math.floor(exact(x, m, s, bits) + HALF)


def ref_hawq(x: int, m: int, s: int, bits: int = 31) -> int:
    return round(exact(x, m, s, bits))             # Fraction.__round__ is half-to-even


def ref_float_rne(x: int, scale: float) -> int:
    return int(np.rint(np.float32(x) * np.float32(scale)))


REF = {"gemmlowp": ref_gemmlowp, "single": ref_single, "hawq": ref_hawq}


def ref_round(v: Fraction, mode: str) -> int:
    if mode == "rne":
        return round(v)
    if mode == "rhu":
        return math.floor(v + HALF)
    if mode == "rha":
        return int(math.copysign(math.floor(abs(v) + HALF), v))
    if mode == "floor":
        return math.floor(v)
    return math.trunc(v)


def ref_hawq_batch_frexp(scale: float, bits: int = 31) -> tuple[int, int]:
    """HAWQ-V3 quant_utils.batch_frexp, element by element."""
    m, e = np.frexp(np.float64(scale))
    b = int(Decimal(float(m) * 2 ** bits).quantize(Decimal("1"), rounding=ROUND_HALF_UP))
    return b, bits - int(e)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


# ------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------

int32s = st.one_of(st.integers(I32_MIN, I32_MAX), st.sampled_from([I32_MIN, I32_MAX, 0, -1, 1]),
                   st.integers(-5000, 5000))
# Random reals plus dyadic rationals k/2^j, which make exact ties frequent.
scales = st.one_of(
    st.floats(min_value=2.0 ** -36, max_value=2.0 ** 12, allow_nan=False, allow_infinity=False),
    st.builds(lambda k, j: k / 2 ** j, st.integers(1, 2 ** 12), st.integers(0, 40)),
)
bits_st = st.sampled_from([31, 15, 7, 2, 23])


# ------------------------------------------------------------------------------------------
# test vectors of docs/int-sim.md, "Integer arithmetic"
# ------------------------------------------------------------------------------------------

TABLE_5_5 = [
    # M, (M0, shift), x, gemmlowp, single_rhu, dyadic_rne, fbgemm f32 (None = not given), exact
    (0.0072474273, (1992157647, -7), 12345, 89, 89, 89, 89, 89.469),
    (0.5, (1073741824, 0), 5, 3, 3, 2, 2, 2.5),
    (0.5, (1073741824, 0), -3, -1, -1, -2, -2, -1.5),
    (0.5, (1073741824, 0), -5, -2, -2, -2, -2, -2.5),
    (0.3, (1288490189, -1), -19998, -6000, -5999, -5999, None, -5999.400),
    (0.1, (1717986918, -3), -19995, -2000, -1999, -1999, None, -1999.49999953),
]


@pytest.mark.parametrize("M,m_shift,x,gl,single,hawq,fb,ex", TABLE_5_5)
def test_table_5_5(M, m_shift, x, gl, single, hawq, fb, ex):
    m, s = quantize_multiplier(M)
    assert (int(m), int(s)) == m_shift
    wide = (I32_MIN, I32_MAX)
    assert int(requantize(x, m, s, 0, *wide, "gemmlowp")) == gl
    assert int(requantize(x, m, s, 0, *wide, "single")) == single
    assert int(requantize(x, m, s, 0, *wide, "hawq")) == hawq
    b, c = dyadic_multiplier(M)
    assert int(requantize(x, b, 31 - c, 0, *wide, "hawq")) == hawq
    if fb is not None:
        assert int(requantize_float(x, M, 0, *wide)) == fb
    assert float(exact(x, *m_shift)) == pytest.approx(ex, abs=1e-3)


def test_quantize_multiplier_other_values():
    assert tuple(int(v) for v in quantize_multiplier(1.0)) == (2 ** 30, 1)
    assert tuple(int(v) for v in quantize_multiplier(2.5)) == (1342177280, 2)


@pytest.mark.parametrize("scale,bits,expected", [
    (1 - 2.0 ** -33, 31, (2 ** 30, 1)),           # mantissa rounds up to 2^31: renormalized
    (1 - 2.0 ** -9, 7, (2 ** 6, 1)),
    (0.75, 2, (3, 0)),                            # 0.75*4 = 3 is exact: no carry
    (0.875, 2, (2, 1)),                           # 3.5 rounds half up to 4 = 2^2: carry
    (2.0 ** -32, 31, (2 ** 30, -31)),             # smallest shift kept
    (2.0 ** -33, 31, (0, 0)),                     # flushed (TFLite: shift < -31)
    (2.0 ** -32 * (1 - 2.0 ** -40), 31, (2 ** 30, -31)),  # flush is decided after the carry
    (5e-324, 31, (0, 0)),                         # subnormal
    (1.5, 15, (3 * 2 ** 13, 1)),
])
def test_quantize_multiplier_edges(scale, bits, expected):
    m, s = quantize_multiplier(scale, bits)
    assert (int(m), int(s)) == expected
    assert m.dtype == s.dtype == torch.int64


@FAST
@given(st.lists(st.one_of(scales, st.floats(min_value=5e-324, max_value=1e30)), min_size=1,
                max_size=16), bits_st)
def test_quantize_multiplier_matches_reference(values, bits):
    m, s = quantize_multiplier(torch.tensor(values, dtype=torch.float64), bits)
    expected = [ref_multiplier(Fraction(v), bits) for v in values]
    assert list(zip(m.tolist(), s.tolist())) == expected


@FAST
@given(st.lists(scales, min_size=1, max_size=16), bits_st)
def test_quantize_multiplier_reconstruction_bound(values, bits):
    m, s = quantize_multiplier(values, bits)
    for v, mi, si in zip(values, m.tolist(), s.tolist()):
        if mi == 0:                                # flushed: only tiny scales
            assert v < 2.0 ** -32
            continue
        assert 2 ** (bits - 1) <= mi < 2 ** bits
        approx = Fraction(mi) * Fraction(2) ** (si - bits)
        assert abs(approx - Fraction(v)) <= Fraction(v) * Fraction(1, 2 ** bits)


def test_quantize_multiplier_per_channel_shape():
    scales_2d = torch.tensor([[0.1, 0.2], [3.0, 1e-3]], dtype=torch.float64)
    m, s = quantize_multiplier(scales_2d)
    assert m.shape == s.shape == (2, 2)
    assert [int(v) for v in quantize_multiplier(0.1)] == [int(m[0, 0]), int(s[0, 0])]
    m32, _ = quantize_multiplier(torch.tensor([0.1], dtype=torch.float32))   # float32 input widened
    assert int(m32[0]) == ref_multiplier(Fraction(float(np.float32(0.1))))[0]


@FAST
@given(st.lists(st.one_of(scales, st.floats(min_value=1e-30, max_value=1e6)), min_size=1,
                max_size=16), bits_st)
def test_dyadic_multiplier_matches_hawq(values, bits):
    b, c = dyadic_multiplier(values, bits)
    assert list(zip(b.tolist(), c.tolist())) == [ref_hawq_batch_frexp(v, bits) for v in values]
    m, s = quantize_multiplier(values, bits)
    for bi, ci, mi, si in zip(b.tolist(), c.tolist(), m.tolist(), s.tolist()):
        if mi:   # same real value as TFLite's form (which renormalizes and flushes)
            assert Fraction(bi, 1) / Fraction(2) ** ci == Fraction(mi) * Fraction(2) ** (si - bits)


# ------------------------------------------------------------------------------------------
# primitives
# ------------------------------------------------------------------------------------------

@FAST
@given(st.lists(st.tuples(int32s, int32s), min_size=1, max_size=32))
@example([(I32_MIN, I32_MIN), (I32_MIN, I32_MAX), (I32_MAX, I32_MAX), (-1, 1 << 30), (1, 1 << 30)])
def test_srdhm_matches_c_form(pairs):
    a, b = zip(*pairs)
    got = saturating_rounding_doubling_high_mul(t64(a), t64(b))
    assert got.tolist() == [ref_srdhm(x, y) for x, y in pairs]


def test_srdhm_saturates_and_rounds_half_up():
    assert int(saturating_rounding_doubling_high_mul(I32_MIN, I32_MIN)) == I32_MAX
    # a*b/2^31 = +-0.5 exactly: half up, so +0.5 -> 1 and -0.5 -> 0
    assert int(saturating_rounding_doubling_high_mul(1, 1 << 30)) == 1
    assert int(saturating_rounding_doubling_high_mul(-1, 1 << 30)) == 0
    assert int(saturating_rounding_doubling_high_mul(-3, 1 << 30)) == -1


@FAST
@given(st.lists(st.tuples(int32s, st.integers(0, 31)), min_size=1, max_size=32))
@example([(5, 1), (-5, 1), (-3, 1), (3, 1), (I32_MIN, 31), (I32_MAX, 31), (-(2 ** 30), 31)])
def test_rdbpot_matches_mask_form(pairs):
    x, e = zip(*pairs)
    got = rounding_divide_by_pot(t64(x), t64(e))
    assert got.tolist() == [ref_rdbpot(xi, ei) for xi, ei in pairs]


@FAST
@given(st.lists(st.tuples(st.integers(-(2 ** 40), 2 ** 40), st.integers(-20, 62)), min_size=1,
                max_size=32), st.sampled_from(["rne", "rha", "rhu", "floor", "trunc"]))
@example([(5, 1), (-5, 1), (7, 1), (-7, 1), (6, 2), (-6, 2), (1, 0), (-3, -3)], "rne")
@example([(5, 1), (-5, 1), (-6, 2), (6, 2), (2 ** 40, 62)], "rha")
def test_round_shift_modes(pairs, mode):
    x, s = zip(*pairs)
    got = round_shift(t64(x), t64(s), mode)
    assert got.tolist() == [ref_round(Fraction(xi) / Fraction(2) ** si, mode) for xi, si in pairs]


# ------------------------------------------------------------------------------------------
# requantization against the references
# ------------------------------------------------------------------------------------------

def fit_left_shift(x: int, s: int) -> int:
    """Shrink x so that x * 2**s fits int32 (a precondition of the gemmlowp contract)."""
    return x >> s if s > 0 else x


@FAST
@given(st.lists(int32s, min_size=1, max_size=32), scales, bits_st,
       st.sampled_from(["gemmlowp", "single", "hawq"]), st.integers(-128, 127),
       st.sampled_from([(-128, 127), (0, 255), (I32_MIN, I32_MAX), (-8, 7)]))
def test_requantize_per_tensor(accs, scale, bits, rounding, zp, qrange):
    m, s = (int(v) for v in quantize_multiplier(scale, bits))
    accs = [fit_left_shift(x, s) for x in accs]
    got = requantize(t64(accs), m, s, zp, *qrange, rounding, multiplier_bits=bits)
    lo, hi = qrange
    expected = [min(max(REF[rounding](x, m, s, bits) + zp, lo), hi) for x in accs]
    assert got.tolist() == expected
    assert got.dtype == torch.int64


@st.composite
def per_channel_cases(draw):
    c = draw(st.integers(1, 5))
    n = draw(st.integers(1, 3))
    chan_scales = draw(st.lists(scales, min_size=c, max_size=c))
    accs = draw(st.lists(int32s, min_size=n * c * 2, max_size=n * c * 2))
    zps = draw(st.lists(st.integers(-20, 20), min_size=c, max_size=c))
    return n, c, chan_scales, accs, zps


@FAST
@given(per_channel_cases(), st.sampled_from(ROUNDING_CONTRACTS), bits_st)
def test_requantize_per_channel(case, rounding, bits):
    n, c, chan_scales, accs, zps = case
    chan = [(i // 2) % c for i in range(len(accs))]          # layout (n, c, 2), channel axis 1
    if rounding == "float-rne":
        sc = [float(np.float32(v)) for v in chan_scales]
        expected = [ref_float_rne(x, sc[k]) + zps[k] for x, k in zip(accs, chan)]
        got = requantize_float(t64(accs).reshape(n, c, 2), torch.tensor(chan_scales), t64(zps),
                               I32_MIN, I32_MAX, axis=1)
    else:
        m, s = quantize_multiplier(chan_scales, bits)
        ml, sl = m.tolist(), s.tolist()
        accs = [fit_left_shift(x, sl[k]) for x, k in zip(accs, chan)]
        expected = [REF[rounding](x, ml[k], sl[k], bits) + zps[k] for x, k in zip(accs, chan)]
        got = requantize(t64(accs).reshape(n, c, 2), m, s, t64(zps), I32_MIN, I32_MAX, rounding,
                         axis=1, multiplier_bits=bits)
    assert got.shape == (n, c, 2)
    assert got.flatten().tolist() == [min(max(v, I32_MIN), I32_MAX) for v in expected]


def test_requantize_negative_axis_and_int32_input():
    acc = torch.tensor([[100, -100, 7], [-7, 2 ** 20, -(2 ** 20)]], dtype=torch.int32)
    m, s = quantize_multiplier([0.5, 0.25, 0.3])
    got = requantize(acc, m, s, 0, I32_MIN, I32_MAX, "hawq", axis=-1)
    assert got.dtype == torch.int64
    ml, sl = m.tolist(), s.tolist()
    expected = [[ref_hawq(x, ml[j], sl[j]) for j, x in enumerate(row)] for row in acc.tolist()]
    assert got.tolist() == expected


def test_relu_fusion_is_a_tighter_clamp():
    acc = t64([-1000, -10, 0, 10, 1000])
    m, s = quantize_multiplier(0.05)
    zp = 3
    plain = requantize(acc, m, s, zp, -128, 127)
    relu = requantize(acc, m, s, zp, zp, 127)
    relu6 = requantize(acc, m, s, zp, zp, zp + 6)     # ReLU6 with output scale 1 (illustrative)
    assert plain.tolist() == [-47, 2, 3, 4, 53]
    assert relu.tolist() == [3, 3, 3, 4, 53]
    assert relu6.tolist() == [3, 3, 3, 4, 9]


# ------------------------------------------------------------------------------------------
# relations between contracts
# ------------------------------------------------------------------------------------------

@FAST
@given(st.lists(int32s, min_size=1, max_size=32), scales)
def test_contract_relations(accs, scale):
    m, s = quantize_multiplier(scale)
    accs = [fit_left_shift(x, int(s)) for x in accs]
    acc = t64(accs)
    wide = (I32_MIN, I32_MAX)
    gl = requantize(acc, m, s, 0, *wide, "gemmlowp")
    single = requantize(acc, m, s, 0, *wide, "single")
    hawq = requantize(acc, m, s, 0, *wide, "hawq")
    # Double rounding is off by at most one LSB from single rounding.
    assert bool(((gl - single).abs() <= 1).all())
    if int(s) >= 0:   # no RoundingDivideByPOT: gemmlowp rounds once, half up
        assert torch.equal(gl, single)
    # single (rhu) and hawq (rne) differ only on exact ties, where rhu is one above an even rne.
    for x, a, b in zip(accs, single.tolist(), hawq.tolist()):
        v = exact(x, int(m), int(s))
        if a != b:
            assert v - math.floor(v) == HALF and a == b + 1 and b % 2 == 0
        else:
            assert abs(a - v) <= HALF


@FAST
@given(st.lists(int32s, min_size=1, max_size=32), scales)
def test_float_rne_agrees_with_exact_rounding_away_from_ties(accs, scale):
    got = requantize_float(t64(accs), scale, 0, I32_MIN, I32_MAX)
    s32 = Fraction(float(np.float32(scale)))
    for x, y in zip(accs, got.tolist()):
        v = Fraction(x) * s32
        if abs(v) >= 2 ** 31 - 1:                  # clamped to the int32 output range
            continue
        # float32(acc) and the float32 product each cost at most 2^-24 relative, so the float
        # product is within |v| * 2^-22 of v and rne adds at most 1/2.
        float_err = abs(v) * Fraction(1, 2 ** 22)
        assert abs(y - v) <= HALF + float_err
        dist_to_tie = abs(v - math.floor(v) - HALF)
        if dist_to_tie > float_err:                # not near a tie: same as exact rne
            assert y == round(v)


def test_fbgemm_scale_uses_float32_order():
    sx, sw, sy = 0.0123, torch.tensor([0.0031, 0.017], dtype=torch.float64), 0.071
    got = fbgemm_scale(sx, sw, sy)
    assert got.dtype == torch.float32
    for g, w in zip(got.tolist(), sw.tolist()):
        expected = (np.float32(sx) * np.float32(w)) / np.float32(sy)
        assert np.float32(g) == expected


@pytest.fixture
def fbgemm_engine():
    engines = torch.backends.quantized.supported_engines
    engine = next((e for e in ("x86", "fbgemm") if e in engines), None)
    if engine is None:
        pytest.skip("no fbgemm quantized engine in this torch build")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    yield
    torch.backends.quantized.engine = previous


def test_float_rne_matches_torch_fbgemm_linear(fbgemm_engine):
    gen = torch.Generator().manual_seed(0)
    n, k, c = 64, 96, 16
    sx, zx, sy, zy = 0.02, 5, 0.37, 60
    sw = torch.rand(c, generator=gen, dtype=torch.float64) * 0.02 + 0.002
    # Activations <= 127 avoid the int16 saturation of vpmaddubsw (x86 reduce_range setting).
    xq_int = torch.randint(0, 128, (n, k), generator=gen)
    wq_int = torch.randint(-127, 128, (c, k), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xq = torch._make_per_tensor_quantized_tensor(xq_int.to(torch.uint8), sx, zx)
        wq = torch._make_per_channel_quantized_tensor(wq_int.to(torch.int8), sw,
                                                      torch.zeros(c, dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(wq, None)
        y = torch.ops.quantized.linear(xq, packed, sy, zy).int_repr().to(torch.int64)
    acc = (xq_int - zx) @ wq_int.T
    ours = requantize_float(acc, fbgemm_scale(sx, sw, sy), zy, 0, 255, axis=1)
    assert torch.equal(ours, y)
    # The integer contracts are close to but not the same as fbgemm: at most 1 LSB apart.
    gl = requantize_from_scale(acc, sx * sw / sy, zy, 0, 255, "gemmlowp", axis=1)
    assert int((gl - y).abs().max()) <= 1


# ------------------------------------------------------------------------------------------
# reciprocal for average pooling, the real-scale entry point
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [31, 15, 7])
def test_fixed_point_reciprocal_exact(bits):
    ns = list(range(1, 1200)) + [2 ** 20 + 1, 2 ** 30, 2 ** 31 - 1, 257, 513]
    m, s = fixed_point_reciprocal(t64(ns), bits)
    assert list(zip(m.tolist(), s.tolist())) == [ref_multiplier(Fraction(1, n), bits) for n in ns]
    # Through float64 1/n the same pairs come out for these n (no double-rounding case here).
    mf, sf = quantize_multiplier(torch.tensor([1.0 / n for n in ns], dtype=torch.float64), bits)
    assert torch.equal(mf, m) and torch.equal(sf, s)


def test_average_pool_division_by_reciprocal():
    sums = t64([0, 48, 49, -49, 24, 25, 1000, -1000, 2 ** 20])
    m, s = fixed_point_reciprocal(49)
    got = requantize(sums, m, s, 0, I32_MIN, I32_MAX, "single")
    assert got.tolist() == [math.floor(Fraction(v, 49) + HALF) for v in sums.tolist()]


@FAST
@given(st.lists(int32s, min_size=1, max_size=16), scales, st.sampled_from(ROUNDING_CONTRACTS))
def test_requantize_from_scale_dispatch(accs, scale, rounding):
    m, s = quantize_multiplier(scale)
    accs = [fit_left_shift(x, int(s)) for x in accs]
    got = requantize_from_scale(t64(accs), scale, 1, -128, 127, rounding)
    if rounding == "float-rne":
        expected = requantize_float(t64(accs), scale, 1, -128, 127)
    else:
        expected = requantize(t64(accs), m, s, 1, -128, 127, rounding)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_unknown_contract_lists_valid_names():
    with pytest.raises(NumericsError) as err:
        requantize(t64([1]), 2 ** 30, 0, rounding="gemlowp")
    msg = str(err.value)
    assert all(name in msg for name in ROUNDING_CONTRACTS) and "did you mean 'gemmlowp'" in msg
    with pytest.raises(NumericsError, match="valid names"):
        requantize_from_scale(t64([1]), 0.5, rounding="fbgemm")
    assert issubclass(NumericsError, ValueError)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), [0.5, 0.0]])
def test_bad_scale(bad):
    for fn in (quantize_multiplier, dyadic_multiplier):
        with pytest.raises(NumericsError, match="scale"):
            fn(bad)
    with pytest.raises(NumericsError, match="scale"):
        requantize_float(t64([1]), bad)


@pytest.mark.parametrize("bits", [1, 32, 0, True, 31.0, np.int64(40)])
def test_bad_multiplier_bits(bits):
    with pytest.raises(NumericsError, match="multiplier_bits"):
        quantize_multiplier(0.5, bits)
    with pytest.raises(NumericsError, match="multiplier_bits"):
        requantize(t64([1]), 1, 0, multiplier_bits=bits)


@pytest.mark.parametrize("call,match", [
    (lambda: requantize(torch.tensor([1.0]), 2 ** 30, 0), "acc must be an integer"),
    (lambda: requantize(t64([2 ** 31]), 2 ** 30, 0), "acc"),
    (lambda: requantize(t64([1]), 2 ** 31, 0), "multiplier"),
    (lambda: requantize(t64([1]), -1, 0), "multiplier"),
    (lambda: requantize(t64([1]), 2 ** 30, 32), "shift"),
    (lambda: requantize(t64([1]), 2 ** 30, -32), "shift"),
    (lambda: requantize(t64([2 ** 20]), 2 ** 30, 12, rounding="gemmlowp"), "overflows int32"),
    (lambda: requantize(t64([[1, 2]]), t64([2 ** 30, 2 ** 30]), t64([0, 0])), "axis"),
    (lambda: requantize(t64([[1, 2]]), t64([2 ** 30] * 3), t64([0] * 3), axis=1), "acc.shape"),
    (lambda: requantize(t64([1]), 2 ** 30, 0, 0, 5, 4), "qmin"),
    (lambda: requantize(t64([1]), 2 ** 30, 0, rounding="float-rne"), "requantize_float"),
    (lambda: rounding_divide_by_pot(t64([1]), 32), "exponent"),
    (lambda: saturating_rounding_doubling_high_mul(t64([2 ** 31]), 1), "a"),
    (lambda: round_shift(t64([1]), 1, "nearest"), "rounding mode"),
    (lambda: round_shift(t64([2 ** 40]), -30), "overflows"),
    (lambda: fixed_point_reciprocal(0), "n"),
])
def test_argument_errors(call, match):
    with pytest.raises(NumericsError, match=match):
        call()


def test_large_left_shift_is_exact_for_single_and_hawq():
    # gemmlowp refuses acc * 2^shift outside int32, single/hawq compute it exactly in int64.
    m, s = quantize_multiplier(3000.0)
    got = requantize(t64([2 ** 20, -(2 ** 20)]), m, s, 0, I32_MIN, I32_MAX, "single")
    assert got.tolist() == [I32_MAX, I32_MIN]           # clamped, not wrapped
    got = requantize(t64([1000, -999]), m, s, 0, I32_MIN, I32_MAX, "hawq")
    assert got.tolist() == [3_000_000, -2_997_000]
