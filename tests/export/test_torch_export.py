"""torch.export of the int-sim graph (issue 15, item 3): the input ``Quantize`` no longer branches
in Python on its data (the NaN/inf check becomes a runtime assertion while tracing, a typed error
in eager mode). The layers and pools still hold data-dependent checks (docs/export.md)."""
from __future__ import annotations

import pytest
import torch

from qpasses.errors import NumericsError
from qpasses.modules.int_sim import Quantize


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
