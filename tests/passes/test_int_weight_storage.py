"""Lowered weight codes are stored in the narrowest integer dtype that holds them (int8 for 8-bit
codes): the same integers, the same results on both backends as int64 storage, and state_dict
round trips that keep the values whatever dtype they were saved in."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qpasses.errors import NumericsError
from qpasses.modules.int_sim import set_backend
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.numerics.int_ops import codes_dtype, narrow_int, narrowest_int_dtype

from tests.passes.int_sim_helpers import assert_backends_bit_exact, calibrated, lower, randomize

_RANGES = {torch.int8: (-2 ** 7, 2 ** 7 - 1), torch.int16: (-2 ** 15, 2 ** 15 - 1),
           torch.int32: (-2 ** 31, 2 ** 31 - 1)}


@settings(deadline=None, max_examples=60, derandomize=True)
@given(st.lists(st.integers(-2 ** 40, 2 ** 40), min_size=1, max_size=6))
def test_narrow_int_keeps_values_in_the_narrowest_dtype(values):
    t = torch.tensor(values, dtype=torch.int64)
    n = narrow_int(t)
    assert torch.equal(n.to(torch.int64), t)
    lo, hi = min(values), max(values)
    narrower = [dt for dt, (a, b) in _RANGES.items() if a <= lo and hi <= b]
    assert n.dtype == (narrower[0] if narrower else torch.int64)
    assert narrowest_int_dtype(lo, hi) == n.dtype == codes_dtype(t)


def test_narrow_int_edges_and_errors():
    assert narrowest_int_dtype(-128, 127) == torch.int8
    assert narrowest_int_dtype(0, 255) == torch.int16          # unsigned 8-bit codes: int16
    assert narrowest_int_dtype(-129, 0) == torch.int16
    assert narrowest_int_dtype(0, 2 ** 31) == torch.int64
    assert narrow_int(torch.zeros(0, dtype=torch.int64)).dtype == torch.int8
    with pytest.raises(NumericsError, match="integer tensor"):
        narrow_int(torch.zeros(3))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(x)))).flatten(1))


def _lowered(bits: str = "weight-bits=8 act-bits=8"):
    gm, x, cal = calibrated(randomize(Net()), (2, 3, 6, 6), bits=bits, batches=1)
    _, gm = lower(gm, x, cal)
    return gm, x


def _layers(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, IntLayer)}


def _widened(gm):
    """A copy whose weight codes are int64 again (the storage before narrowing)."""
    wide = copy.deepcopy(gm)
    for m in _layers(wide).values():
        m._buffers["w_q"] = m.w_q.to(torch.int64)
    return wide


@pytest.mark.parametrize("bits, dtype", [("weight-bits=8 act-bits=8", torch.int8),
                                         ("weight-bits=4 act-bits=8", torch.int8),
                                         ("weight-bits=12 act-bits=8 first-last-bits=none", torch.int16)])
def test_codes_are_narrow_and_results_unchanged(bits, dtype):
    gm, x = _lowered(bits)
    layers = _layers(gm)
    assert set(layers) == {"conv", "dw", "fc"}
    assert all(m.w_q.dtype == dtype for m in layers.values())
    assert_backends_bit_exact(gm, x)
    wide = _widened(gm)
    for backend in ("fast", "reference"):
        set_backend(gm, backend)
        set_backend(wide, backend)
        with torch.no_grad():
            assert torch.equal(gm(x), wide(x)), backend


def test_state_dict_round_trips_keep_the_codes():
    gm, x = _lowered()
    with torch.no_grad():
        want = gm(x)
    # saved with int64 codes (older versions): loads into the int8 layers unchanged
    old = {k: (v.to(torch.int64) if k.endswith("w_q") else v) for k, v in gm.state_dict().items()}
    fresh, _ = _lowered()
    fresh.load_state_dict(old)
    assert all(m.w_q.dtype == torch.int8 for m in _layers(fresh).values())
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    # codes wider than the layer's storage are kept, not wrapped: the buffer widens
    sd = gm.state_dict()
    sd["fc.w_q"] = sd["fc.w_q"].to(torch.int64)
    sd["fc.w_q"][0, 0] = 300
    fresh.load_state_dict(sd)
    fc = fresh.get_submodule("fc")
    assert fc.w_q.dtype == torch.int16 and int(fc.w_q[0, 0]) == 300
    assert torch.equal(fc.w_q.to(torch.int64), sd["fc.w_q"])


@pytest.mark.parametrize("lo, hi, zp, dtype", [(-100, 27, 0, torch.int8),
                                               (-200, 20, 150, torch.int16),   # centred -200
                                               (0, 100, 127, torch.int16),     # codes up to 227
                                               (-3, 3, -20000, torch.int16),
                                               (-3, 3, 40000, torch.int32)])
def test_weight_codes_come_narrow_and_exact(lo, hi, zp, dtype):
    from qpasses.numerics.weight_codes import weight_codes, weight_codes_reference
    centred = torch.arange(lo, hi + 1, dtype=torch.int64).reshape(1, -1).repeat(2, 1)
    scale = torch.tensor([0.5, 0.25], dtype=torch.float64)
    w = (centred.double() * scale.reshape(-1, 1)).float()
    z = torch.full((2,), zp, dtype=torch.int64)
    got, want = weight_codes(w, scale, z), weight_codes_reference(w, scale, z)
    assert got.codes.dtype == dtype
    assert torch.equal(got.codes.to(torch.int64), want.codes)
    assert torch.equal(want.codes, centred + zp)
