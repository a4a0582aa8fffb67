"""The compiled one-pass kernels (native_requant) compute what they replace bit for bit: the
requantization plan under every integer rounding contract (int32 and float32 accumulators, uint8
and int8 codes, the added vector and the bias shift, ties included), the exact residual add, the
table lookup and AffineFloor's float32 map; and they decline (writing nothing) what they do not
handle."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.errors import NumericsError
from qpasses.numerics import native_requant
from qpasses.numerics.fast_requant import AffineFloor, RequantPlan, code_dtype
from qpasses.numerics.fixed_point import quantize_multiplier, requantize
from qpasses.numerics.int_conv_onednn import window_fits_float32
from qpasses.numerics.native_requant import (native_add, native_affine, native_apply,
                                              native_available, native_lut)

pytestmark = [pytest.mark.skipif(not native_available(),
                                 reason="no C compiler here: the eager plan runs instead"),
              pytest.mark.usefixtures("native_any_threads")]


RANGES = [(0, 255), (-128, 127), (-8, 7), (0, 3), (3, 250)]


@st.composite
def cases(draw):
    rounding = draw(st.sampled_from(["gemmlowp", "single", "hawq"]))
    c = draw(st.integers(1, 19))
    bits = draw(st.sampled_from([31, 31, 24, 15]))
    if draw(st.booleans()):    # powers of two (times 1, 1.5, 0.75): exact ties
        scale = [2.0 ** draw(st.integers(-20, 1)) * draw(st.sampled_from([1.0, 1.5, 0.75]))
                 for _ in range(c)]
    else:
        scale = [float(np.exp(draw(st.floats(-16, 1)))) for _ in range(c)]
    m, s = quantize_multiplier(torch.tensor(scale, dtype=torch.float64), bits)
    z = draw(st.integers(-20, 20))
    qmin, qmax = draw(st.sampled_from(RANGES))
    if draw(st.booleans()):    # a fused ReLU
        qmin = max(qmin, min(z, qmax))
    bound = 2 ** draw(st.integers(3, 31)) - 1
    if rounding == "gemmlowp":
        bound = min(bound, (2 ** 31 - 1) >> int(s.clamp(min=0).max()))
    k = draw(st.sampled_from([0, 0, 2]))
    add = torch.tensor([draw(st.integers(-5000, 5000)) for _ in range(c)]) \
        if draw(st.booleans()) else None
    return rounding, bits, m, s, z, qmin, qmax, bound, k, add, draw(st.integers(0, 2 ** 16))


def _accumulators(plan: RequantPlan, bound: int, k: int, add, c: int, seed: int) -> torch.Tensor:
    """acc with |acc·2^k + add| <= bound: random, small, the window edges ±1, 0, ±1, ±bound."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = plan.vecs["lo"].to(torch.int64), plan.vecs["hi"].to(torch.int64)
    a = torch.cat([torch.randint(-bound, bound + 1, (300, c), generator=g),
                   torch.randint(-300, 301, (100, c), generator=g).clamp(-bound, bound),
                   torch.stack([lo - 1, lo, lo + 1, hi - 1, hi, hi + 1]).clamp(-bound, bound),
                   torch.tensor([0, 1, -1, bound, -bound]).unsqueeze(1).expand(5, c),
                   # every value near 0: the ties of power-of-two multipliers, both signs
                   torch.arange(-4096, 4097).clamp(-bound, bound).unsqueeze(1).expand(8193, c)])
    off = torch.zeros(c, dtype=torch.int64) if add is None else add
    acc = torch.div(a - off, 2 ** k, rounding_mode="floor")
    return acc[((acc * 2 ** k + off).abs() <= bound).all(1)]


@settings(max_examples=80, deadline=None, derandomize=True)
@given(cases())
def test_native_kernel_equals_the_reference_contract(case):
    rounding, bits, m, s, z, qmin, qmax, bound, k, add, seed = case
    c = m.numel()
    plan = RequantPlan(rounding, multiplier=m, shift=s, zero_point=z, qmin=qmin, qmax=qmax,
                       bound=bound, multiplier_bits=bits, pre_shift=k, pre_add=add)
    acc = _accumulators(plan, bound, k, add, c, seed)
    if acc.numel() == 0:
        return
    want = requantize(acc * 2 ** k + (0 if add is None else add), m, s, z, qmin, qmax, rounding,
                      axis=1, multiplier_bits=bits)
    odt = code_dtype(qmin, qmax)
    dtypes = [torch.int32] if acc.abs().max() < 2 ** 31 else []
    if acc.abs().max() <= 2 ** 24:
        dtypes.append(torch.float32)
    for dt in dtypes:
        out = torch.full(acc.shape, 7, dtype=odt)
        done = native_apply(plan, acc.to(dt), out)
        assert done == (plan.mode == "float64"), plan.mode
        if done:
            assert torch.equal(out.to(torch.int64), want), (rounding, dt)


