"""The oracle's compiled LayerNorm / L2 normalization (``native_norm_reference``) equals the
contract in Python integers row for row and the oracle's numpy path code for code: both forms,
every rounding, ties of the output rounding, constant rows, zero points, wide gains and biases,
every input and output dtype, strided codes; beyond the contract's ranges it declines and the
numpy path raises as before."""
from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms.int_sim_reference_transformer import layer_norm_ref
from qpasses.numerics import native_norm_reference as nn
from qpasses.numerics import native_reference as nr

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None,
                                reason="no C compiler")
_MODES = {"gemmlowp": "rha", "single": "rhu", "hawq": "rne"}
_OUT = {np.int8: (-128, 127), np.int16: (-2 ** 15, 2 ** 15 - 1),
        np.int32: (-2 ** 31, 2 ** 31 - 1)}


def test_the_kernel_builds_and_passes_its_self_test():
    assert nn._library() is not None


def _mod(n, zin, k, eps, gain, bias, rbits, rounding, zp, lo, hi):
    """What layer_norm_ref reads of an IntLayerNorm."""
    return SimpleNamespace(n=n, n_dims=1, in_zero_point=zin, frac_bits=k, eps_codes=eps,
                           gain=torch.from_numpy(gain), bias=torch.from_numpy(bias),
                           out_frac_bits=rbits, rounding=rounding, out_zero_point=zp, qmin=lo,
                           qmax=hi)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(st.sampled_from(list(_MODES)), st.sampled_from([np.uint8, np.int8, np.int16, np.int32,
                                                       np.int64]),
       st.sampled_from(list(_OUT)), st.sampled_from([1, 2, 7, 64]), st.integers(0, 16),
       st.integers(0, 2 ** 20), st.integers(0, 40), st.booleans(), st.booleans(),
       st.integers(0, 10 ** 6))
def test_kernel_equals_the_contract(rounding, in_dt, out_dt, n, k, eps, rbits, center, strided,
                                    seed):
    rng = np.random.default_rng(seed)
    # |c| = |x·2^k − mu| < 2^27 and T < 2^59: inside the contract's ranges (the edges: below)
    span = min(2 ** 15 if np.dtype(in_dt).itemsize >= 2 else 128, 2 ** (25 - k))
    lo_in = 0 if np.dtype(in_dt).kind == "u" else -span
    q = rng.integers(lo_in, span, (3, 5, n)).astype(in_dt)
    q[0, 0] = q[0, 0, 0]                                 # a constant row
    if strided:
        q = np.ascontiguousarray(np.swapaxes(q, 0, 1)).swapaxes(0, 1)
    zin = int(rng.integers(-20, 20))
    gain = rng.integers(-2 ** 24, 2 ** 24, n)
    bias = rng.integers(-2 ** 40, 2 ** 40, n)
    lo, hi = _OUT[out_dt]
    zp = int(rng.integers(-9, 9))
    got = nn.layer_norm_codes(q, n, zin, k, eps, center, gain, bias, rbits, _MODES[rounding], zp,
                              lo, hi, out_dt)
    if q.itemsize > 2 and strided:
        assert got is None                               # wide strided codes: numpy's
        return
    assert got is not None and got.dtype == out_dt and got.shape == q.shape
    for idx in np.ndindex(q.shape[:-1]):
        want = nn.layer_norm_python([int(v) for v in q[idx]], zin, k, eps, center,
                                    gain.tolist(), bias.tolist(), rbits, _MODES[rounding], zp,
                                    lo, hi)
        assert got[idx].tolist() == want
    if center:                                          # the oracle's function, numpy path
        mod = _mod(n, zin, k, eps, gain, bias, rbits, rounding, zp, lo, hi)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(nr, "ENABLED", False)
            numpy_codes = layer_norm_ref(q, mod)
        assert numpy_codes.dtype == got.dtype and np.array_equal(numpy_codes, got)
        assert np.array_equal(layer_norm_ref(q, mod), got)


