"""The observers' fast batch min / max (one full reduction, or amin / amax over the other dims
in place) equals the ``(C, N)`` row reduction it replaced, per tensor and per channel, and the
statistics built on it (running min / max, moving averages, histogram ranges) are unchanged."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpasses.numerics.observers import (KLObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                                        MSEObserver, batch_minmax)


def _rows(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: min / max of each row of the (C, N) view."""
    flat = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return flat.min(dim=1).values, flat.max(dim=1).values


_shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@settings(deadline=None, max_examples=40, derandomize=True)
@given(_shapes, st.integers(0, 2 ** 31 - 1), st.data())
def test_batch_minmax_is_the_row_reduction(shape, seed, data):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3
    axis = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)))
    mn, mx = batch_minmax(x, axis)
    rmn, rmx = _rows(x, axis)
    assert mn.shape == rmn.shape and torch.equal(mn, rmn) and torch.equal(mx, rmx)


@settings(deadline=None, max_examples=15, derandomize=True)
@given(st.integers(0, 2 ** 31 - 1), st.sampled_from([None, 0, 1, -1]))
def test_observer_statistics_match_the_definition(seed, axis):
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randn(2, 3, 4, 5, generator=g) * (i + 1) for i in range(3)]
    mm, ma = MinMaxObserver(axis), MovingAverageMinMaxObserver(axis, momentum=0.3)
    kl, mse = KLObserver(axis, bins=16), MSEObserver(axis, bins=16, grid=4)
    run_min = run_max = avg_min = avg_max = None
    for x in batches:
        for o in (mm, ma, kl, mse):
            o.observe(x)
        bmn, bmx = _rows(x, axis)
        if run_min is None:
            run_min, run_max, avg_min, avg_max = bmn, bmx, bmn, bmx
        else:
            run_min, run_max = torch.minimum(run_min, bmn), torch.maximum(run_max, bmx)
            avg_min = avg_min + 0.3 * (bmn - avg_min)
            avg_max = avg_max + 0.3 * (bmx - avg_max)
    assert torch.equal(mm.min_val, run_min) and torch.equal(mm.max_val, run_max)
    assert torch.equal(ma.avg_min, avg_min) and torch.equal(ma.avg_max, avg_max)
    absmax = torch.maximum(run_max.abs(), run_min.abs())
    assert torch.equal(kl.hist_hi, absmax) and not bool(kl.hist_lo.any())
    assert torch.equal(mse.hist_lo, run_min.clamp(max=0))
    assert torch.equal(mse.hist_hi, run_max.clamp(min=0))
    # every observed element is counted once (re-binning keeps the mass)
    n = batches[0].numel() * len(batches) // (1 if axis is None else batches[0].shape[axis])
    assert bool((kl.hist.sum(1) == n).all()) and bool((mse.hist.sum(1) == n).all())
