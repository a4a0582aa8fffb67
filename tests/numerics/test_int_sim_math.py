"""Integer-simulation numerics: the fast requantization equals fixed_point.requantize bit for bit
(ties included), the fast conv/linear kernels equal the int64 reference wherever their bound
allows them, adaptive pooling sums equal brute force, lookup tables equal the fake-quant float32
computation, and the independent reference arithmetic agrees with the test vectors of docs/int-sim.md."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.errors import NumericsError
from qpasses.algorithms.int_sim_reference import conv_ref, quantize_multiplier_exact, requant_ref
from qpasses.numerics.fixed_point import (quantize_multiplier, requantize, requantize_float)
from qpasses.numerics.int_conv_fast import (fast_conv, fast_linear, input_offset, prepare_conv,
                                            prepare_linear)
from qpasses.numerics.int_ops import choose_kernel, exactness_bound, int_conv, int_linear
from qpasses.numerics.int_sim_math import (adaptive_avg_pool_sum, build_lut_f32, quantize_codes,
                                           uniform_count_factor)
from qpasses.numerics.fast_requant import requantize_fast, requantize_float_fast

CONTRACTS = ["gemmlowp", "single", "hawq"]


@st.composite
def requant_cases(draw):
    bits = draw(st.integers(2, 31))
    c = draw(st.integers(1, 4))
    tie_friendly = draw(st.booleans())
    if tie_friendly:   # powers of two (times 1, 1.5, 0.75): many exact ties
        scale = [2.0 ** draw(st.integers(-20, 2)) * draw(st.sampled_from([1.0, 1.5, 0.75]))
                 for _ in range(c)]
    else:
        scale = [float(np.exp(draw(st.floats(-25, 3)))) for _ in range(c)]
    mag = draw(st.integers(1, 31))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-(2 ** mag), 2 ** mag, (2, c, 3), generator=g)
    if draw(st.booleans()):     # the smallest multipliers: right shifts of 31 (t = bits + 31)
        scale[0] = float(2.0 ** draw(st.integers(-33, -30)))
    zp = draw(st.integers(-128, 127))
    return bits, torch.tensor(scale, dtype=torch.float64), acc, zp


@settings(max_examples=300, deadline=None)
@given(requant_cases(), st.sampled_from(CONTRACTS))
def test_fast_requantize_equals_fixed_point(case, rounding):
    bits, scale, acc, zp = case
    m, s = quantize_multiplier(scale, bits)
    if rounding == "gemmlowp":     # the lowering proves acc·2^left within int32
        lim = (2 ** 31 - 1) >> int(s.clamp(min=0).max())
        acc = acc.clamp(-lim, lim)
    ref = requantize(acc, m, s, zp, -3000, 3000, rounding, axis=1, multiplier_bits=bits)
    c = scale.numel()
    fast = requantize_fast(acc.clone(), m.reshape(1, c, 1), s.reshape(1, c, 1), zp, -3000, 3000,
                           rounding, bits)
    assert torch.equal(ref, fast)
    # the independent (numpy, exact rational) implementation agrees too
    indep = requant_ref(acc.numpy(), scale.numpy(), rounding, bits, 1, zp, -3000, 3000)
    assert np.array_equal(indep, ref.numpy())


@settings(max_examples=60, deadline=None)
@given(requant_cases())
def test_fast_float_requantize_equals_fixed_point(case):
    _, scale, acc, zp = case
    acc = acc.clamp(-(2 ** 31 - 1), 2 ** 31 - 1)
    s32 = scale.to(torch.float32)
    bias = torch.randn(scale.numel()) * 100
    ref = requantize_float(acc, s32, zp, -3000, 3000, axis=1, bias=bias)
    fast = requantize_float_fast(acc, s32.reshape(1, -1, 1), zp, -3000, 3000,
                                 bias.reshape(1, -1, 1))
    assert torch.equal(ref, fast)


def test_reference_arithmetic_matches_the_test_vectors():
    # docs/int-sim.md, "Integer arithmetic"
    vectors = [(0.0072474273, 12345, 89, 89, 89), (0.5, 5, 3, 3, 2), (0.5, -3, -1, -1, -2),
               (0.5, -5, -2, -2, -2), (0.3, -19998, -6000, -5999, -5999),
               (0.1, -19995, -2000, -1999, -1999)]
    for m, x, gl, single, hawq in vectors:
        for rounding, want in (("gemmlowp", gl), ("single", single), ("hawq", hawq)):
            got = requant_ref(np.array([x]), np.array([m]), rounding, 31, None, 0, -10 ** 6,
                              10 ** 6)
            assert int(got[0]) == want, (m, x, rounding)
    assert quantize_multiplier_exact(0.0072474273) == (1992157647, -7)
    assert quantize_multiplier_exact(1.0) == (2 ** 30, 1)
    assert quantize_multiplier_exact(2.5) == (1342177280, 2)


@st.composite
def conv_cases(draw):
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    groups = 1 if kind == "dense" else draw(st.integers(2, 3))
    cin = groups * draw(st.integers(1, 3))
    if kind == "depthwise":
        groups, cout = cin, cin
    else:
        cout = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    size = tuple(max(dil[i] * (k[i] - 1) + 1 - 2 * pad[i], 1) + draw(st.integers(0, 3))
                 for i in range(nd))
    x_bits = draw(st.integers(2, 8))
    w_bits = draw(st.integers(2, 8))
    unsigned = draw(st.booleans())
    lo, hi = (0, 2 ** x_bits - 1) if unsigned else (-(2 ** (x_bits - 1)), 2 ** (x_bits - 1) - 1)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = torch.randint(lo, hi + 1, (draw(st.integers(1, 3)), cin, *size), generator=g)
    w = torch.randint(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), (cout, cin // groups, *k),
                      generator=g)
    zx = draw(st.integers(lo, hi))
    wzp = torch.zeros((), dtype=torch.int64) if draw(st.booleans()) else \
        torch.randint(-3, 4, (cout,), generator=g)
    return dict(x=x, w=w, stride=stride, padding=pad, dilation=dil, groups=groups, zx=zx,
                wzp=wzp, lo=lo, hi=hi)


@settings(max_examples=80, deadline=None)
@given(conv_cases(), st.sampled_from(["int8-mm", "float32", "float64"]))
def test_fast_conv_equals_reference_where_the_bound_allows(case, kernel):
    c = case
    wc = c["w"] - (c["wzp"].reshape(-1, *([1] * (c["w"].dim() - 1))) if c["wzp"].dim() else 0)
    if kernel == "int8-mm" and (int(wc.min()) < -128 or int(wc.max()) > 127):
        return
    bound = exactness_bound(c["w"], max(c["hi"] - c["zx"], c["zx"] - c["lo"]), 0, c["wzp"])
    if kernel == "float32" and bound >= 2 ** 24:
        return
    ref = int_conv(c["x"], c["w"], stride=c["stride"], padding=c["padding"],
                   dilation=c["dilation"], groups=c["groups"], x_zero_point=c["zx"],
                   w_zero_point=c["wzp"], kernel="reference")
    prep = prepare_conv(c["w"], c["wzp"], kernel=kernel, stride=c["stride"],
                        padding=c["padding"], dilation=c["dilation"], groups=c["groups"],
                        x_qmin=c["lo"], x_qmax=c["hi"])
    assert torch.equal(fast_conv(c["x"], prep, c["zx"]), ref)
    # and the independent numpy convolution
    indep = conv_ref(c["x"].numpy(), c["w"].numpy(), c["stride"], c["padding"], c["dilation"],
                     c["groups"], c["zx"], c["wzp"].numpy().reshape(-1))
    assert np.array_equal(indep, ref.numpy())


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 20), st.integers(2, 8), st.booleans(),
       st.sampled_from(["int8-mm", "float32", "float64"]), st.integers(0, 2 ** 16))
def test_fast_linear_equals_reference(k, o, bits, unsigned, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 2 ** bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    x = torch.randint(lo, hi + 1, (3, 2, k), generator=g)
    w = torch.randint(-128, 128, (o, k), generator=g)
    zx = int(torch.randint(lo, hi + 1, (1,), generator=g))
    ref = int_linear(x, w, x_zero_point=zx, kernel="reference")
    prep = prepare_linear(w, 0, kernel=kernel, x_qmin=lo, x_qmax=hi)
    assert torch.equal(fast_linear(x, prep, zx), ref)


def test_choose_kernel_and_int8_offsets():
    assert choose_kernel(2 ** 31 - 1, 8, 8) == "int8-mm"
    assert choose_kernel(2 ** 31, 8, 8) == "float64"
    assert choose_kernel(2 ** 24 - 1, 9, 8) == "float32"
    assert choose_kernel(2 ** 24, 16, 8) == "float64"
    assert choose_kernel(2 ** 53, 16, 16) == "reference"
    for lo, hi in [(0, 255), (-128, 127), (0, 15), (-8, 7), (3, 200)]:
        c = input_offset(lo, hi)
        assert -128 <= lo - c and hi - c <= 127
    with pytest.raises(NumericsError):
        input_offset(0, 256)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9), st.integers(1, 9),
       st.integers(0, 2 ** 16))
def test_adaptive_pool_sums_equal_brute_force(h, w, oh, ow, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-100, 100, (2, 3, h, w), generator=g)
    sums, counts = adaptive_avg_pool_sum(x, (oh, ow))
    mean = F.adaptive_avg_pool2d(x.double(), (oh, ow))
    assert torch.allclose(sums.double() / counts.double(), mean, atol=1e-9)
    uf = uniform_count_factor(counts)
    assert uf is not None
    lcm, factor = uf
    assert bool((factor * counts == lcm).all())


def test_lut_equals_fake_quant_float32_arithmetic():
    s_in, z_in, s_out, z_out = 0.0371, 3, 0.0213, -7
    table = build_lut_f32(F.hardswish, s_in, z_in, -128, 127, s_out, z_out, -128, 127)
    codes = torch.arange(-128, 128)
    xhat = (codes - z_in).to(torch.float32) * torch.tensor(s_in, dtype=torch.float32)
    v = F.hardswish(xhat)
    want = torch.fake_quantize_per_tensor_affine(v, s_out, z_out, -128, 127)
    got = (table - z_out).to(torch.float32) * torch.tensor(s_out, dtype=torch.float32)
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantize_codes_matches_torch_and_rejects_nan():
    x = torch.randn(1000) * 3
    q = quantize_codes(x, 0.0234, 5, -128, 127)
    want = torch.quantize_per_tensor(x, 0.0234, 5, torch.qint8).int_repr().to(torch.int64)
    assert torch.equal(q, want)
    with pytest.raises(NumericsError, match="NaN"):
        quantize_codes(torch.tensor([1.0, float("nan")]), 0.1, 0, -128, 127, where="x")
    with pytest.raises(NumericsError, match="inf"):
        quantize_codes(torch.tensor([float("inf")]), 0.1, 0, -128, 127, where="x")
