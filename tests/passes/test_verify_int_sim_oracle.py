"""verify-int-sim with the vectorized oracle: mutations of weights, zero points and rounding are
still caught at their node, and the oracle's own accumulators give the same width check as the
library's reference kernel."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.passes.verify_int_sim import AccumulatorOverflowError, IntSimMismatchError

from .int_sim_helpers import calibrated, lower, randomize

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.relu(self.dw(y))
        y = y + self.conv3(y)
        return self.fc2(F.relu(self.fc1(y.mean((2, 3)))))


@pytest.fixture
def lowered():
    torch.manual_seed(0)
    gm, x, cal = calibrated(randomize(Net()), (2, 3, 10, 10))
    _, gm = lower(gm, x, cal)
    return gm, x


def _verify(gm, x, opts=""):
    with PassContext(example_inputs=(x,)):
        PassManager.parse(f"graph(verify-int-sim{{{opts}}})", assume=gm).run(gm)
    return get_record(gm, INT_SIM_KEY).verify


def _node(gm, target):
    return next(n.name for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


@pytest.mark.parametrize("layer", ["conv1", "dw", "conv3", "fc1"])
@pytest.mark.parametrize("what", ["multiplier", "shift"])
def test_a_wrong_derived_constant_is_caught_at_its_layer(lowered, layer, what):
    """The graph runs the stored multipliers/shifts, the oracle re-derives them from the real
    scales: a wrong one is found at its layer (conv, depthwise dilated conv, 1x1, linear)."""
    gm, x = lowered
    assert _verify(gm, x, "oracle=independent")["oracle"] == "independent"
    rq = gm.get_submodule(layer).requant
    with torch.no_grad():
        if what == "multiplier":
            rq.multiplier.sub_(2 ** 24)
        else:
            rq.shift.sub_(1)
    with pytest.raises(IntSimMismatchError) as e:
        _verify(gm, x, "oracle=independent")
    assert e.value.node == _node(gm, layer)


def test_oracle_accumulators_match_the_reference_kernel(lowered):
    gm, x = lowered
    a = _verify(gm, x, "oracle=independent")
    b = _verify(gm, x, "oracle=reference-backend")
    assert a["max_acc_bits_seen"] == b["max_acc_bits_seen"] > 0
    need = a["max_acc_bits_seen"]
    _verify(gm, x, f"oracle=independent acc-bits={need}")
    with pytest.raises(AccumulatorOverflowError, match="exceeds the declared"):
        _verify(gm, x, f"oracle=independent acc-bits={need - 1}")


def test_auto_takes_the_independent_oracle_for_mid_size_graphs(lowered):
    gm, x = lowered
    assert _verify(gm, x)["oracle"] == "independent"