@pytest.mark.parametrize("rounding", ["gemmlowp", "single", "hawq"])
@pytest.mark.parametrize("scale", [0.25, 0.5, 0.75, 1.5 / 8, 2.0 ** -9, 0.3])
def test_native_kernel_on_every_accumulator_near_zero(rounding, scale):
    """Power-of-two multipliers put exact ties at both signs: every accumulator in a range."""
    m, s = quantize_multiplier(torch.tensor([scale, scale * 1.5], dtype=torch.float64), 31)
    for z, qmin, qmax in ((0, -128, 127), (7, 7, 255), (-3, -128, 100)):
        plan = RequantPlan(rounding, multiplier=m, shift=s, zero_point=z, qmin=qmin, qmax=qmax,
                           bound=2 ** 20, pre_add=torch.tensor([5, -9]))
        acc = torch.arange(-5000, 5001).unsqueeze(1).expand(10001, 2)
        want = requantize(acc + torch.tensor([5, -9]), m, s, z, qmin, qmax, rounding, axis=1)
        for dt in (torch.int32, torch.float32):
            out = torch.empty(acc.shape, dtype=code_dtype(qmin, qmax))
            assert native_apply(plan, acc.to(dt), out)
            assert torch.equal(out.to(torch.int64), want), (z, dt)


@pytest.mark.parametrize("rounding", ["gemmlowp", "single", "hawq"])
def test_per_tensor_plan_on_many_channels(rounding):
    m, s = quantize_multiplier(torch.tensor([0.037], dtype=torch.float64), 31)
    plan = RequantPlan(rounding, multiplier=m, shift=s, zero_point=3, qmin=3, qmax=255,
                       bound=2 ** 20)
    acc = torch.randint(-3000, 3000, (50, 7), generator=torch.Generator().manual_seed(1))
    out = torch.empty(acc.shape, dtype=torch.uint8)
    assert plan.channels == 1 and native_apply(plan, acc.to(torch.int32), out)
    assert torch.equal(out.to(torch.int64), requantize(acc, m, s, 3, 3, 255, rounding))


@settings(max_examples=30, deadline=None, derandomize=True)
@given(cases())
def test_float32_accumulators_beyond_2_24_clamp_like_the_exact_ones(case):
    """oneDNN's float32 accumulators round beyond ±2^24; where the window fits (the condition the
    layer checks before using them) the codes equal the reference at the exact accumulator."""
    rounding, bits, m, s, z, qmin, qmax, _, k, add, seed = case
    bound = 2 ** 31 - 1 >> int(s.clamp(min=0).max()) if rounding == "gemmlowp" else 2 ** 31 - 1
    plan = RequantPlan(rounding, multiplier=m, shift=s, zero_point=z, qmin=qmin, qmax=qmax,
                       bound=bound, multiplier_bits=bits, pre_add=add)
    if plan.mode != "float64" or not window_fits_float32(*plan.window, plan.pre_shift):
        return
    c = m.numel()
    g = torch.Generator().manual_seed(seed)
    big = torch.randint(2 ** 24 - 4, min(bound, 2 ** 31 - 5001), (200, c), generator=g)
    acc = torch.cat([big, -big, torch.randint(-2 ** 24, 2 ** 24, (100, c), generator=g)])
    want = requantize(acc + (0 if add is None else add), m, s, z, qmin, qmax, rounding, axis=1,
                      multiplier_bits=bits)
    out = torch.empty(acc.shape, dtype=code_dtype(qmin, qmax))
    assert native_apply(plan, acc.to(torch.float32), out)
    assert torch.equal(out.to(torch.int64), want)


