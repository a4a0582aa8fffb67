"""weight_codes' blocked shortcut (contiguous weights, blocks of whole kernels) gives exactly what
the one-shot shortcut (non-contiguous weights) and the float64 definition give: codes and their
dtype and layout, off-grid count, per-kernel L1 norms, code range — with many small blocks, on
grid weights, perturbed weights (one weight, one ulp, NaN) in any block, wide codes, tolerances."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import qpasses.numerics.weight_codes as wc
from qpasses.numerics.weight_codes import weight_codes, weight_codes_reference


def _equal(a, b) -> None:
    assert (a.num_off, a.lo, a.hi) == (b.num_off, b.lo, b.hi)
    assert torch.equal(a.l1, b.l1) and a.l1.dtype == b.l1.dtype
    if a.codes is None or b.codes is None:
        assert a.codes is None and b.codes is None
    else:
        assert a.codes.dtype == b.codes.dtype and a.codes.stride() == b.codes.stride()
        assert torch.equal(a.codes, b.codes)


def _one_shot(w, scale, zp, tol):
    """The one-shot shortcut: the same weights as a non-contiguous tensor."""
    t = torch.empty(w.shape[::-1], dtype=w.dtype).permute(*reversed(range(w.dim())))
    t.copy_(w)
    assert not t.is_contiguous() or w.dim() < 2 or w.shape[0] == 1 or w[0].numel() == 1
    r = weight_codes(t, scale, zp, tol)
    codes = None if r.codes is None else r.codes.contiguous()
    return wc.WeightCodes(codes, r.num_off, r.l1, r.lo, r.hi)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(bits=st.integers(1, 22), c=st.integers(1, 9), k=st.integers(1, 12),
       block=st.sampled_from([1, 5, 16, 1 << 18]), affine=st.booleans(),
       perturb=st.sampled_from(["none", "one", "ulp", "nan", "wide"]),
       tol=st.sampled_from([None, 2.0 ** -22]), seed=st.integers(0, 999))
def test_blocked_equals_one_shot_and_definition(bits, c, k, block, affine, perturb, tol, seed):
    g = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1 if bits > 1 else 1
    scale = (torch.rand(c, generator=g) * 0.1 + 1e-3).to(torch.float32).double()
    zp = torch.randint(-3, 4, (c,), generator=g) if affine else torch.zeros(c, dtype=torch.int64)
    codes = torch.randint(-qmax, qmax + 1, (c, k, 2), generator=g)
    w = (codes.double() * scale.reshape(-1, 1, 1)).to(torch.float32)
    i = seed % w.numel()
    if perturb == "one":
        w.view(-1)[i] += float(scale[0]) * 0.3
    elif perturb == "ulp":
        w.view(-1)[i] = torch.nextafter(w.view(-1)[i], torch.tensor(1e9))
    elif perturb == "nan":
        w.view(-1)[i] = float("nan")
    elif perturb == "wide":      # a code beyond the float32 shortcut's proven range
        w.view(-1)[i] = float(scale[i // (2 * k)]) * 2.0 ** 21
    old = wc._BLOCK_ELEMENTS
    wc._BLOCK_ELEMENTS = block
    try:
        blocked = weight_codes(w, scale, zp, tol)
    finally:
        wc._BLOCK_ELEMENTS = old
    _equal(blocked, _one_shot(w, scale, zp, tol))
    ref = weight_codes_reference(w, scale, zp, tol)
    assert blocked.num_off == ref.num_off
    if ref.codes is not None:
        assert torch.equal(blocked.codes.to(torch.int64), ref.codes)
        assert torch.equal(blocked.l1, ref.l1) and (blocked.lo, blocked.hi) == (ref.lo, ref.hi)


@pytest.mark.parametrize("shape", [(64, 3, 7, 7), (256, 64, 1, 1), (10, 2048)])
def test_blocked_on_layer_shapes(shape, monkeypatch):
    g = torch.Generator().manual_seed(1)
    c = shape[0]
    scale = (torch.rand(c, generator=g) * 0.01 + 1e-4).to(torch.float32).double()
    codes = torch.randint(-127, 128, shape, generator=g)
    w = (codes.double() * scale.reshape(-1, *([1] * (len(shape) - 1)))).to(torch.float32)
    monkeypatch.setattr(wc, "_BLOCK_ELEMENTS", 1000)     # several blocks, ragged last one
    r = weight_codes(w, scale, torch.zeros(c, dtype=torch.int64))
    assert r.codes.dtype == torch.int8 and torch.equal(r.codes.to(torch.int64), codes)
    assert torch.equal(r.l1, codes.abs().reshape(c, -1).sum(1))
    assert (r.lo, r.hi) == (int(codes.min()), int(codes.max()))
