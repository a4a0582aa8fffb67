"""The fast backend's arithmetic is exact: each argument of RequantPlan / AffineFloor / the blocked
kernels checked against the reference (fixed_point, int_ops) bit for bit, including the cases where
plain float64 would round and the ties of every contract."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.errors import NumericsError
from qpasses.numerics.fixed_point import quantize_multiplier, requantize, requantize_float
from qpasses.numerics.int_conv_fast import conv_blocks, prepare_conv
from qpasses.numerics.int_ops import int_conv, int_max_pool
from qpasses.numerics.fast_requant import (AffineFloor, RequantPlan, code_dtype, lut_gather,
                                           lut_gather2, max_pool_codes, requant_window)

CONTRACTS = ["gemmlowp", "single", "hawq", "float-rne"]
RANGES = [(0, 255), (-128, 127), (-8, 7), (0, 3), (-2 ** 15, 2 ** 15 - 1), (-300, 400)]


def _reference(a: torch.Tensor, rounding: str, m, s, z, qmin, qmax, bits, sf, bf) -> torch.Tensor:
    if rounding == "float-rne":
        return requantize_float(a, sf, z, qmin, qmax, axis=1, bias=bf)
    return requantize(a, m, s, z, qmin, qmax, rounding, axis=1, multiplier_bits=bits)


@st.composite
def plans(draw):
    rounding = draw(st.sampled_from(CONTRACTS))
    c = draw(st.integers(1, 4))
    bits = draw(st.sampled_from([31, 31, 24, 15, 8, 2]))
    if draw(st.booleans()):    # powers of two (times 1, 1.5, 0.75): many exact ties
        scale = [2.0 ** draw(st.integers(-20, 3)) * draw(st.sampled_from([1.0, 1.5, 0.75]))
                 for _ in range(c)]
    else:
        scale = [float(np.exp(draw(st.floats(-22, 3)))) for _ in range(c)]
    if draw(st.booleans()):    # tiny multipliers: shifts beyond float64's reach, and the flush
        scale[0] = 2.0 ** draw(st.integers(-34, -14))
    scale = torch.tensor(scale, dtype=torch.float64)
    m, s = quantize_multiplier(scale, bits)
    z = draw(st.integers(-40, 40))
    qmin, qmax = draw(st.sampled_from(RANGES))
    if draw(st.booleans()):    # a fused ReLU: the clamp starts at the zero point
        qmin = max(qmin, min(z, qmax))
    bound = 2 ** draw(st.integers(3, 31)) - 1
    if rounding == "gemmlowp":       # the lowering proves A·2^left within int32
        bound = min(bound, (2 ** 31 - 1) >> int(s.clamp(min=0).max()))
    sf = scale.to(torch.float32) if rounding == "float-rne" else None
    bf = (torch.randn(c, generator=torch.Generator().manual_seed(c)) * 50).to(torch.float32) \
        if rounding == "float-rne" and draw(st.booleans()) else None
    k = draw(st.sampled_from([0, 0, 1, 3]))
    add = torch.tensor([draw(st.integers(-5000, 5000)) for _ in range(c)]) \
        if draw(st.booleans()) else None
    seed = draw(st.integers(0, 2 ** 16))
    return rounding, bits, m, s, z, qmin, qmax, bound, sf, bf, k, add, seed


def _accumulators(plan: RequantPlan, bound: int, k: int, add, c: int, seed: int) -> torch.Tensor:
    """Accumulators A with |A| <= bound: random, the window edges ±1, 0, ±1 and ±bound."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randint(-bound, bound + 1, (400, c), generator=g)
    small = torch.randint(-300, 301, (200, c), generator=g).clamp(-bound, bound)
    lo, hi = plan.vecs["lo"].to(torch.int64), plan.vecs["hi"].to(torch.int64)
    edges = torch.stack([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1]).clamp(-bound, bound)
    fixed = torch.tensor([0, 1, -1, bound, -bound]).unsqueeze(1).expand(5, c)
    a = torch.cat([rand, small, edges, fixed])
    # only accumulators of the form acc·2^k + add exist
    off = torch.zeros(c, dtype=torch.int64) if add is None else add
    acc = torch.div(a - off, 2 ** k, rounding_mode="floor")
    a = acc * 2 ** k + off
    keep = (a.abs() <= bound).all(1)
    return acc[keep]


