"""weight_codes (float32 shortcut) against its float64 definition, bit for bit: codes, the count of
off-grid weights, per-kernel L1 norms and code range — on grid weights, perturbed weights, wide
codes, DoReFa-style tolerances and non-float32 scales."""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from qpasses.numerics.weight_codes import row_l1, weight_codes, weight_codes_reference


def _same(a, b) -> None:
    assert a.num_off == b.num_off
    assert (a.lo, a.hi) == (b.lo, b.hi) or a.num_off
    assert torch.equal(a.l1, b.l1) or a.num_off
    if a.codes is None or b.codes is None:
        assert a.codes is None and b.codes is None
    else:
        # the definition keeps int64; the shortcut a dtype holding every code and zero point
        assert b.codes.dtype == torch.int64 and not a.codes.dtype.is_floating_point
        assert torch.equal(a.codes.to(torch.int64), b.codes)


@settings(deadline=None, max_examples=60, derandomize=True)
@given(bits=st.integers(1, 24), c=st.integers(1, 6), k=st.integers(1, 40),
       affine=st.booleans(), perturb=st.sampled_from(["none", "one", "ulp", "nan"]),
       f64_scale=st.booleans(), tol=st.sampled_from([None, 2.0 ** -22]), seed=st.integers(0, 999))
def test_fast_path_equals_definition(bits, c, k, affine, perturb, f64_scale, tol, seed):
    g = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1 if bits > 1 else 1
    scale32 = (torch.rand(c, generator=g) * 0.1 + 1e-3).to(torch.float32)
    scale = scale32.double()
    if f64_scale:                       # not a float32 value: the definition decides
        scale = scale * (1 + 2.0 ** -40)
    zp = torch.randint(-3, 4, (c,), generator=g) if affine else torch.zeros(c, dtype=torch.int64)
    codes = torch.randint(-qmax, qmax + 1, (c, k), generator=g)
    w = ((codes.double()) * scale.reshape(-1, 1)).to(torch.float32)   # on the grid (centered)
    if perturb == "one":
        w.view(-1)[seed % w.numel()] += float(scale32[0]) * 0.3
    elif perturb == "ulp":
        w.view(-1)[seed % w.numel()] = torch.nextafter(w.view(-1)[seed % w.numel()],
                                                       torch.tensor(1e9))
    elif perturb == "nan":
        w.view(-1)[seed % w.numel()] = float("nan")
    _same(weight_codes(w, scale, zp, tol), weight_codes_reference(w, scale, zp, tol))


def test_grid_codes_roundtrip_and_zero_kernels(monkeypatch):
    import qpasses.numerics.weight_codes as wc
    calls = []
    ref = wc.weight_codes_reference
    monkeypatch.setattr(wc, "weight_codes_reference", lambda *a: calls.append(1) or ref(*a))
    scale = torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64)
    zp = torch.tensor([0, 2, -1])
    centered = torch.tensor([[[1, -2], [3, 0]], [[0, 0], [0, 0]], [[-8, 7], [1, 1]]])
    w = (centered.double() * scale.reshape(-1, 1, 1)).float()
    r = weight_codes(w, scale, zp)
    assert r.num_off == 0 and (r.lo, r.hi) == (-8, 7)
    assert torch.equal(r.codes, centered + zp.reshape(-1, 1, 1))
    assert r.l1.tolist() == [6, 0, 17]
    assert not calls                                  # on the grid: the float32 shortcut
    off = w.clone()
    off[0, 0, 0] += 0.1
    bad = weight_codes(off, scale, zp)
    assert bad.num_off == 1 and bad.codes is None and calls   # off it: the definition


def test_row_l1_exact_in_chunks(monkeypatch):
    import qpasses.numerics.weight_codes as wc
    monkeypatch.setattr(wc, "_ROW_CHUNK", 7)          # several chunks
    v = torch.randint(-2 ** 20, 2 ** 20, (9, 5, 3))
    want = v.abs().reshape(9, -1).sum(1)
    assert torch.equal(row_l1(v), want)
    assert torch.equal(row_l1(v.float()), want)                  # float64 sums: exact
    assert torch.equal(row_l1(v.float(), 2.0 ** 20), want)       # too wide for float32: float64
    small = torch.randint(-100, 101, (4, 6)).float()
    assert torch.equal(row_l1(small, 100.0), small.abs().sum(1).to(torch.int64))
    assert row_l1(torch.zeros(3, 0)).tolist() == [0, 0, 0]
