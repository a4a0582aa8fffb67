"""The oracle's fast exact paths equal its int64 definitions: the float64 requantization (blocked,
every rounding contract, ties), the zero-point-centring matmul and convolution, the blocked
depthwise convolution; and verify-int-sim's code statistics equal a plain int64 count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms import int_sim_reference as ref
from qpasses.algorithms import int_sim_reference_kernels as kern
from qpasses.algorithms import int_sim_compare as cmpmod
from qpasses.numerics import native_reference

from .conv_definition import conv_int64


def _requant(x, reals, rounding, bits, zp, lo, hi, float_path):
    try:
        if float_path:
            return ref.requant_ref(x, reals, rounding, bits, 1, zp, lo, hi)
        keep = ref.requant_fixed
        ref.requant_fixed = lambda *a, **k: None        # the int64 definition alone
        try:
            return ref.requant_ref(x, reals, rounding, bits, 1, zp, lo, hi)
        finally:
            ref.requant_fixed = keep
    except ValueError as e:                             # same refusal either way
        return str(e)


@pytest.mark.parametrize("native", [False, True])
@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.sampled_from(["gemmlowp", "single", "hawq"]), st.sampled_from([31, 15, 7]),
       st.integers(1, 30), st.sampled_from(["uniform", "dyadic", "above-one"]),
       st.integers(0, 10 ** 6), st.sampled_from([5, 64, 1 << 15]))
def test_float64_requant_equals_the_int64_definition(native, rounding, bits, log_hi, kind, seed,
                                                     block):
    """(native: the compiled int64 kernel first, numpy float64 where it declines)"""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kern, "BLOCK", block)
        mp.setattr(native_reference, "ENABLED", native)
        _check_requant(rounding, bits, log_hi, kind, seed)


def _check_requant(rounding, bits, log_hi, kind, seed):
    rng = np.random.default_rng(seed)
    c = 4
    x = rng.integers(-(2 ** log_hi), 2 ** log_hi, size=(3, c, 7), dtype=np.int64)
    reals = {"uniform": rng.uniform(1e-6, 1.0, size=c),
             "dyadic": 2.0 ** -rng.integers(0, 20, size=c).astype(float),
             "above-one": rng.uniform(0.5, 8.0, size=c)}[kind]
    x[0, :, 0], x[0, :, 1] = 3 * 2 ** 4, -3 * 2 ** 4            # ties for dyadic multipliers
    for lo, hi in ((-128, 127), (-2 ** 40, 2 ** 40)):
        want = _requant(x, reals, rounding, bits, 3, lo, hi, False)
        for xin in (x, x.astype(np.float64)):
            got = _requant(xin, reals, rounding, bits, 3, lo, hi, True)
            if isinstance(want, str):
                assert got == want
            else:
                assert np.array_equal(got, want)
                assert got.dtype in ((np.int8, np.int64) if hi == 127 else (np.int64,))


def test_float64_requant_is_used_under_its_bound_and_refused_beyond_it():
    m, e = kern.quantize_multipliers_exact(np.array([0.3]), 31)
    x = np.array([2 ** 21, -(2 ** 21)], dtype=np.int64)
    assert kern.requant_f64(x, m, e, "gemmlowp", 31, 2 ** 21) is not None
    assert kern.requant_f64(x, m, e, "gemmlowp", 31, 2 ** 23) is None   # x·m31 may reach 2^53
    up = np.array([1])          # a left shift: float64 too while x·2^e stays in int32
    assert kern.requant_f64(x, m, up, "gemmlowp", 31, 2 ** 21).tolist() == [2516582, -2516582]
    assert kern.requant_f64(x, m, np.array([11]), "gemmlowp", 31, 2 ** 21) is None  # int64's


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.integers(1, 40), st.sampled_from([127, 2 ** 20, 2 ** 26]), st.integers(-5, 5),
       st.integers(-3, 3), st.integers(0, 10 ** 6))
def test_matmul_with_zero_points_equals_python_integers(k, hi, za, zb, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(-hi, hi, size=(2, 3, k)).astype(np.int8 if hi == 127 else np.int64)
    b = rng.integers(-hi, hi, size=(k, 4), dtype=np.int64)
    want = [[[sum((int(a[n, i, t]) - za) * (int(b[t, j]) - zb) for t in range(k))
              for j in range(4)] for i in range(3)] for n in range(2)]
    assert kern.exact_matmul(a, b, zero_points=(za, zb)).tolist() == want
    out = kern.exact_matmul(a, b, keep_float=True, zero_points=(za, zb))  # float or int64
    assert np.array_equal(out.astype(np.int64), np.array(want))


@settings(deadline=None, max_examples=30, derandomize=True)
@given(st.sampled_from([(1, 4, 4), (4, 4, 4), (6, 6, 6), (2, 4, 4)]), st.integers(1, 3),
       st.integers(1, 2), st.integers(1, 2), st.sampled_from([127, 2 ** 12, 2 ** 24]),
       st.integers(-4, 4), st.sampled_from([3, 40, 1 << 15]), st.integers(0, 10 ** 6))
def test_conv_centring_and_depthwise_blocks_equal_int64_loops(gco, k, s, d, hi, zp, block, seed):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kern, "BLOCK", block)
        _check_conv(gco, k, s, d, hi, zp, seed)


def _check_conv(gco, k, s, d, hi, zp, seed):
    groups, c, o = gco
    rng = np.random.default_rng(seed)
    # hi picks the path: accumulator bound below 2^24 (float32), 2^53 (float64), else int64
    x = rng.integers(-hi, hi, size=(2, c, 8, 7), dtype=np.int64)
    wz = rng.integers(-hi, hi, size=(o, c // groups, k, k), dtype=np.int64)
    out = [(8 - d * (k - 1) - 1) // s + 1, (7 - d * (k - 1) - 1) // s + 1]
    want = conv_int64(x - zp, wz, (s, s), (d, d), out, groups)
    got = kern.conv_exact(x, wz, (s, s), (d, d), out, groups, x_zp=zp)
    assert got.dtype == np.int64 and np.array_equal(got, want)
    fl = kern.conv_exact(x, wz, (s, s), (d, d), out, groups, keep_float=True, x_zp=zp)
    assert np.array_equal(fl.astype(np.int64), want)


def _naive_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[tuple[int, int], int]:
    d = (a.to(torch.int64) - b.to(torch.int64)).abs()
    return (int((d == 1).sum()), int((d > 1).sum())), int(d.max()) if d.numel() else 0


@settings(deadline=None, max_examples=40, derandomize=True)
@given(st.sampled_from([torch.int8, torch.int16, torch.int32]), st.floats(0.0, 1.0),
       st.integers(0, 10 ** 6), st.booleans())
def test_code_statistics_equal_an_int64_count(dtype, frac, seed, channels_last):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-128, 127) if dtype == torch.int8 else (-3000, 3000)
    a = torch.randint(lo, hi + 1, (2, 3, 5, 4), generator=gen, dtype=torch.int64)
    change = torch.rand(a.shape, generator=gen) < frac
    b = (a + torch.randint(-3, 4, a.shape, generator=gen) * change).clamp(lo, hi)
    a, b = a.to(dtype), b.to(dtype)
    if channels_last:
        a, b = (t.contiguous(memory_format=torch.channels_last) for t in (a, b))
    assert cmpmod.code_diff(a, b) == _naive_diff(a, b)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_fake_quant_codes_are_recovered_exactly(bits):
    gen = torch.Generator().manual_seed(bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for scale in (1e-4, 0.0123, 3.7):
        zp = 3 if bits < 16 else 0
        q = torch.randint(qmin, qmax + 1, (2, 3, 9), generator=gen)
        q[0, 0, :2] = torch.tensor([qmin, qmax])
        fv = ((q - zp).to(torch.float32) * torch.tensor(scale, dtype=torch.float32))
        like = q.to(torch.int16 if bits == 16 else torch.int8)
        codes = cmpmod.fake_quant_codes(fv, float(torch.tensor(scale, dtype=torch.float32)), zp, like)
        assert codes.dtype == like.dtype and torch.equal(codes.to(torch.int64), q)


@pytest.mark.parametrize("bits,rounding", [("weight-bits=4 act-bits=8", "gemmlowp"),
                                           ("weight-bits=8 act-bits=8", "single"),
                                           ("weight-bits=4 act-bits=4", "hawq")])
def test_fused_layer_requantization_equals_the_unfused_oracle(bits, rounding):
    """layer_forward (shift and bias inside the blocked float64 requantization) equals the
    accumulator + bias + requant_ref path, output and max |A·2^shift + b|, layer for layer."""
    from torch import nn

    from qpasses.algorithms.int_sim_reference import layer_acc_max, layer_forward
    from qpasses.modules.int_sim_layers import IntLayer
    from qpasses.passes.verify_int_sim import record_run
    from tests.passes.int_sim_helpers import calibrated, lower, randomize

    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                                    nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16 * 36, 10)))
    gm, x, cal = calibrated(model, (2, 3, 6, 6), bits=bits)
    _, low = lower(gm, x, cal, f"rounding={rounding}")
    values = record_run(low, (x,))
    mods = dict(low.named_modules())
    seen = 0
    for n in low.graph.nodes:
        m = mods.get(str(n.target)) if n.op == "call_module" else None
        if not isinstance(m, IntLayer):
            continue
        xin = values[n.args[0].name].numpy()
        got, amax = layer_forward(m, xin)
        acc, biased, want_amax = layer_acc_max(m, xin)
        want = ref._layer_out(m, acc, biased)
        assert amax == want_amax and np.array_equal(got, want), n.name
        assert np.array_equal(got, values[n.name].numpy()), n.name    # and the graph itself
        seen += 1
    assert seen == 4


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_word_comparison_finds_every_single_difference(dtype):
    a = np.arange(48, dtype=dtype).reshape(2, 3, 8) % 100
    assert cmpmod.int_equal(a, a.copy())
    for i in range(a.size):
        b = a.copy()
        b.reshape(-1)[i] += 1
        assert not cmpmod.int_equal(a, b)
    assert cmpmod.int_equal(a, a.astype(np.int64)) and not cmpmod.int_equal(a[:, :, ::2], a[:, :, 1::2])