@settings(max_examples=120, deadline=None)
@given(plans())
def test_plan_equals_the_reference_contract(case):
    rounding, bits, m, s, z, qmin, qmax, bound, sf, bf, k, add, seed = case
    c = m.numel()
    plan = RequantPlan(rounding, multiplier=m, shift=s, zero_point=z, qmin=qmin, qmax=qmax,
                       bound=bound, multiplier_bits=bits, scale_f32=sf, bias_f=bf, pre_shift=k,
                       pre_add=add)
    acc = _accumulators(plan, bound, k, add, c, seed)
    a = acc * 2 ** k + (0 if add is None else add)
    want = _reference(a, rounding, m, s, z, qmin, qmax, bits, sf, bf)
    dtypes = [torch.int64, torch.float64]
    if acc.abs().max() < 2 ** 31:
        dtypes.append(torch.int32)        # the int8 GEMM's accumulators, formed in place
    if acc.abs().max() < 2 ** 24:
        dtypes.append(torch.float32)      # the float32 GEMM's
    for dt in dtypes:
        out = torch.empty(acc.shape, dtype=code_dtype(qmin, qmax))
        plan.apply(acc.to(dt, copy=True), out, owned=True)
        assert torch.equal(out.to(torch.int64), want), (plan.mode, dt)
    # channels along another axis, chunked along dim 0
    acc3 = acc.t().unsqueeze(0).expand(3, c, acc.shape[0]).contiguous()
    out3 = torch.empty(acc3.shape, dtype=code_dtype(qmin, qmax))
    plan.apply(acc3, out3, axis=1)
    assert torch.equal(out3.to(torch.int64), want.t().unsqueeze(0).expand_as(out3))
    assert torch.equal(acc3[0], acc.t())           # not owned: left untouched


def _merged_gemmlowp(a: int, m0: int, left: int, right: int) -> int:
    """RequantPlan's single floor for gemmlowp (see its docstring, item 3)."""
    x = a * m0 * 2 ** left
    if right == 0:
        return (x + 2 ** 30) // 2 ** 31
    return (x + 2 ** 30 + 2 ** 31 * (2 ** (right - 1) - (a < 0))) // 2 ** (31 + right)


def _gemmlowp(a: int, m0: int, left: int, right: int) -> int:
    """SRDHM then RoundingDivideByPOT on Python ints (docs/int-sim.md, "Integer arithmetic")."""
    h = (a * 2 ** left * m0 + 2 ** 30) // 2 ** 31
    if right == 0:
        return h
    q, r = divmod(abs(h), 2 ** right)
    q += r >= 2 ** (right - 1)
    return q if h >= 0 else -q


@settings(max_examples=300, deadline=None)
@given(st.integers(2 ** 30, 2 ** 31 - 1) | st.sampled_from([0, 2 ** 30, 2 ** 30 + 1]),
       st.integers(0, 31), st.booleans(), st.integers(-(2 ** 31), 2 ** 31 - 1) |
       st.integers(-3000, 3000))
def test_gemmlowp_double_rounding_is_one_floor(m0, shift, left_not_right, a):
    """The identity behind the float64 path: the two roundings of gemmlowp merge into one floor,
    and SRDHM's result is negative exactly when A < 0 (or it is 0), ties and A = −1 included."""
    left, right = (shift, 0) if left_not_right else (0, shift)
    if left and abs(a) << left > 2 ** 31 - 1:
        a = a >> left
    assert _merged_gemmlowp(a, m0, left, right) == _gemmlowp(a, m0, left, right)


