"""Observers in qpasses.numerics.observers: statistics, clipping choices, edge cases, state_dict."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qpasses.errors import CalibrationError, NumericsError
from qpasses.numerics import (OBSERVERS, ACIQObserver, AvgMinMaxObserver, KLObserver,
                              MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver,
                              PercentileObserver, aciq_clip, calc_qparams, make_observer,
                              quantize_dequantize)

FAST = settings(max_examples=25, deadline=None)
# Small histograms keep the KL / MSE searches fast in tests.
SMALL = {"kl": dict(bins=64), "mse": dict(bins=256, grid=40)}


def _make(name: str, axis: int | None = None) -> torch.nn.Module:
    return make_observer(name, axis=axis, **SMALL.get(name, {}))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mse(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, scheme: str,
         axis: int = 0) -> float:
    return float(((quantize_dequantize(x, scale, zp, bits, scheme, axis=axis) - x) ** 2).mean())


batches = hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5)),
                     elements=st.floats(-20, 20, allow_nan=False, width=32))


# ---------------------------------------------------------------------------------------------------
# behaviour shared by every observer
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("value", [0.0, 2.5, -1.0])
@pytest.mark.parametrize("axis", [None, 1])
def test_zero_range_and_all_zero_give_finite_positive_scales(name, value, axis):
    obs = _make(name, axis)
    x = torch.full((4, 3, 2), value)
    obs(x)
    obs(x)
    for scheme in ("symmetric", "asymmetric", "unsigned"):
        for bits in (8, torch.tensor([0, 2, 8]) if axis is not None else 3):
            scale, zp = obs.qparams(bits, scheme)
            assert torch.isfinite(scale).all() and (scale > 0).all(), (scheme, bits)
            fq = quantize_dequantize(x, scale, zp, bits, scheme, axis=axis if axis is not None else 0)
            assert torch.isfinite(fq).all()
            if value == 0.0:
                assert fq.eq(0).all()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_state_dict_round_trip_per_channel(name):
    x = torch.randn(16, 3, 5, generator=_gen(0))
    obs = _make(name, axis=1)
    obs(x)
    obs(x * 1.5 + 0.2)
    fresh = _make(name, axis=1)
    fresh.load_state_dict(obs.state_dict())
    for scheme in ("symmetric", "asymmetric"):
        a, b = obs.qparams(4, scheme), fresh.qparams(4, scheme)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (3,)
    # the loaded observer keeps accumulating like the original
    obs(x * 3)
    fresh(x * 3)
    assert torch.equal(obs.qparams(6)[0], fresh.qparams(6)[0])


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_reset_forgets_everything(name):
    obs = _make(name, axis=1)
    obs(torch.randn(4, 5, 3, generator=_gen(11)) * 100)
    obs.reset()
    with pytest.raises(CalibrationError):
        obs.qparams(8)
    x = torch.randn(4, 2, 3, generator=_gen(12))  # a different channel count is fine after reset
    obs(x)
    fresh = _make(name, axis=1)
    fresh(x)
    assert torch.equal(obs.qparams(8, "asymmetric")[0], fresh.qparams(8, "asymmetric")[0])


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_unobserved_raises_calibration_error(name):
    with pytest.raises(CalibrationError, match="never observed"):
        _make(name).qparams(8)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_channel_count_change_and_empty_input_raise(name):
    obs = _make(name, axis=1)
    obs(torch.randn(2, 3, 4))
    with pytest.raises(NumericsError, match="channels"):
        obs(torch.randn(2, 5, 4))
    with pytest.raises(NumericsError, match="empty"):
        obs(torch.empty(0, 3))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_per_channel_equals_per_channel_loop(name):
    # channels with very different spreads, so a shared computation would show
    x = torch.randn(64, 3, 8, generator=_gen(1)) * torch.tensor([0.1, 1.0, 7.0])[None, :, None]
    x[0, 2, 0] = 60.0
    vec = _make(name, axis=1)
    vec(x)
    vec(x[:32] * 0.5)
    lo, hi = vec.clip_range(4, "asymmetric")
    for c in range(3):
        one = _make(name)
        one(x[:, c])
        one(x[:32, c] * 0.5)
        lo_c, hi_c = one.clip_range(4, "asymmetric")
        assert float(lo[c]) == pytest.approx(float(lo_c), rel=1e-5, abs=1e-6)
        assert float(hi[c]) == pytest.approx(float(hi_c), rel=1e-5, abs=1e-6)


def test_forward_returns_input_unchanged_and_make_observer_errors():
    obs = MinMaxObserver()
    x = torch.randn(3)
    assert obs(x) is x
    with pytest.raises(NumericsError, match="unknown observer"):
        make_observer("histogram")
    with pytest.raises(NumericsError, match="bad options"):
        make_observer("minmax", momentum=0.5)


def test_per_tensor_observer_with_per_kernel_bits():
    obs = ACIQObserver()
    obs(torch.tensor([-1.0, 1.0] * 8))
    scale, zp = obs.qparams(torch.tensor([2, 4, 8]), "symmetric")
    assert scale.shape == (3,)
    assert scale.tolist() == pytest.approx([2.83 / 1.5, 5.03 / 7.5, 9.89 / 127.5], rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# min / max family
# ---------------------------------------------------------------------------------------------------

@FAST
@given(st.lists(batches, min_size=1, max_size=3).filter(lambda bs: len({b.shape[1:] for b in bs}) == 1))
def test_minmax_is_the_global_min_max(arrs):
    xs = [torch.from_numpy(a) for a in arrs]
    per_tensor, per_channel = MinMaxObserver(), MinMaxObserver(axis=1)
    for x in xs:
        per_tensor(x)
        per_channel(x)
    allx = torch.cat(xs)
    lo, hi = per_tensor.clip_range()
    assert float(lo) == float(allx.min()) and float(hi) == float(allx.max())
    lo_c, hi_c = per_channel.clip_range()
    assert torch.equal(lo_c, allx.amin(dim=(0, 2))) and torch.equal(hi_c, allx.amax(dim=(0, 2)))
    s, z = per_channel.qparams(8, "asymmetric")
    s_ref, z_ref = calc_qparams(lo_c, hi_c, 8, "asymmetric")
    assert torch.equal(s, s_ref) and torch.equal(z, z_ref)


def test_moving_average_update_rule():
    obs = MovingAverageMinMaxObserver(momentum=0.25)
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([-5.0, 4.0]))
    lo, hi = obs.clip_range()
    assert float(lo) == pytest.approx(-1 + 0.25 * (-5 + 1))
    assert float(hi) == pytest.approx(2 + 0.25 * (4 - 2))
    with pytest.raises(NumericsError, match="momentum"):
        MovingAverageMinMaxObserver(momentum=0.0)


def test_avg_min_max_averages_per_sample_extremes():
    obs = AvgMinMaxObserver()
    obs(torch.tensor([[-1.0, 3.0], [-3.0, 1.0]]))    # per-sample (min, max): (-1, 3), (-3, 1)
    obs(torch.tensor([[0.0, 8.0]]))                  # (0, 8)
    lo, hi = obs.clip_range()
    assert float(lo) == pytest.approx(-4 / 3) and float(hi) == pytest.approx(4.0)
    per_channel = AvgMinMaxObserver(axis=1)
    per_channel(torch.tensor([[[-1.0, 1.0], [0.0, 5.0]], [[-3.0, 2.0], [1.0, 2.0]]]))
    lo_c, hi_c = per_channel.clip_range()
    assert lo_c.tolist() == pytest.approx([-2.0, 0.5]) and hi_c.tolist() == pytest.approx([1.5, 3.5])
    with pytest.raises(NumericsError, match="batch_axis"):
        AvgMinMaxObserver(axis=0)


# ---------------------------------------------------------------------------------------------------
# percentile
# ---------------------------------------------------------------------------------------------------

def test_percentile_matches_torch_quantile_and_100_is_min_max():
    x = torch.randn(5, 400, generator=_gen(2))
    obs = PercentileObserver(axis=0, percentile=99.0)
    obs(x)
    lo, hi = obs.clip_range()
    assert torch.allclose(hi, torch.quantile(x, 0.99, dim=1), atol=1e-6)
    assert torch.allclose(lo, torch.quantile(x, 0.01, dim=1), atol=1e-6)
    full = PercentileObserver(axis=0, percentile=100.0)
    full(x)
    lo, hi = full.clip_range()
    assert torch.equal(lo, x.amin(1)) and torch.equal(hi, x.amax(1))


def test_percentile_ignores_outliers_and_averages_batches():
    x = torch.randn(10000, generator=_gen(3))
    x[0] = 1000.0
    obs = PercentileObserver(percentile=99.9)
    obs(x)
    assert float(obs.clip_range()[1]) < 5.0
    obs(x * 3)
    assert float(obs.clip_range()[1]) == pytest.approx(2 * float(torch.quantile(x, 0.999)), rel=1e-5)
    with pytest.raises(NumericsError, match="percentile"):
        PercentileObserver(percentile=40)


# ---------------------------------------------------------------------------------------------------
# ACIQ
# ---------------------------------------------------------------------------------------------------

def test_aciq_table_values_from_the_spec():
    assert float(aciq_clip(4, "laplace", 1.0)) == pytest.approx(5.03)      # ACIQ table, 4 bits
    assert float(aciq_clip(8, "gauss", 2.0)) == pytest.approx(7.84)
    assert float(aciq_clip(4, "laplace", 1.0, half_range=True)) == pytest.approx(6.2)
    assert float(aciq_clip(2, "gauss", 1.0, mean=-0.5)) == pytest.approx(2.21)
    assert aciq_clip(torch.tensor([0, 8]), "laplace", 1.0).tolist() == pytest.approx([1.05, 9.89])
    with pytest.raises(NumericsError, match="bits"):
        aciq_clip(0, "gauss", 1.0)
    with pytest.raises(NumericsError, match="bits"):
        aciq_clip(9, "laplace", 1.0)
    with pytest.raises(NumericsError, match="distribution"):
        aciq_clip(4, "cauchy", 1.0)


def test_aciq_observer_laplace_four_bits_clip():
    # +-1 data: mean 0, mean |x - mean| = 1 (Laplace b), std 1
    x = torch.tensor([-1.0, 1.0] * 50)
    obs = ACIQObserver(dist="laplace")
    obs(x[:40])
    obs(x[40:])
    assert float(obs.laplace_b) == pytest.approx(1.0) and float(obs.mean) == pytest.approx(0.0)
    lo, hi = obs.clip_range(4, "symmetric")
    assert float(hi) == pytest.approx(5.03) and float(lo) == pytest.approx(-5.03)
    scale, zp = obs.qparams(4, "symmetric")
    assert float(scale) == pytest.approx(5.03 / 7.5) and int(zp) == 0
    lo, hi = obs.clip_range(4, "asymmetric")   # lo = max(min, mean - alpha), hi = lo + 2 alpha
    assert float(lo) == pytest.approx(-1.0) and float(hi) == pytest.approx(-1.0 + 2 * 5.03)
    gauss = ACIQObserver(dist="gauss")
    gauss(x)
    assert float(gauss.std) == pytest.approx(1.0)
    assert float(gauss.clip_range(4)[1]) == pytest.approx(2.55)
    half = ACIQObserver(dist="laplace", half_range=True)
    half(x)
    lo, hi = half.clip_range(4, "unsigned")
    assert float(hi - lo) == pytest.approx(6.2)


def test_aciq_laplace_scale_is_measured_around_the_mean():
    x = torch.tensor([2.0, 4.0] * 20)   # mean 3, mean |x - 3| = 1
    obs = ACIQObserver(dist="laplace")
    obs(x)
    assert float(obs.laplace_b) == pytest.approx(1.0)
    assert float(obs.clip_range(4, "symmetric")[1]) == pytest.approx(3.0 + 5.03)


def test_aciq_statistics_are_exact_across_batches_and_per_channel():
    x = torch.randn(3, 1000, generator=_gen(4)) * torch.tensor([[0.5], [1.0], [3.0]]) + 1.0
    obs = ACIQObserver(axis=0, dist="gauss")
    obs(x[:, :500])
    obs(x[:, 500:])
    assert torch.allclose(obs.mean, x.double().mean(1).float().double(), atol=1e-6)
    assert torch.allclose(obs.std, x.double().std(1, unbiased=False), atol=1e-5)
    lo, hi = obs.clip_range(8, "symmetric")
    assert torch.allclose(hi, (x.mean(1).abs() + 3.92 * x.std(1, unbiased=False)), rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# MSE and KL
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_mse_clipping_beats_min_max_on_heavy_tailed_data(scheme):
    gen = _gen(5)
    u = torch.rand(4, 4000, generator=gen)
    x = torch.sign(u - 0.5) * (-torch.log1p(-2 * (u - 0.5).abs()))   # Laplace(0, 1)
    x = x * torch.tensor([[1.0], [0.2], [3.0], [0.05]])
    x[:, 0] *= 25  # one far outlier per channel
    mse_obs, minmax_obs = MSEObserver(axis=0, bins=512, grid=50), MinMaxObserver(axis=0)
    mse_obs(x)
    minmax_obs(x)
    for bits in (3, 4):
        s_mse, z_mse = mse_obs.qparams(bits, scheme)
        s_mm, z_mm = minmax_obs.qparams(bits, scheme)
        assert (s_mse < s_mm).all()
        assert _mse(x, s_mse, z_mse, bits, scheme) < 0.5 * _mse(x, s_mm, z_mm, bits, scheme)


def test_mse_prefers_the_full_range_on_uniform_data():
    x = torch.linspace(-1, 1, 2001)
    obs = MSEObserver(bins=1024, grid=50)
    obs(x)
    lo, hi = obs.clip_range(8, "symmetric")
    assert float(hi) >= 0.96


def test_histogram_rebinning_keeps_every_count_where_it_belongs():
    obs = MSEObserver(bins=64)
    obs(torch.linspace(-1, 1, 100))
    obs(torch.tensor([-10.0, 10.0]))   # widens the range tenfold: old counts move to the middle bins
    obs(torch.randn(50, generator=_gen(8)) * 0.1)
    assert float(obs.hist.sum()) == pytest.approx(152.0)
    assert float(obs.hist_lo) <= float(obs.min_val) and float(obs.hist_hi) >= float(obs.max_val)
    centers = obs.bin_centers()[0]
    width = float(obs.hist_hi - obs.hist_lo) / obs.bins
    assert float(obs.hist[0, centers.abs() <= 1 + width].sum()) == pytest.approx(150.0)


def test_kl_threshold_on_gaussian_data_clips_the_tail():
    x = torch.randn(20000, generator=_gen(9))
    obs = KLObserver(bins=256)
    obs(x)
    amax = float(x.abs().max())
    t8 = float(obs.clip_range(8)[1])
    t4 = float(obs.clip_range(4)[1])
    assert 2.5 < t8 < amax
    assert 1.0 < t4 < t8  # fewer levels -> more clipping
    s, z = obs.qparams(8)
    assert float(s) == pytest.approx(t8 / 127.5)
    lo, hi = obs.clip_range(8, "asymmetric")
    assert float(lo) >= float(x.min()) and float(hi) <= float(x.max())


def test_kl_keeps_the_full_range_on_uniform_data():
    x = torch.linspace(-1, 1, 4001)
    obs = KLObserver(bins=256)
    obs(x)
    assert float(obs.clip_range(8)[1]) >= 0.95


def test_kl_and_mse_per_kernel_bits_match_scalar_bits():
    x = torch.randn(3, 500, generator=_gen(10)) * torch.tensor([[1.0], [2.0], [0.5]])
    bits = torch.tensor([3, 8, 0])
    for obs in (KLObserver(axis=0, bins=128), MSEObserver(axis=0, bins=256, grid=40)):
        obs(x)
        lo, hi = obs.clip_range(bits, "symmetric")
        for c in (0, 1):
            lo_c, hi_c = obs.clip_range(int(bits[c]), "symmetric")
            assert float(hi[c]) == pytest.approx(float(hi_c[c]), rel=1e-6)
        s, z = obs.qparams(bits, "symmetric")
        assert float(s[2]) == 1.0  # 0-bit channel