def test_output_rounding_ties():
    """R = 1 with unit gain: every odd accumulator is a tie (gemmlowp away from zero, single up,
    hawq to even)."""
    n = 8
    q = np.array([[-4, -3, -2, -1, 1, 2, 3, 4]], dtype=np.int8)
    gain, bias = np.ones(n, dtype=np.int64), np.arange(n, dtype=np.int64) - 4
    for mode in ("rha", "rhu", "rne"):
        got = nn.layer_norm_codes(q, n, 0, 0, 0, True, gain, bias, 1, mode, 0, -2 ** 15,
                                  2 ** 15 - 1, np.int16)
        want = nn.layer_norm_python(q[0].tolist(), 0, 0, 0, True, gain.tolist(), bias.tolist(),
                                    1, mode, 0, -2 ** 15, 2 ** 15 - 1)
        assert got[0].tolist() == want


def test_beyond_the_contracts_ranges_it_declines_and_numpy_raises():
    n = 4
    gain, bias = np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    q = np.array([[0, 0, 0, 2 ** 15 - 1]], dtype=np.int16)    # |c| = (2^15 − 1)·3·2^15 >= 2^31
    assert nn.layer_norm_codes(q, n, 0, 17, 0, True, gain, bias, 0, "rha", 0, -128, 127,
                               np.int8) is None
    mod = _mod(n, 0, 17, 0, gain, bias, 0, "gemmlowp", 0, -128, 127)
    with pytest.raises(ValueError, match="2\\^31"):
        layer_norm_ref(q, mod)
    # a gain whose product could leave int64
    big = np.full(n, 2 ** 61, dtype=np.int64)
    q8 = np.array([[1, -5, 7, 3]], dtype=np.int8)
    assert nn.layer_norm_codes(q8, n, 0, 8, 0, True, big, bias, 0, "rha", 0, -128, 127,
                               np.int8) is None
    # parameters the kernel does not take
    assert nn.layer_norm_codes(q8, n, 0, 8, 0, True, gain, bias, 0, "rha", 0, -128, 127,
                               np.int64) is None
    assert nn.layer_norm_codes(q8.astype(np.float32), n, 0, 8, 0, True, gain, bias, 0, "rha", 0,
                               -128, 127, np.int8) is None


def test_without_the_library_the_oracle_gives_the_same_codes(monkeypatch):
    rng = np.random.default_rng(3)
    n = 32
    q = rng.integers(-128, 128, (4, 6, n)).astype(np.int8)
    gain, bias = rng.integers(-2 ** 30, 2 ** 30, n), rng.integers(-2 ** 50, 2 ** 50, n)
    mod = _mod(n, 3, 16, 1159233, gain, bias, 50, "gemmlowp", -2, -128, 127)
    with_lib = layer_norm_ref(q, mod)
    monkeypatch.setattr(nn, "_library", lambda: None)
    without = layer_norm_ref(q, mod)
    assert with_lib.dtype == without.dtype and np.array_equal(with_lib, without)


def test_the_sum_of_squares_edge():
    """Rows ±x·2^k: T = 2·(x·2^k)²; just below 2^62 computed (int64 square sums past the
    int64-safe shortcut, 128-bit), beyond it declined while numpy raises."""
    n = 2
    gain, bias = np.array([3, -5], dtype=np.int64), np.array([7, 11], dtype=np.int64)
    x = 2 ** 15 - 1
    q = np.array([[x, -x]], dtype=np.int16)
    near = nn.layer_norm_codes(q, n, 0, 15, 0, True, gain, bias, 4, "rne", 0, -2 ** 15,
                               2 ** 15 - 1, np.int16)                # T = 2·(x·2^15)² ~ 2^61
    assert near is not None and near[0].tolist() == nn.layer_norm_python(
        q[0].tolist(), 0, 15, 0, True, gain.tolist(), bias.tolist(), 4, "rne", 0, -2 ** 15,
        2 ** 15 - 1)
    assert nn.layer_norm_codes(q, n, 0, 16, 0, True, gain, bias, 4, "rne", 0, -2 ** 15,
                               2 ** 15 - 1, np.int16) is None        # T ~ 2^63
    with pytest.raises(ValueError, match="2\\^62"):
        layer_norm_ref(q, _mod(n, 0, 16, 0, gain, bias, 4, "hawq", 0, -2 ** 15, 2 ** 15 - 1))
