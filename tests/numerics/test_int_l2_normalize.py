"""The integer L2 normalization (``F.normalize``, :class:`IntL2Normalize`: IntLayerNorm's
arithmetic with ``center=False``): fast == reference == the numpy oracle bit for bit under every
rounding contract, dim and zero point, and within one output LSB of the float ``F.normalize``
followed by the same fake quantizer (docs/int-sim.md, "Transformer kernels")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.algorithms.int_sim_reference_transformer import TRANSFORMER_IMPLS, normalized_ref
from qpasses.errors import NumericsError
from qpasses.modules.int_sim_transformer import IntL2Normalize
from qpasses.numerics.int_norm import (layer_norm_constants, normalized_fast,
                                       normalized_reference)

CONTRACTS = ["gemmlowp", "single", "hawq", "float-rne"]
SETTINGS = settings(deadline=None, max_examples=30, derandomize=True)


def _module(case):
    qmin, qmax, zp = case["grid"]
    n = case["shape"][case["dim"]]
    half = 2 ** (case["out_bits"] - 1)
    sy = 1.0 / (half - 1)
    consts = layer_norm_constants(n, qmax - qmin, max(qmax - zp, zp - qmin), case["scale"],
                                  case["eps"], None, None, sy, center=False)
    return IntL2Normalize(case["dim"], consts, in_scale=case["scale"], in_zero_point=zp,
                          out_scale=sy, out_zero_point=case["out_zp"], qmin=-half,
                          qmax=half - 1, rounding=case["rounding"], eps=case["eps"])


def _float_fq(q, case, mod):
    x = (q - case["grid"][2]).double() * case["scale"]
    y = F.normalize(x, p=2.0, dim=case["dim"], eps=case["eps"])
    inv = 1.0 / torch.tensor(mod.out_scale, dtype=torch.float32)
    return (torch.round(y.float() * inv).to(torch.int64) + mod.out_zero_point).clamp(mod.qmin,
                                                                                     mod.qmax)


def _run_all(mod, q):
    outs = []
    for backend in ("fast", "reference"):
        mod.set_backend(backend)
        outs.append(mod(q).to(torch.int64).numpy())
    outs.append(np.asarray(TRANSFORMER_IMPLS[type(mod)](mod, q.numpy()), dtype=np.int64))
    return outs


@st.composite
def cases(draw):
    shape = draw(st.sampled_from([(7,), (3, 5), (2, 3, 32), (2, 4, 3, 16), (4, 1)]))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    bits = draw(st.sampled_from([4, 8, 12, 16]))
    zp = draw(st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    scale = float(np.exp(draw(st.floats(-8, 0))))
    return dict(shape=shape, dim=dim, grid=(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, zp),
                scale=scale, eps=draw(st.sampled_from([1e-12, 0.0, scale, 20 * scale])),
                out_bits=draw(st.sampled_from([4, 8, 12])), out_zp=draw(st.sampled_from([0, 2])),
                zero_rows=draw(st.booleans()), rounding=draw(st.sampled_from(CONTRACTS)),
                seed=draw(st.integers(0, 2 ** 16)))


@SETTINGS
@given(cases())
def test_l2_normalize_fast_equals_reference_and_oracle_within_one_lsb_of_float(case):
    g = torch.Generator().manual_seed(case["seed"])
    qmin, qmax, zp = case["grid"]
    q = torch.randint(qmin, qmax + 1, case["shape"], generator=g)
    if case["zero_rows"]:                           # rows at the zero point (and near it)
        keep = torch.rand(case["shape"], generator=g) < 0.3
        q = torch.where(keep, q.clamp(zp - 1, zp + 1), torch.full_like(q, zp))
    mod = _module(case)
    fast, ref, oracle = _run_all(mod, q)
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(ref, oracle)
    # the normalized values themselves, before the output rounding
    x = q.movedim(case["dim"], -1) - zp
    c = mod.constants()
    n_ref = normalized_reference(x, c).numpy()
    np.testing.assert_array_equal(normalized_fast(x, c).numpy(), n_ref)
    np.testing.assert_array_equal(normalized_ref(x.numpy(), c.n, c.frac_bits, c.eps_codes,
                                                 center=False), n_ref)
    assert np.abs(_float_fq(q, case, mod).numpy() - ref).max(initial=0) <= 1


def test_l2_normalize_error_vs_float_is_measured():
    """The documented figure: 8-bit inputs (zero point 3), rows of 32 (a Swin V2 head), 2000
    rows, 8-bit output grid of [−1, 1], per contract vs float64 F.normalize + fake quantizer."""
    g = torch.Generator().manual_seed(1)
    for rounding in CONTRACTS:
        case = dict(shape=(2000, 32), dim=-1, grid=(-128, 127, 3), scale=0.05, eps=1e-12,
                    out_bits=8, out_zp=0, rounding=rounding)
        q = torch.randint(-128, 128, case["shape"], generator=g)
        mod = _module(case)
        diff = (_float_fq(q, case, mod) - mod(q).to(torch.int64)).abs()
        assert int(diff.max()) <= 1, rounding
        assert float((diff != 0).float().mean()) < 1e-3, rounding


def test_l2_normalize_bounds_and_typed_errors():
    # 16-bit codes over a 4096-wide dim still fit int64: k shrinks so that N·X²·4^k < 2^62
    c = layer_norm_constants(4096, 2 ** 16 - 1, 2 ** 16, 1e-3, 1e-12, None, None, 1 / 127,
                             center=False)
    assert 4096 * (2 ** 16 << c.frac_bits) ** 2 < 2 ** 62 and not c.center
    x = torch.full((2, 4096), 2 ** 16, dtype=torch.int64)
    assert int(normalized_reference(x, c).max()) <= 2 ** 30 + 1
    with pytest.raises(NumericsError, match="affine"):
        layer_norm_constants(4, 255, 128, 0.1, 1e-12, torch.ones(4), None, 0.1, center=False)
    with pytest.raises(NumericsError, match="LayerNorm"):
        IntL2Normalize(-1, layer_norm_constants(4, 255, 128, 0.1, 1e-5, None, None, 0.1),
                       in_scale=0.1, in_zero_point=0, out_scale=0.1, out_zero_point=0,
                       qmin=-127, qmax=127, rounding="single", eps=1e-5)
    assert math.isfinite(c.gain.double().max().item())
