"""Integer kernels: reference equals float64 convolution on small integers; every fast kernel
equals the reference bit for bit wherever choose_kernel allows it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.errors import NumericsError
from qpasses.numerics.int_ops import (apply_lut, build_lut, choose_kernel, exactness_bound,
                                      int_avg_pool_sum, int_conv, int_linear, int_max_pool)


@st.composite
def conv_cases(draw):
    nd = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    depthwise = draw(st.booleans())
    cin = groups * draw(st.integers(1, 3))
    cout = cin if depthwise else groups * draw(st.integers(1, 3))
    groups = cin if depthwise else groups
    k = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(nd))
    size = tuple(max(dil[i] * (k[i] - 1) + 1 - 2 * pad[i], 1) + draw(st.integers(0, 3))
                 for i in range(nd))
    unsigned = draw(st.booleans())
    x_bits = draw(st.integers(2, 8))
    w_bits = draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2 ** 16))
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 2 ** x_bits - 1) if unsigned else (-(2 ** (x_bits - 1)), 2 ** (x_bits - 1) - 1)
    x = torch.randint(lo, hi + 1, (2, cin, *size), generator=g)
    w = torch.randint(-(2 ** (w_bits - 1)), 2 ** (w_bits - 1), (cout, cin // groups, *k), generator=g)
    zx = draw(st.integers(lo, hi)) if draw(st.booleans()) else 0
    bias = torch.randint(-1000, 1000, (cout,), generator=g) if draw(st.booleans()) else None
    return dict(x=x, w=w, bias=bias, stride=stride, padding=pad, dilation=dil, groups=groups,
                x_zero_point=zx), (lo, hi)


def _float_reference(x, w, bias, stride, padding, dilation, groups, x_zero_point):
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    out = conv((x - x_zero_point).double(), w.double(), None if bias is None else bias.double(),
               stride=stride, padding=padding, dilation=dilation, groups=groups)
    return out.round().long()


@settings(max_examples=60, deadline=None)
@given(conv_cases())
def test_reference_conv_matches_float64_conv(case):
    kw, _ = case
    assert torch.equal(int_conv(**kw), _float_reference(**kw))


@settings(max_examples=60, deadline=None)
@given(conv_cases(), st.sampled_from(["int8-mm", "float32", "float64"]))
def test_fast_kernels_bit_exact_where_allowed(case, kernel):
    kw, (lo, hi) = case
    ref = int_conv(**kw)
    zx = kw["x_zero_point"]
    x_absmax = max(abs(lo - zx), abs(hi - zx))
    bias_max = int(kw["bias"].abs().max()) if kw["bias"] is not None else 0
    bound = exactness_bound(kw["w"], x_absmax, bias_max)
    span = hi - lo
    allowed = {"int8-mm": span <= 255 and bound <= 2 ** 31 - 1, "float32": bound < 2 ** 24,
               "float64": True}[kernel]
    if not allowed:
        return
    assert torch.equal(int_conv(**kw, kernel=kernel), ref)


def test_int8_path_handles_unsigned_codes_by_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 16, 40), generator=g)
    w = torch.randint(-128, 128, (24, 40), generator=g)
    assert torch.equal(int_linear(x, w, kernel="int8-mm"), int_linear(x, w))
    assert torch.equal(int_linear(x, w, x_zero_point=7, kernel="float64"),
                       ((x - 7) @ w.t()))


def test_per_channel_weight_zero_points():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 16, (1, 4, 5, 5), generator=g)
    w = torch.randint(0, 16, (3, 4, 3, 3), generator=g)
    zw = torch.tensor([1, 8, 15])
    got = int_conv(x, w, w_zero_point=zw, padding=1)
    want = _float_reference(x, w - zw.reshape(-1, 1, 1, 1), None, 1, 1, 1, 1, 0)
    assert torch.equal(got, want)


def test_choose_kernel_thresholds():
    assert choose_kernel(2 ** 31 - 1, 8, 8) == "int8-mm"
    assert choose_kernel(2 ** 31, 8, 8) == "float64"
    assert choose_kernel(2 ** 24 - 1, 9, 8) == "float32"
    assert choose_kernel(2 ** 24, 9, 8) == "float64"
    assert choose_kernel(2 ** 53, 16, 16) == "reference"


def test_float32_is_not_exact_beyond_its_bound():
    # Guard against trusting float32 blindly: 2^24 + 1 is not representable.
    x = torch.tensor([[2 ** 12 + 1, 2 ** 12 + 1]])
    w = torch.tensor([[2 ** 12, 1]])
    assert exactness_bound(w, 2 ** 12 + 1) >= 2 ** 24
    ref = int_linear(x, w)
    assert int(ref) == (2 ** 12 + 1) * 2 ** 12 + 2 ** 12 + 1


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans(), st.integers(0, 999))
def test_max_pool_matches_torch(k, s, p, ceil, seed):
    p = min(p, k // 2)
    x = torch.randint(-50, 50, (2, 3, 7, 6), generator=torch.Generator().manual_seed(seed))
    want = F.max_pool2d(x.double(), k, s, p, ceil_mode=ceil).long()
    assert torch.equal(int_max_pool(x, k, s, p, ceil_mode=ceil), want)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.integers(0, 999))
def test_avg_pool_sums_and_counts(k, s, p, seed):
    p = min(p, k // 2)
    x = torch.randint(0, 255, (2, 3, 7, 6), generator=torch.Generator().manual_seed(seed))
    sums, counts = int_avg_pool_sum(x, k, s, p)
    avg = F.avg_pool2d(x.double(), k, s, p, count_include_pad=False)
    assert torch.allclose(sums.double() / counts.double(), avg, rtol=0, atol=1e-9)


def test_lut_is_exact_and_range_checked():
    table = build_lut(torch.sigmoid, 0.05, 3, -128, 127, 1 / 256, 0, 0, 255)
    q = torch.arange(-128, 128)
    want = (torch.sigmoid((q.double() - 3) * 0.05) * 256).round().clamp(0, 255).long()
    assert torch.equal(apply_lut(q, table, -128), want)
    with pytest.raises(NumericsError, match="outside the table"):
        apply_lut(torch.tensor([200]), table, -128)
    with pytest.raises(NumericsError, match="at most 16-bit"):
        build_lut(torch.sigmoid, 1.0, 0, 0, 2 ** 17, 1.0, 0, 0, 255)


def test_bad_inputs():
    with pytest.raises(NumericsError, match="must be an integer tensor"):
        int_conv(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 1, 1, dtype=torch.long))
    with pytest.raises(NumericsError, match="do not match"):
        int_conv(torch.zeros(1, 2, 3, 3, dtype=torch.long), torch.zeros(1, 3, 1, 1, dtype=torch.long))
    with pytest.raises(NumericsError, match="unknown integer kernel"):
        int_linear(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long),
                   kernel="winograd")