def test_ties_of_the_merged_floor():
    # h = −2^(r−1) exactly (RDBPOT rounds the tie away from zero) and the SRDHM tie
    m0, r = 2 ** 30, 3              # M = 2^-4: A·M0/2^31 = A/2
    for a in range(-40, 41):
        assert _merged_gemmlowp(a, m0, 0, r) == _gemmlowp(a, m0, 0, r)
    assert _merged_gemmlowp(-1, 2 ** 30, 0, 1) == 0


def test_float64_alone_would_round_where_the_window_keeps_it_exact():
    """Accumulators near 2^30 times a 31-bit multiplier exceed float64's 53 bits: evaluating the
    merged floor on them in float64 loses the tie information, the window clamp avoids ever
    doing so (the saturated outputs are the same), and the plan stays exact."""
    m, s = quantize_multiplier(torch.tensor([0.3], dtype=torch.float64))
    m0, right = int(m), -int(s)
    # accumulators whose exact A·M0 + C lies within 64 of a multiple of 2^(31+r) (M0 is odd)
    mod, c = 2 ** (31 + right), 2 ** 30 + 2 ** (30 + right)
    near = [((t - c) * pow(m0, -1, mod)) % mod for t in range(-64, 65)]
    a = torch.tensor([v for v in near if v < 2 ** 31], dtype=torch.int64)
    exact = torch.tensor([_merged_gemmlowp(int(v), m0, 0, right) for v in a])
    naive = torch.floor(a.to(torch.float64) * (m0 * 2.0 ** (-31 - right))
                        + (0.5 + 2.0 ** (-right - 1)))
    assert bool((naive.to(torch.int64) != exact).any())          # float64 alone rounds
    plan = RequantPlan("gemmlowp", multiplier=m, shift=s, zero_point=0, qmin=-2 ** 31,
                       qmax=2 ** 31 - 1, bound=2 ** 31 - 1)
    assert plan.mode == "int64"         # no window: the 53-bit check sends it to int64
    out = torch.empty(a.shape, dtype=torch.int64)
    assert torch.equal(plan.apply(a, out), requantize(a, m, s, 0, -2 ** 31, 2 ** 31 - 1))
    plan8 = RequantPlan("gemmlowp", multiplier=m, shift=s, zero_point=0, qmin=-128, qmax=127,
                        bound=2 ** 31 - 1)
    assert plan8.mode == "float64"      # the 8-bit window: |A| <= ~860
    assert float(plan8.vecs["hi"].max()) < 1000
    out8 = torch.empty(a.shape, dtype=torch.int8)
    assert torch.equal(plan8.apply(a.to(torch.int32), out8, owned=True).long(),
                       requantize(a, m, s, 0, -128, 127))


def test_tiny_multipliers_fall_back_to_int64_and_stay_exact():
    m, s = quantize_multiplier(torch.tensor([2.0 ** -27, 0.01], dtype=torch.float64))
    plan = RequantPlan("single", multiplier=m, shift=s, zero_point=3, qmin=-128, qmax=127,
                       bound=2 ** 31 - 1)
    assert plan.mode == "int64"
    a = torch.randint(-2 ** 31 + 1, 2 ** 31 - 1, (1000, 2))
    out = torch.empty(a.shape, dtype=torch.int8)
    assert torch.equal(plan.apply(a, out).long(),
                       requantize(a, m, s, 3, -128, 127, "single", axis=1))


@settings(max_examples=40, deadline=None)
@given(plans())
def test_requant_window_changes_no_output(case):
    rounding, bits, m, s, z, qmin, qmax, bound, sf, bf, k, add, seed = case
    c = m.numel()

    def f(a):      # (c,) or (c, K), channel c in row c
        return _reference(a.reshape(c, -1).t(), rounding, m, s, z, -2 ** 31, 2 ** 31 - 1, bits,
                          sf, bf).t().reshape(a.shape)
    lo, hi, clamp = requant_window(f, qmin, qmax, bound, c)
    g = torch.Generator().manual_seed(seed)
    a = torch.cat([torch.randint(-bound, bound + 1, (300, c), generator=g),
                   torch.stack([lo - 1, lo, hi, hi + 1]).clamp(-bound, bound)])
    want = torch.stack([f(row) for row in a]).clamp(qmin, qmax)
    got = torch.stack([f(row) for row in torch.minimum(torch.maximum(a, lo), hi)])
    if clamp:
        got = got.clamp(qmin, qmax)
    else:
        assert int(got.min()) >= qmin and int(got.max()) <= qmax
    assert torch.equal(got, want)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(plans())
