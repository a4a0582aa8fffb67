"""torch.export of the int-sim graph (issue 15): no layer, pool or requantization branches in
Python on its data while tracing (the checks become runtime assertions in the traced program and
stay typed errors in eager mode), and the fast backend traces its reference arithmetic (the same
integers). docs/export.md, "torch.export of the int-sim graph"."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qpasses.errors import NumericsError
from qpasses.modules.int_sim import Quantize, set_backend

from ..passes.int_sim_helpers import calibrated, lower, randomize

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_quantize_exports_and_matches_eager():
    q = Quantize(0.05, -3, -128, 127, where="x")
    x = torch.randn(4, 7) * 5
    ep = torch.export.export(q, (x,))
    y = torch.randn(4, 7) * 5
    assert torch.equal(ep.module()(y), q(y))


def test_eager_quantize_still_names_non_finite_inputs():
    q = Quantize(0.05, 0, -128, 127, where="x")
    with pytest.raises(NumericsError, match="non-finite"):
        q(torch.tensor([1.0, float("nan")]))


class ConvAddPoolLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = y + F.relu(self.c2(y))
        y = F.max_pool2d(y, 2, 1)
        return self.fc(torch.flatten(self.pool(y), 1))


@pytest.mark.parametrize("rounding", ["gemmlowp", "float-rne"])
def test_lowered_graph_exports_bit_exact(rounding):
    gm, x, cal = calibrated(randomize(ConvAddPoolLinear()), (2, 3, 7, 7))
    _, low = lower(gm, x, cal, f"rounding={rounding}")
    inputs = [torch.randn(2, 3, 7, 7) * s for s in (1.0, 3.0)]
    for backend in ("reference", "fast"):
        set_backend(low, backend)
        ep = torch.export.export(low, (x,))
        with torch.no_grad():
            for y in inputs:
                want = low(y)
                got = ep.module()(y)
                assert got.dtype == want.dtype and torch.equal(got, want), backend
    # eager mode after tracing: the fast backend's caches and the typed errors are intact
    with pytest.raises(NumericsError, match="window counts"):
        low(torch.randn(2, 3, 9, 9))


def test_exported_program_asserts_what_eager_raises():
    gm, x, cal = calibrated(randomize(ConvAddPoolLinear()), (1, 3, 7, 7))
    _, low = lower(gm, x, cal)
    ep = torch.export.export(low, (x,))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericsError, match="non-finite"):
        low(bad)
    with pytest.raises(RuntimeError, match="non-finite"):
        ep.module()(bad)
