"""fake_quant_codes (the codes of the fast fake-quant path, straight from the float weight) returns
exactly what weight_codes returns for the fake-quantized weight: codes and their dtype, L1 norms,
code range; over many small blocks, symmetric and affine grids, narrow and wide ranges, odd scales
and clamped weights. Where its argument does not apply it returns None (the caller goes the long
way); the lowering and WeightFakeQuant.integer_codes use it only for the fast path."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import qpasses.numerics.weight_codes as wc
from qpasses.modules.fake_quant import WeightFakeQuant
from qpasses.numerics.fast_fake_quant import fast_fake_quant
from qpasses.numerics.weight_codes import fake_quant_codes, weight_codes


def _long_way(w, scale, zp, qmin, qmax):
    w_hat = fast_fake_quant(w, scale, zp, qmin, qmax, axis=0)
    z = zp if zp is not None else torch.zeros(w.shape[0], dtype=torch.int64)
    return weight_codes(w_hat, scale.double(), z)


def _equal(a, b) -> None:
    assert (a.num_off, a.lo, a.hi) == (b.num_off, b.lo, b.hi)
    assert torch.equal(a.l1, b.l1) and a.l1.dtype == b.l1.dtype == torch.int64
    assert a.codes.dtype == b.codes.dtype and a.codes.shape == b.codes.shape
    assert torch.equal(a.codes, b.codes)


@settings(deadline=None, max_examples=80, derandomize=True)
@given(bits=st.integers(1, 16), c=st.integers(1, 9), k=st.integers(1, 40),
       block=st.sampled_from([1, 7, 64, 1 << 18]), affine=st.booleans(), narrow=st.booleans(),
       spread=st.sampled_from([0.5, 1.0, 3.0]), tiny=st.booleans(), seed=st.integers(0, 999))
def test_equals_weight_codes_of_the_fake_quantized_weight(bits, c, k, block, affine, narrow,
                                                          spread, tiny, seed):
    g = torch.Generator().manual_seed(seed)
    if affine:
        qmin, qmax = 0, 2 ** bits - 1
        zp = torch.randint(qmin, qmax + 1, (c,), generator=g)
    else:
        qmax = max(2 ** (bits - 1) - 1, 1)
        qmin = -qmax if narrow else -qmax - 1
        zp = None
    w = torch.randn(c, k, 3, generator=g) * spread
    w.view(-1)[seed % w.numel()] = -0.0
    scale = (w.abs().amax(dim=(1, 2)) / qmax).clamp(min=1e-8)
    if tiny:                          # odd scales: many codes clamp, ties at half steps
        scale = scale * torch.rand(c, generator=g) * 0.5 + 1e-6
    old = wc._BLOCK_ELEMENTS
    wc._BLOCK_ELEMENTS = block
    try:
        fast = fake_quant_codes(w, scale, zp, qmin, qmax)
    finally:
        wc._BLOCK_ELEMENTS = old
    assert fast is not None
    _equal(fast, _long_way(w, scale, zp, qmin, qmax))


@pytest.mark.parametrize("case", ["nan", "inf-scale", "zero-scale", "subnormal-scale", "float64",
                                  "non-contiguous", "empty", "wide-range"])
def test_none_where_the_argument_does_not_apply(case):
    w, scale, qmin, qmax = torch.randn(4, 6), torch.full((4,), 0.01), -127, 127
    if case == "nan":
        w[2, 3] = float("nan")
    elif case == "inf-scale":
        scale[1] = float("inf")
    elif case == "zero-scale":
        scale[1] = 0.0
    elif case == "subnormal-scale":
        scale[1] = 1e-40
    elif case == "float64":
        w = w.double()
    elif case == "non-contiguous":
        w = torch.randn(6, 4).t()
    elif case == "empty":
        w = torch.empty(0, 6)
        scale = torch.empty(0)
    elif case == "wide-range":
        qmin, qmax = -2 ** 17, 2 ** 17
    assert fake_quant_codes(w, scale, None, qmin, qmax) is None


@pytest.mark.parametrize("scheme,bits", [("symmetric", 8), ("asymmetric", 4), ("symmetric", 16),
                                         ("symmetric", [0, 2, 3, 4]), ("dorefa", 3)])
def test_integer_codes_of_the_quantizer(scheme, bits):
    """WeightFakeQuant.integer_codes: the fast path's codes where forward takes it (uniform bits,
    rne, float32), else None; forward's own output is (codes − z)·s on that path."""
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    q = WeightFakeQuant(4, bits, scheme)
    got = q.integer_codes(w)
    if scheme == "dorefa" or isinstance(bits, list):
        assert got is None and q.integer_codes_bytes(w) is None
        return
    assert got is not None
    assert got.codes.element_size() <= q.integer_codes_bytes(w) <= 2 * got.codes.element_size()
    w_hat = q(w)
    _equal(got, weight_codes(w_hat, q.scale.double(), q.zero_point))
    back = ((got.codes.long() - q.zero_point.view(-1, 1, 1, 1)).float()
            * q.scale.view(-1, 1, 1, 1))
    assert torch.equal(back, w_hat)