def test_requant_window_is_the_tightest_on_small_ranges(case):
    """The k-ary search finds exactly the definition's bounds: lo the largest A with
    f(A) <= qmin, hi the smallest with f(A) >= qmax (brute force over every |A| <= 3000)."""
    rounding, bits, m, s, z, qmin, qmax, bound, sf, bf, k, add, seed = case
    c, bound = m.numel(), min(bound, 3000)

    def f(a):
        return _reference(a.reshape(c, -1).t(), rounding, m, s, z, -2 ** 31, 2 ** 31 - 1, bits,
                          sf, bf).t().reshape(a.shape)
    lo, hi, _ = requant_window(f, qmin, qmax, bound, c)
    # a guess (right, wrong or absurd) changes nothing but the time
    for slope in (torch.rand(c, generator=torch.Generator().manual_seed(seed)) * 3, -1e30):
        assert [torch.equal(u, v) for u, v in zip(
            requant_window(f, qmin, qmax, bound, c, torch.as_tensor(slope), torch.tensor(z)),
            (lo, hi))] == [True, True]
    every = torch.arange(-bound, bound + 1).expand(c, -1)
    y = f(every)
    low = torch.where(y <= qmin, every, -bound - 1).amax(1)
    high = torch.where(y >= qmax, every, bound + 1).amin(1)
    want_lo = torch.where(low >= -bound, low, -bound)
    want_hi = torch.where(high <= bound, high, bound)
    assert torch.equal(hi, want_hi)
    assert torch.equal(lo, torch.minimum(want_lo, want_hi))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(CONTRACTS), st.floats(-10, 3), st.integers(-40, 40), st.integers(-40, 40),
       st.sampled_from([(0, 255), (-128, 127), (0, 15)]), st.integers(1, 400),
       st.sampled_from([torch.int8, torch.int16, torch.int64]))
def test_affine_floor_is_exact_on_every_code_or_declines(rounding, log_m, z_in, z, rng, b, dt):
    qmin, qmax = rng
    codes = torch.arange(z_in - b, z_in + b + 1)
    scale = torch.tensor([math.exp(log_m)], dtype=torch.float64)
    if rounding == "float-rne":
        table = requantize_float(codes - z_in, scale, z, qmin, qmax)
    else:
        mm, ss = quantize_multiplier(scale)
        if rounding == "gemmlowp" and b << max(int(ss), 0) > 2 ** 31 - 1:
            return
        table = requantize(codes - z_in, mm, ss, z, qmin, qmax, rounding)
    fit = AffineFloor.fit(codes, table, float(scale), qmin, qmax, code_dtype(qmin, qmax))
    if fit is None:
        return                         # the caller keeps its table
    q = codes[torch.randperm(codes.numel())].to(dt) if codes.min() >= torch.iinfo(dt).min and \
        codes.max() <= torch.iinfo(dt).max else codes
    out = torch.empty(q.shape, dtype=code_dtype(qmin, qmax))
    assert torch.equal(fit.apply(q, out).to(torch.int64), table[q.to(torch.int64) - codes[0]])


def test_lut_gathers_keep_layout_and_refuse_codes_outside():
    table = torch.arange(100, 356, dtype=torch.int16)
    q = torch.randint(-128, 128, (2, 3, 4, 5), dtype=torch.int8).contiguous(
        memory_format=torch.channels_last)
    got = lut_gather(table, q, -128)
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, table[q.long() + 128])
    b = torch.randint(0, 4, q.shape, dtype=torch.uint8)
    t2 = torch.arange(256 * 4, dtype=torch.int32)
    assert torch.equal(lut_gather2(t2, q, -128, b, 0, 4), t2[(q.long() + 128) * 4 + b.long()])
    with pytest.raises(NumericsError, match="outside"):
        lut_gather(table, q, -100)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([None, 1, 2, 3]), st.integers(0, 1),
       st.integers(1, 2), st.booleans(), st.sampled_from([torch.uint8, torch.int8, torch.int16,
                                                         torch.int64]),
       st.booleans(), st.integers(0, 2 ** 16))
