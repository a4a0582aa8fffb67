"""Laws of the uniform quantizers in qpasses.numerics.quantizers (hypothesis property tests)."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qpasses.errors import NumericsError
from qpasses.numerics import (ROUNDING_MODES, SCHEMES, calc_qparams, dequantize, dorefa_normalize,
                              dorefa_weight, fake_quantize, fracbits_interp, lsq_fake_quant,
                              minmax_qparams, pact, qrange, quantize, quantize_dequantize,
                              round_tensor, scheme_qrange, unit_quantize)

FAST = settings(max_examples=30, deadline=None)
NEAREST = ("rne", "rha", "rhu")

finite32 = st.floats(-50, 50, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def matrices(draw, max_c: int = 4, max_k: int = 6) -> torch.Tensor:
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(1, max_k))
    return torch.from_numpy(draw(hnp.arrays(np.float32, (c, k), elements=finite32)))


@st.composite
def quant_setups(draw):
    """x (C, K), scheme, narrow, rounding, per-kernel bits (0..8), per-channel qparams from min/max."""
    x = draw(matrices())
    scheme = draw(st.sampled_from(SCHEMES))
    narrow = draw(st.booleans()) if scheme in ("symmetric", "asymmetric_signed") else False
    rounding = draw(st.sampled_from(ROUNDING_MODES))
    bits = torch.tensor(draw(st.lists(st.integers(0, 8), min_size=x.shape[0], max_size=x.shape[0])))
    scale, zp = minmax_qparams(x, bits, scheme, axis=0, narrow=narrow)
    return x, scheme, narrow, rounding, bits, scale, zp


# ---------------------------------------------------------------------------------------------------
# rounding
# ---------------------------------------------------------------------------------------------------

def _exact_round(v: float, mode: str) -> int:
    f = Fraction(v)
    half = Fraction(1, 2)
    if mode == "rne":
        return round(f)  # Fraction.__round__ is half-to-even
    if mode == "floor":
        return math.floor(f)
    if mode == "trunc":
        return math.trunc(f)
    if mode == "rhu":
        return math.floor(f) + (1 if f - math.floor(f) >= half else 0)
    a = abs(f)
    r = math.floor(a) + (1 if a - math.floor(a) >= half else 0)
    return r if f >= 0 else -r


def test_round_tensor_on_exact_ties():
    x = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    expected = {
        "rne": [-2, -2, 0, 0, 2, 2],
        "rha": [-3, -2, -1, 1, 2, 3],
        "rhu": [-2, -1, 0, 1, 2, 3],
        "trunc": [-2, -1, 0, 0, 1, 2],
        "floor": [-3, -2, -1, 0, 1, 2],
    }
    for mode, want in expected.items():
        assert round_tensor(x, mode).tolist() == want, mode


def test_round_half_away_and_up_are_not_fooled_by_the_largest_float_below_half():
    # floor(x + 0.5) gives 1 for x = 0.49999997 because x + 0.5 rounds up to 1.0 in float32.
    below_half = float(np.nextafter(np.float32(0.5), np.float32(0)))
    x = torch.tensor([below_half, -below_half], dtype=torch.float32)
    assert round_tensor(x, "rha").tolist() == [0.0, 0.0]
    assert round_tensor(x, "rhu").tolist() == [0.0, 0.0]


@FAST
@given(st.lists(st.one_of(finite32, st.integers(-1000, 1000).map(lambda i: i + 0.5)),
                min_size=1, max_size=20),
       st.sampled_from(ROUNDING_MODES))
def test_round_tensor_matches_exact_rational_rounding(values, mode):
    x = torch.tensor(values, dtype=torch.float32)
    got = round_tensor(x, mode)
    want = [_exact_round(float(v), mode) for v in x.tolist()]
    assert got.tolist() == want


def test_round_tensor_rejects_unknown_mode():
    with pytest.raises(NumericsError, match="rounding"):
        round_tensor(torch.zeros(2), "nearest")


# ---------------------------------------------------------------------------------------------------
# integer ranges and qparams
# ---------------------------------------------------------------------------------------------------

def test_qrange_values():
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, True, narrow=True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-8, 7)
    assert qrange(1, True) == (-1, 0)
    assert qrange(0, True) == (0, 0)
    assert qrange(0, False) == (0, 0)
    assert qrange(32, False) == (0, 2**32 - 1)
    assert scheme_qrange(8, "asymmetric") == (0, 255)
    assert scheme_qrange(8, "asymmetric_signed") == (-128, 127)


@FAST
@given(st.lists(st.integers(0, 32), min_size=1, max_size=8), st.booleans(), st.booleans())
def test_qrange_per_kernel_tensor_equals_scalar_loop(bits, signed, narrow):
    assume(signed or not narrow)
    lo, hi = qrange(torch.tensor(bits), signed, narrow)
    assert lo.dtype == hi.dtype == torch.int64
    for i, b in enumerate(bits):
        assert (int(lo[i]), int(hi[i])) == qrange(b, signed, narrow)


@pytest.mark.parametrize("bad, match", [
    (33, "0..32"), (-1, "0..32"), (torch.tensor([4, 40]), "0..32"), (torch.tensor([2.5]), "integer"),
    (torch.ones(2, 2, dtype=torch.int64), "1-D"), (True, "bool"), ("8", "int"),
])
def test_qrange_rejects_bad_bits(bad, match):
    with pytest.raises(NumericsError, match=match):
        qrange(bad, True)


def test_narrow_unsigned_is_rejected():
    with pytest.raises(NumericsError, match="narrow"):
        qrange(8, False, narrow=True)
    with pytest.raises(NumericsError, match="narrow"):
        calc_qparams(-1.0, 1.0, 8, "unsigned", narrow=True)


def test_symmetric_full_range_tie_law_with_exact_scale():
    # Distiller's full-range symmetric mode: +max lands on 127.5 -> 128 -> clamped to 127, -max on -128.
    # amax = 127.5 makes the scale exactly 1 so the ties are exact.
    s, z = calc_qparams(-127.5, 127.5, 8, "symmetric")
    assert float(s) == 1.0 and int(z) == 0
    q = quantize(torch.tensor([127.5, -127.5, 126.5, -0.5]), s, z, 8)
    assert q.tolist() == [127, -128, 126, 0]


def test_zero_point_is_added_after_rounding():
    # q = rne(x / s) + z, not rne(x / s + z): the two differ on ties when z is odd.
    q = quantize(torch.tensor([2.5, 3.5, -0.5]), 1.0, 1, 8, "asymmetric")
    assert q.tolist() == [3, 5, 1]
    q = quantize(torch.tensor([2.5, -1.5]), 1.0, 1, 8, "asymmetric", rounding="rhu")
    assert q.tolist() == [4, 0]


def test_symmetric_unit_range_matches_distiller_scale_and_torch():
    s, z = calc_qparams(torch.tensor(-1.0), torch.tensor(1.0), 8, "symmetric")
    assert float(s) == pytest.approx(1 / 127.5)
    assert quantize(torch.tensor([1.0]), s, z, 8).tolist() == [127]
    # float32 1/s is 127.49999, so -1 -> -127 exactly as torch's kernel (Distiller's exact
    # multiplier 127.5 gives -128).
    x = torch.tensor([-1.0, 1.0])
    ref = torch.fake_quantize_per_tensor_affine(x, float(s), 0, -128, 127)
    assert torch.equal(quantize_dequantize(x, s, z, 8), ref)


def test_symmetric_narrow_scale():
    s, _ = calc_qparams(-2.0, 1.0, 8, "symmetric", narrow=True)
    assert float(s) == pytest.approx(2.0 / 127)


@FAST
@given(st.floats(-1e3, 1e3, width=32), st.floats(0, 1e3, width=32), st.integers(1, 16),
       st.sampled_from(["asymmetric", "asymmetric_signed"]))
def test_asymmetric_zero_point_is_integral_and_zero_exact(lo, width, bits, scheme):
    hi = lo + width
    s, z = calc_qparams(torch.tensor(lo), torch.tensor(hi), bits, scheme)
    qmin, qmax = scheme_qrange(bits, scheme)
    assert z.dtype == torch.int64 and qmin <= int(z) <= qmax
    assert float(s) > 0 and math.isfinite(float(s))
    assert quantize_dequantize(torch.zeros(3), s, z, bits, scheme).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_zero_range_and_all_zero_are_safe(scheme, value):
    s, z = calc_qparams(torch.tensor(value), torch.tensor(value), 8, scheme)
    assert torch.isfinite(s) and float(s) > 0
    fq = quantize_dequantize(torch.full((4,), value), s, z, 8, scheme)
    assert torch.isfinite(fq).all()
    if value == 0.0:
        assert fq.eq(0).all()


def test_calc_qparams_per_channel_shapes_and_per_kernel_bits():
    mn = torch.tensor([-1.0, -2.0, 0.0])
    mx = torch.tensor([1.0, 0.5, 0.0])
    bits = torch.tensor([8, 4, 0])
    s, z = calc_qparams(mn, mx, bits, "asymmetric")
    assert s.shape == z.shape == (3,)
    assert s[0] == pytest.approx(2 / 255) and s[1] == pytest.approx(2.5 / 15)
    assert float(s[2]) == 1.0 and int(z[2]) == 0  # 0-bit channel: any scale, z = 0
    # per-tensor range with per-kernel bits broadcasts to per-kernel qparams
    s2, _ = calc_qparams(torch.tensor(-1.0), torch.tensor(1.0), torch.tensor([8, 4]), "symmetric")
    assert s2.tolist() == pytest.approx([1 / 127.5, 1 / 7.5])


def test_unsigned_scheme_clips_negatives():
    s, z = calc_qparams(-3.0, 2.0, 4, "unsigned")
    assert float(s) == pytest.approx(2 / 15) and int(z) == 0
    assert quantize_dequantize(torch.tensor([-1.0]), s, z, 4, "unsigned").tolist() == [0.0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_val=1.0, max_val=0.0), "min_val"),
    (dict(min_val=float("nan"), max_val=0.0), "finite"),
    (dict(min_val=0.0, max_val=1.0, scheme="affine"), "scheme"),
    (dict(min_val=0.0, max_val=1.0, bits=64), "0..32"),
])
def test_calc_qparams_errors(kwargs, match):
    args = dict(bits=8, scheme="symmetric")
    args.update(kwargs)
    with pytest.raises(NumericsError, match=match):
        calc_qparams(**args)


# ---------------------------------------------------------------------------------------------------
# laws of affine fake quantization
# ---------------------------------------------------------------------------------------------------

@FAST
@given(quant_setups())
def test_codes_in_range_and_outputs_on_the_grid(setup):
    x, scheme, narrow, rounding, bits, scale, zp = setup
    q = quantize(x, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
    qmin, qmax = scheme_qrange(bits, scheme, narrow)
    assert q.dtype == torch.int64
    assert (q >= qmin[:, None]).all() and (q <= qmax[:, None]).all()
    fq = quantize_dequantize(x, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
    # on the grid s * (q - z): exactly the dequantized codes
    assert torch.equal(fq, dequantize(q, scale, zp))
    assert torch.isfinite(fq).all()


@FAST
@given(quant_setups())
def test_fake_quant_is_idempotent_for_nearest_rounding(setup):
    x, scheme, narrow, _, bits, scale, zp = setup
    for rounding in NEAREST:
        fq = quantize_dequantize(x, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
        again = quantize_dequantize(fq, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
        assert torch.equal(again, fq)


@FAST
@given(matrices(), st.integers(-6, 4), st.integers(1, 8), st.sampled_from(ROUNDING_MODES),
       st.sampled_from(SCHEMES))
def test_idempotent_for_every_rounding_with_power_of_two_scale(x, log2s, bits, rounding, scheme):
    # With s = 2^k every step is exact, so even floor / trunc are projections.
    s = torch.tensor(2.0 ** log2s)
    qmin, qmax = scheme_qrange(bits, scheme)
    z = torch.tensor((qmin + qmax + 1) // 2 if scheme.startswith("asymmetric") else 0)
    fq = quantize_dequantize(x, s, z, bits, scheme, rounding=rounding)
    assert torch.equal(quantize_dequantize(fq, s, z, bits, scheme, rounding=rounding), fq)


@FAST
@given(quant_setups())
def test_error_bound_inside_the_range(setup):
    x, scheme, narrow, rounding, bits, scale, zp = setup
    fq = quantize_dequantize(x, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
    qmin, qmax = scheme_qrange(bits, scheme, narrow)
    s, z = scale[:, None], zp[:, None].float()
    lo, hi = s * (qmin[:, None] - z), s * (qmax[:, None] - z)
    inside = (x >= lo) & (x <= hi) & (bits[:, None] > 0)
    bound = (0.5 if rounding in NEAREST else 1.0) * s * (1 + 1e-5) + 1e-6
    err = (x - fq).abs()
    assert (err[inside.expand_as(x)] <= bound.expand_as(x)[inside.expand_as(x)]).all()


@FAST
@given(quant_setups())
def test_per_kernel_vectorized_equals_per_channel_loop(setup):
    x, scheme, narrow, rounding, bits, scale, zp = setup
    fq = quantize_dequantize(x, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
    q = quantize(x, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
    for c in range(x.shape[0]):
        b = int(bits[c])
        row = quantize_dequantize(x[c], scale[c], zp[c], b, scheme, narrow=narrow, rounding=rounding)
        assert torch.equal(fq[c], row)
        q_row = quantize(x[c], scale[c], zp[c], b, scheme, narrow=narrow, rounding=rounding)
        assert torch.equal(q[c], q_row)


@FAST
@given(quant_setups(), st.sampled_from([0.0, float("nan"), float("inf"), -1.0, 1e30]))
def test_zero_bit_channels_are_exactly_zero_whatever_the_scale(setup, bad_scale):
    x, scheme, narrow, rounding, bits, scale, zp = setup
    bits = bits.clone()
    bits[0] = 0
    scale = scale.clone()
    scale[0] = bad_scale
    xg = x.clone().requires_grad_(True)
    fq = quantize_dequantize(xg, scale, zp, bits, scheme, narrow=narrow, rounding=rounding)
    assert fq[0].eq(0).all() and not fq[0].signbit().any()
    assert torch.isfinite(fq).all()
    fq.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad[0].eq(0).all()


def test_zero_bit_through_calc_qparams_and_int_codes():
    w = torch.randn(3, 5)
    bits = torch.tensor([0, 4, 0])
    s, z = minmax_qparams(w, bits, "symmetric", axis=0)
    assert quantize(w, s, z, bits)[[0, 2]].eq(0).all()
    assert quantize_dequantize(w, s, z, bits)[[0, 2]].eq(0).all()


@FAST
@given(matrices(), st.integers(2, 8), st.integers(-5, 3), st.integers(0, 3))
def test_ste_gradient_is_identity_inside_and_zero_outside(x, bits, log2s, zp):
    s = torch.tensor(2.0 ** log2s, requires_grad=True)
    qmin, qmax = 0, 2**bits - 1
    xg = x.clone().requires_grad_(True)
    upstream = torch.linspace(-1, 2, x.numel()).reshape(x.shape)
    (fake_quantize(xg, s, zp, qmin, qmax) * upstream).sum().backward()
    codes = torch.round(x / 2.0 ** log2s) + zp  # exact: power-of-two scale
    inside = (codes >= qmin) & (codes <= qmax)
    assert torch.equal(xg.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    assert s.grad is None  # fake_quantize treats qparams as constants (use lsq_fake_quant to learn them)


def test_matches_torch_fake_quantize_per_channel():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=gen) * torch.rand(8, 1, generator=gen) * 4
    for scheme, qmin, qmax in (("asymmetric", 0, 255), ("symmetric", -128, 127)):
        s, z = minmax_qparams(x, 8, scheme, axis=0)
        ref = torch.fake_quantize_per_channel_affine(x, s, z.to(torch.int32), 0, qmin, qmax)
        assert torch.equal(quantize_dequantize(x, s, z, 8, scheme), ref)
    # per-tensor, with out-of-range inputs so the gradient masks can be compared as well
    s, z = torch.tensor(0.05), torch.tensor(3)
    xa = (x * 2).requires_grad_(True)
    xb = (x * 2).requires_grad_(True)
    ours = fake_quantize(xa, s, z, 0, 255)
    ref = torch.fake_quantize_per_tensor_affine(xb, 0.05, 3, 0, 255)
    assert torch.equal(ours, ref)
    ours.sum().backward()
    ref.sum().backward()
    assert torch.equal(xa.grad, xb.grad)


def test_32_bit_codes_are_exact():
    x = torch.tensor([3e9, -1.0, 5e9])
    q = quantize(x, 1.0, 0, 32, "unsigned")
    assert q.tolist() == [3000000000, 0, 2**32 - 1]


def test_dequantize_of_quantize_round_trip_on_integers():
    q = torch.arange(-8, 8)
    s = torch.tensor(0.25)
    x = dequantize(q, s, 0)
    assert torch.equal(quantize(x, s, 0, 4), q)


@pytest.mark.parametrize("call, match", [
    (lambda x: quantize(x, torch.ones(3), 0, 8), "3 entries"),
    (lambda x: quantize(x, 1.0, 0, torch.tensor([8, 8])), "2 entries"),
    (lambda x: quantize(x, -1.0, 0, 8), "scale"),
    (lambda x: quantize(x, 0.0, 0, 8), "scale"),
    (lambda x: quantize(x, 1.0, 0, 8, rounding="up"), "rounding"),
    (lambda x: quantize(x, 1.0, 0, 8, axis=5), "axis"),
    (lambda x: quantize(x.long(), 1.0, 0, 8), "floating"),
    (lambda x: fake_quantize(x, 1.0, 0, 5, 2), "qmin"),
])
def test_affine_errors_name_the_argument(call, match):
    with pytest.raises(NumericsError, match=match):
        call(torch.randn(4, 2))


# ---------------------------------------------------------------------------------------------------
# LSQ
# ---------------------------------------------------------------------------------------------------

@FAST
@given(matrices(), st.integers(2, 8), st.floats(0.01, 2.0), st.booleans())
def test_lsq_forward_and_gradients_match_closed_form(x, bits, step0, per_channel):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    c = x.shape[0]
    step = (torch.full((c,), step0) * torch.linspace(1, 1.5, c) if per_channel
            else torch.tensor(step0)).requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    upstream = torch.linspace(-1, 1, x.numel()).reshape(x.shape)
    out = lsq_fake_quant(xg, step, qmin, qmax, grad_scale=0.5)
    s_b = step.detach().reshape(-1, 1) if per_channel else step.detach()
    assert torch.equal(out, fake_quantize(x, step.detach(), 0, qmin, qmax))
    (out * upstream).sum().backward()
    v = x * (1.0 / s_b)
    below, above = v < qmin, v > qmax
    inside = ~(below | above)
    assert torch.equal(xg.grad, torch.where(inside, upstream, torch.zeros_like(upstream)))
    d = torch.where(below, float(qmin), torch.where(above, float(qmax), torch.round(v) - v))
    ref = (upstream * d * 0.5).sum(1) if per_channel else (upstream * d * 0.5).sum()
    assert torch.allclose(step.grad, ref, atol=1e-5)


def test_lsq_default_grad_scale():
    x = torch.tensor([0.3, -0.7, 1.9, 0.05])
    step = torch.tensor(0.5, requires_grad=True)
    lsq_fake_quant(x, step, -4, 3).sum().backward()
    v = x / 0.5
    d = torch.where(v > 3, torch.tensor(3.0), torch.round(v) - v)
    assert float(step.grad) == pytest.approx(float(d.sum()) / math.sqrt(4 * 3), rel=1e-5)


def test_lsq_rejects_bad_step_and_range():
    with pytest.raises(NumericsError, match="step"):
        lsq_fake_quant(torch.ones(3), torch.tensor(0.0), -4, 3)
    with pytest.raises(NumericsError, match="qmin < qmax"):
        lsq_fake_quant(torch.ones(3), torch.tensor(1.0), 0, 0)


# ---------------------------------------------------------------------------------------------------
# FracBits: unit quantizer, fractional bits, DoReFa, PACT
# ---------------------------------------------------------------------------------------------------

unit_vals = st.floats(0, 1, allow_nan=False, width=32)


@st.composite
def unit_matrices(draw, max_c: int = 4, max_k: int = 6) -> torch.Tensor:
    c = draw(st.integers(1, max_c))
    k = draw(st.integers(1, max_k))
    return torch.from_numpy(draw(hnp.arrays(np.float32, (c, k), elements=unit_vals)))


@FAST
@given(unit_matrices(), st.data())
def test_fracbits_interp_at_integer_lambda_equals_plain_quantization(u, data):
    c = u.shape[0]
    bits = torch.tensor(data.draw(st.lists(st.integers(0, 8), min_size=c, max_size=c)))
    plain = unit_quantize(u, bits)
    assert torch.equal(fracbits_interp(u, bits.float()), plain)
    for i in range(c):
        assert torch.equal(plain[i], unit_quantize(u[i], int(bits[i])))
        assert torch.equal(fracbits_interp(u[i], float(bits[i])), plain[i])


def test_unit_quantize_values_and_zero_bit():
    u = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    assert unit_quantize(u, 2).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])  # rne(1.5) = 2
    assert unit_quantize(u, 0).tolist() == [0.5] * 5
    assert unit_quantize(u, 1).tolist() == [0, 0, 0, 1, 1]  # rne(0.5) = 0


@FAST
@given(unit_matrices(), st.data())
def test_fracbits_interp_blend_and_lambda_gradient(u, data):
    c = u.shape[0]
    lam_vals = data.draw(st.lists(st.floats(0.05, 7.95).filter(lambda v: abs(v - round(v)) > 0.05),
                                  min_size=c, max_size=c))
    u64 = u.double()
    lam = torch.tensor(lam_vals, dtype=torch.float64, requires_grad=True)
    upstream = torch.linspace(0.5, 1.5, u.numel(), dtype=torch.float64).reshape(u.shape)
    out = fracbits_interp(u64, lam)
    lo = torch.floor(lam.detach()).long()
    q_lo, q_hi = unit_quantize(u64, lo), unit_quantize(u64, lo + 1)
    f = (lam.detach() - lo)[:, None]
    assert torch.allclose(out, (1 - f) * q_lo + f * q_hi)
    (out * upstream).sum().backward()
    assert torch.allclose(lam.grad, (upstream * (q_hi - q_lo)).sum(1))  # Eq. 2
    # finite differences: Q is linear in lambda between integers, so the central difference is exact
    h = 1e-3
    with torch.no_grad():
        diff = fracbits_interp(u64, lam + h) - fracbits_interp(u64, lam - h)
        fd = (diff * upstream).sum(1) / (2 * h)
    assert torch.allclose(lam.grad, fd, atol=1e-6)


def test_fracbits_interp_two_and_a_half_is_the_mean_of_two_and_three():
    u = torch.rand(50, generator=torch.Generator().manual_seed(1))
    got = fracbits_interp(u, 2.5)
    assert torch.allclose(got, (unit_quantize(u, 2) + unit_quantize(u, 3)) / 2)


def test_fracbits_interp_gradient_at_integer_lambda_and_at_max_bits():
    u = torch.tensor([0.1, 0.4, 0.77])
    lam = torch.tensor(3.0, requires_grad=True)
    fracbits_interp(u, lam).sum().backward()  # hi = lo + 1: non-zero gradient at an integer
    assert float(lam.grad) == pytest.approx(float((unit_quantize(u, 4) - unit_quantize(u, 3)).sum()))
    assert float(lam.grad) != 0.0
    lam = torch.tensor(8.0, requires_grad=True)
    out = fracbits_interp(u, lam, max_bits=8)
    out.sum().backward()
    assert torch.equal(out, unit_quantize(u, 8)) and float(lam.grad) == 0.0
    lam = torch.tensor(9.3, requires_grad=True)  # clamped to max_bits: zero gradient
    out = fracbits_interp(u, lam, min_bits=2, max_bits=8)
    out.sum().backward()
    assert torch.equal(out, unit_quantize(u, 8)) and float(lam.grad) == 0.0


def test_fracbits_interp_below_one_bit_blends_with_the_zero_bit_candidate():
    u = torch.tensor([0.1, 0.9])
    lam = 0.25
    assert torch.allclose(fracbits_interp(u, lam), 0.75 * 0.5 + 0.25 * unit_quantize(u, 1))


def test_fracbits_interp_passes_straight_through_gradient_to_input():
    u = torch.tensor([0.1, 0.6, 0.9], requires_grad=True)
    fracbits_interp(u, torch.tensor(2.3)).sum().backward()
    assert torch.allclose(u.grad, torch.ones(3))


@pytest.mark.parametrize("lam, match", [
    (torch.tensor(-0.5), "lam"), (torch.tensor(40.0), "lam"), (torch.ones(2, 2), "1-D"),
    (torch.tensor([3, 4]), "floating"), (torch.tensor([2.5, 3.5, 4.5]), "3 entries"),
])
def test_fracbits_interp_errors(lam, match):
    with pytest.raises(NumericsError, match=match):
        fracbits_interp(torch.rand(2, 3), lam)


def test_dorefa_two_bit_grid_and_extremes():
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(2))
    out = dorefa_weight(w, 2)
    grid = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0])
    assert torch.isclose(out.reshape(-1, 1), grid).any(1).all()
    i = w.abs().argmax()
    assert float(out.reshape(-1)[i]) == pytest.approx(float(torch.sign(w.reshape(-1)[i])))
    u = dorefa_normalize(w)
    assert float(u.min()) >= 0 and float(u.max()) <= 1
    assert torch.isclose(u.reshape(-1)[i], torch.tensor(float(w.reshape(-1)[i] > 0)))


@FAST
@given(matrices(max_k=5), st.data())
def test_dorefa_per_kernel_equals_loop_and_zero_bit_prunes(w, data):
    c = w.shape[0]
    bits = torch.tensor(data.draw(st.lists(st.integers(0, 8), min_size=c, max_size=c)))
    wg = w.clone().requires_grad_(True)
    out = dorefa_weight(wg, bits)
    u = dorefa_normalize(w)
    for i in range(c):
        assert torch.equal(out[i], 2 * unit_quantize(u[i], int(bits[i])) - 1)
    assert out[bits == 0].eq(0).all()
    assert (out.abs() <= 1).all()
    out.sum().backward()
    assert torch.isfinite(wg.grad).all()


def test_dorefa_all_zero_weights_have_no_nan():
    out = dorefa_weight(torch.zeros(2, 3), torch.tensor([0, 3]))
    assert torch.isfinite(out).all() and out[0].eq(0).all()


def test_dorefa_fractional_lambda_blends_neighbouring_bit_widths():
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
    lam = torch.tensor([0.5, 2.25, 3.0])
    out = dorefa_weight(w, lam, max_bits=8)
    lo, hi = torch.tensor([0, 2, 3]), torch.tensor([1, 3, 4])
    f = torch.tensor([0.5, 0.25, 0.0])[:, None]
    assert torch.allclose(out, (1 - f) * dorefa_weight(w, lo) + f * dorefa_weight(w, hi), atol=1e-6)


pact_x = st.lists(st.floats(-6, 6, allow_nan=False, width=32), min_size=1, max_size=12)


@FAST
@given(pact_x, st.integers(1, 6), st.floats(0.5, 4.0), st.booleans())
def test_pact_one_sided_values_and_gradients(xs, bits, alpha0, negative):
    x = torch.tensor(xs)
    assume(not bool((x.abs() == alpha0).any()) and not bool((x == 0).any()))
    a0 = -alpha0 if negative else alpha0
    sign = -1.0 if negative else 1.0
    a = torch.tensor(a0, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    up = torch.linspace(0.5, 1.5, x.numel())
    out = pact(xg, a, bits)
    levels = 2**bits - 1
    a_abs = torch.tensor(alpha0)
    ref = a_abs * torch.round(torch.clamp(x, 0, alpha0) / a_abs * levels) / levels
    assert torch.allclose(out, ref, atol=1e-6)
    assert (out >= 0).all() and (out <= alpha0 + 1e-6).all()
    (out * up).sum().backward()
    inside = (x > 0) & (x < alpha0)
    assert torch.equal(xg.grad, torch.where(inside, up, torch.zeros_like(up)))
    assert float(a.grad) == pytest.approx(sign * float(up[x > alpha0].sum()), abs=1e-5)  # PACT
    # FracBits / LSQ-style alpha gradient: sign(a) (Q(u) - u) inside, sign(a) when clipped
    a2 = torch.tensor(a0, requires_grad=True)
    out2 = pact(x, a2, bits, alpha_grad="fracbits")
    assert torch.allclose(out2, out)
    (out2 * up).sum().backward()
    u = torch.clamp(x, 0, alpha0) / alpha0
    q = torch.round(u * levels) / levels
    d = torch.where(x > alpha0, torch.ones_like(x), torch.where(x > 0, q - u, torch.zeros_like(x)))
    assert float(a2.grad) == pytest.approx(sign * float((up * d).sum()), abs=1e-4)


@FAST
@given(pact_x, st.integers(1, 6), st.floats(0.5, 4.0))
def test_pact_double_sided_values_and_gradients(xs, bits, alpha0):
    x = torch.tensor(xs)
    assume(not bool((x.abs() == alpha0).any()))
    a = torch.tensor(alpha0, requires_grad=True)
    up = torch.linspace(0.5, 1.5, x.numel())
    out = pact(x, a, bits, double_sided=True)
    levels = 2**bits - 1
    u = (torch.clamp(x, -alpha0, alpha0) / alpha0 + 1) / 2
    q = torch.round(u * levels) / levels
    assert torch.allclose(out, alpha0 * (2 * q - 1), atol=1e-6)
    (out * up).sum().backward()
    assert float(a.grad) == pytest.approx(float(up[x > alpha0].sum() - up[x < -alpha0].sum()), abs=1e-5)
    a2 = torch.tensor(alpha0, requires_grad=True)
    (pact(x, a2, bits, double_sided=True, alpha_grad="fracbits") * up).sum().backward()
    d = torch.where(x > alpha0, 1.0, torch.where(x < -alpha0, -1.0, (2 * q - 1) - (2 * u - 1)))
    assert float(a2.grad) == pytest.approx(float((up * d).sum()), abs=1e-4)


def test_pact_clipped_alpha_gradient_matches_finite_difference():
    x = torch.tensor([5.0, 7.0, 0.3])
    a = torch.tensor(2.0, requires_grad=True)
    pact(x, a, 3, alpha_grad="fracbits").sum().backward()
    h = 1e-2
    with torch.no_grad():
        fd = (pact(x[:2], a + h, 3).sum() - pact(x[:2], a - h, 3).sum()) / (2 * h)
    # only the clipped entries are differentiable in the ordinary sense: d(a * Q(1))/da = 1 each
    assert float(fd) == pytest.approx(2.0, rel=1e-4)


def test_pact_fractional_lambda_gradient():
    x = torch.tensor([0.3, 1.1, 1.7, 3.0])
    a = torch.tensor(2.0)
    for mode in ("pact", "fracbits"):
        lam = torch.tensor(2.5, requires_grad=True)
        out = pact(x, a, lam, alpha_grad=mode)
        assert torch.allclose(out, (pact(x, a, 2) + pact(x, a, 3)) / 2)
        out.sum().backward()
        assert float(lam.grad) == pytest.approx(float((pact(x, a, 3) - pact(x, a, 2)).sum()), abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=0), "bits >= 1"), (dict(alpha=torch.tensor(0.0)), "alpha"),
    (dict(alpha_grad="qil"), "alpha_grad"), (dict(alpha=2.0), "tensor"),
    (dict(bits=torch.tensor(0.5)), "lambda"),
])
def test_pact_errors(kwargs, match):
    args = dict(alpha=torch.tensor(1.0), bits=4)
    args.update(kwargs)
    with pytest.raises(NumericsError, match=match):
        pact(torch.randn(3), **args)