def test_native_declines_what_it_does_not_handle(monkeypatch):
    m, s = quantize_multiplier(torch.tensor([0.01, 0.02], dtype=torch.float64), 31)
    plan = RequantPlan("gemmlowp", multiplier=m, shift=s, zero_point=0, qmin=0, qmax=255,
                       bound=2 ** 20)
    acc = torch.randint(-2 ** 20, 2 ** 20, (8, 2), dtype=torch.int32)
    for a, out in ((acc.t().contiguous().t(), torch.empty(8, 2, dtype=torch.uint8)),   # strided
                   (acc.to(torch.int64), torch.empty(8, 2, dtype=torch.uint8)),        # int64
                   (acc, torch.empty(8, 2, dtype=torch.int16)),                        # int16
                   (acc[:, :1], torch.empty(8, 1, dtype=torch.uint8))):                # channels
        assert not native_apply(plan, a, out)
    fr = RequantPlan("float-rne", multiplier=m, shift=s, zero_point=0, qmin=0, qmax=255,
                     bound=2 ** 20, scale_f32=torch.tensor([0.01, 0.02]))
    assert not native_apply(fr, acc, torch.empty(8, 2, dtype=torch.uint8))
    monkeypatch.setattr(native_requant, "ENABLED", False)
    out = torch.full((8, 2), 9, dtype=torch.uint8)
    assert not native_apply(plan, acc, out) and bool((out == 9).all())


def _layouts(t: torch.Tensor) -> list[torch.Tensor]:
    return [t, t.contiguous(memory_format=torch.channels_last), t.permute(0, 2, 3, 1)]


CODES = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-600, 600)}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from([torch.uint8, torch.int8]), st.sampled_from([torch.uint8, torch.int8]),
       st.sampled_from([torch.uint8, torch.int8, torch.int16]), st.integers(-300, 300),
       st.integers(0, 2 ** 16))
def test_native_add_is_the_clamped_integer_sum(da, db, dout, c, seed):
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(dout)
    lo = max(info.min, -400) + seed % 31          # output clamps that bite on both sides
    hi = min(info.max, 500) - seed % 29
    a = torch.randint(*CODES[da], (2, 3, 5, 4), generator=g).to(da)
    b = torch.randint(*CODES[db], (2, 3, 5, 4), generator=g).to(db)
    for x, y in zip(_layouts(a), _layouts(b)):
        out = native_add(x, y, c, lo, hi, dout)
        assert out is not None and out.dtype == dout and out.stride() == x.stride()
        assert torch.equal(out.to(torch.int64),
                           (x.to(torch.int64) + y.to(torch.int64) + c).clamp(lo, hi))
    # different layouts, or a view with gaps: not handled
    assert native_add(a, b.contiguous(memory_format=torch.channels_last), c, lo, hi, dout) is None
    assert native_add(a[..., ::2], b[..., ::2], c, lo, hi, dout) is None


@settings(max_examples=30, deadline=None, derandomize=True)
@given(st.sampled_from([torch.uint8, torch.int8, torch.int16]),
       st.sampled_from([torch.uint8, torch.int8]), st.integers(0, 2 ** 16))
def test_native_lut_is_the_table_and_rejects_codes_outside_it(din, dout, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = CODES[din]
    table = torch.randint(*CODES[dout], (hi - lo + 1,), generator=g).to(dout)
    q = torch.randint(lo, hi + 1, (2, 3, 4, 5), generator=g).to(din)
    for x in _layouts(q):
        out = native_lut(table, x, lo)
        assert out is not None and out.stride() == x.stride()
        assert torch.equal(out, table[x.to(torch.int64) - lo])
    with pytest.raises(NumericsError, match="outside the range"):
        native_lut(table[:-1], torch.full((3,), hi).to(din), lo)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.sampled_from([torch.uint8, torch.int8, torch.int16]),
       st.sampled_from([torch.uint8, torch.int8]),
       st.floats(1e-3, 4.0) | st.sampled_from([0.5, 0.25, 1.0, 0.1]),
       st.floats(-300, 300) | st.sampled_from([0.5, -0.5, 127.5, 0.0]), st.integers(0, 2 ** 16))
def test_native_affine_is_affine_floor_apply_on_every_code(din, dout, s, c, seed):
    lo, hi = CODES[din]
    qmin, qmax = (0, 255) if dout == torch.uint8 else (-128, 127)
    if seed % 3 == 0:                      # a ReLU-like narrower range
        qmin, qmax = qmin + 17, qmax - 3
    s32 = float(torch.tensor(s, dtype=torch.float32))
    c32 = float(torch.tensor(c, dtype=torch.float32))
    affine = AffineFloor(s32, c32, qmin, qmax)
    codes = torch.arange(lo, hi + 1).to(din)
    want = affine.apply(codes, torch.empty(codes.shape, dtype=dout))
    got = native_affine(affine, codes, dout)
    assert got is not None and torch.equal(got, want)
    q = torch.randint(lo, hi + 1, (2, 3, 4, 5), generator=torch.Generator().manual_seed(seed)).to(din)
    for x in _layouts(q):
        assert torch.equal(native_affine(affine, x, dout),
                           affine.apply(x, torch.empty_like(x, dtype=dout)))