def test_max_pool_on_codes_equals_the_reference(nd, k, stride, pad, dil, ceil, dt, cl, seed):
    pad = min(pad, k // 2)
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3) + tuple(int(v) for v in torch.randint(dil * (k - 1) + 1, 8, (nd,),
                                                          generator=g))
    lo, hi = (0, 255) if dt == torch.uint8 else (-128, 127)
    x = torch.randint(lo, hi + 1, shape, generator=g).to(dt)
    if cl and nd == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    want = int_max_pool(x, k, stride, pad, dil, ceil)
    if want.numel() and int(want.min()) < lo:
        return              # a window of padding only (the reference's "never selected" code)
    got = max_pool_codes(x, k, stride, pad, dil, ceil)
    assert got.dtype == x.dtype and torch.equal(got.to(torch.int64), want)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 8), st.integers(1, 3), st.integers(1, 2),
       st.integers(0, 2), st.integers(1, 2), st.sampled_from([1, 2]),
       st.sampled_from(["int8-mm", "float32", "float64"]), st.sampled_from([8, 40, 200, 5000]),
       st.sampled_from([torch.uint8, torch.int64]), st.booleans(), st.integers(0, 2 ** 16))
def test_conv_blocks_equal_the_reference_for_any_block_size(n, c, k, stride, pad, dil, groups,
                                                            kernel, block, dt, cl, seed):
    g = torch.Generator().manual_seed(seed)
    c, o = c * groups, 2 * groups
    size = dil * (k - 1) + 1 + int(torch.randint(0, 5, (1,), generator=g))
    x = torch.randint(0, 256, (n, c, size, size), generator=g).to(dt)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randint(-128, 128, (o, c // groups, k, k), generator=g)
    want = int_conv(x, w, stride=stride, padding=pad, dilation=dil, groups=groups,
                    x_zero_point=3)
    p = prepare_conv(w, 0, kernel=kernel, stride=stride, padding=pad, dilation=dil,
                     groups=groups, x_qmin=0, x_qmax=255)
    run = conv_blocks(x, p, 3, block_elems=block)
    got = torch.empty(run.rows, o, dtype=torch.int64)
    for r0, r1, acc in run.blocks:
        got[r0:r1] = acc.round().to(torch.int64) if acc.is_floating_point() else acc
    if run.offset is not None:
        got += run.offset
    assert torch.equal(got.view(n, *run.out_sizes, o).permute(0, 3, 1, 2), want)


@pytest.mark.parametrize("rounding,shift", [("gemmlowp", -9), ("gemmlowp", 2), ("single", -5),
                                            ("hawq", -5)])
def test_requant_window_with_the_contracts_estimate_takes_three_calls(rounding, shift):
    """With the multiplier's estimate and the contract's rounding spread, the search needs the
    ends, one round and the final check: 3 evaluations of the contract (the plan of every
    lowered layer runs it, once per relowering in emulation mode)."""
    c = 64
    m = torch.randint(2 ** 30, 2 ** 31 - 1, (c,), generator=torch.Generator().manual_seed(1))
    s = torch.full((c,), shift)
    calls = []

    def f(a):
        calls.append(a.shape)
        return requantize(a, m, s, 3, -2 ** 31, 2 ** 31 - 1, rounding, axis=0)
    slope = torch.ldexp(m.double(), s - 31)
    spread = 2.0 ** (-max(-shift, 0) - 1) if rounding == "gemmlowp" else 0.0
    got = requant_window(f, 0, 255, 2 ** 24, c, slope, torch.tensor(3), spread)
    assert len(calls) == 3
    calls.clear()
    want = requant_window(f, 0, 255, 2 ** 24, c)
    assert len(calls) > 3 and all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
