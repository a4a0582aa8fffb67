"""verify-int-sim: passes on correct graphs, and names the node when arithmetic, ranges or
accumulator widths are wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes_registry import PassContext, PassFailure, PassManager, get_record
from passes_registry.errors import PropertyError
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.modules.int_sim_ops import IntLUT
from qpasses.algorithms.int_sim_check import check_int_sim
from qpasses.ir.records import INT_SIM_KEY
from qpasses.passes.verify_int_sim import AccumulatorOverflowError, IntSimMismatchError

from .int_sim_helpers import calibrated, lower, randomize

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.conv1(x))
        y = F.hardswish(self.conv2(y))
        y = y + self.conv3(y)
        return self.fc(y.mean((2, 3)))


@pytest.fixture
def lowered():
    torch.manual_seed(0)
    gm, x, cal = calibrated(randomize(Small()), (2, 1, 8, 8))
    fq, gm = lower(gm, x, cal)
    return gm, x, cal


def _verify(gm, x, opts=""):
    with PassContext(example_inputs=(x,)):
        PassManager.parse(f"graph(verify-int-sim{{{opts}}})", assume=gm).run(gm)
    return get_record(gm, INT_SIM_KEY).verify


def test_verify_passes_and_reports_the_deviation(lowered):
    gm, x, _ = lowered
    v = _verify(gm, x, "samples=2")
    assert v["oracle"] == "independent" and v["num_samples"] == 2
    assert v["num_nodes_checked"] >= 8 and v["num_int_nodes"] >= 6
    assert v["fq_points"] >= 4 and v["codes_total"] > 0
    assert v["local_max_lsb_diff"] <= 1 and v["max_lsb_diff"] <= 3
    # every quantization point is measured locally, also those reached through op chains
    # (mean -> squeeze -> requantize before fc)
    assert v["local_points"] == v["fq_points"]
    assert 0 < v["max_acc_bits_seen"] <= 32
    v2 = _verify(gm, x, "oracle=reference-backend backend=reference")
    assert v2["oracle"] == "reference-backend"
    # the backend used for the check is switched back afterwards
    assert any(m.kernel == "int8-mm" for m in gm.modules() if isinstance(m, IntLayer))


def test_a_wrong_multiplier_is_caught_at_its_node(lowered):
    gm, x, _ = lowered
    rq = gm.get_submodule("conv2").requant
    assert rq is not None
    rq.multiplier[0] += 2 ** 20
    with pytest.raises(IntSimMismatchError, match="conv2") as e:
        _verify(gm, x)
    assert e.value.node == "conv2"


def test_a_wrong_table_entry_is_caught_at_its_node(lowered):
    gm, x, _ = lowered
    name, lut = next((n, m) for n, m in gm.named_modules() if isinstance(m, IntLUT))
    with torch.no_grad():
        lut.table.add_(1).clamp_(max=lut.out_qmax)
    node = next(n.name for n in gm.graph.nodes if n.target == name)
    with pytest.raises(IntSimMismatchError) as e:
        _verify(gm, x)
    assert e.value.node == node


def test_overflow_mode_names_the_layer(lowered):
    gm, x, _ = lowered
    with pytest.raises(AccumulatorOverflowError, match="exceeds the declared 12-bit width"):
        _verify(gm, x, "acc-bits=12")
    v = _verify(gm, x, "acc-bits=32")
    assert v["max_acc_bits_seen"] <= 32


def test_an_input_outside_its_declared_range_is_caught(lowered):
    gm, x, _ = lowered
    layer = gm.get_submodule("conv2")
    layer.x_qmax = layer.x_qmin + 1
    with pytest.raises(AccumulatorOverflowError, match="declared input range") as e:
        _verify(gm, x)
    assert e.value.node == "conv2"


def test_an_unproven_fast_kernel_breaks_the_int_sim_property(lowered):
    gm, _, _ = lowered
    layer = gm.get_submodule("conv2")
    assert check_int_sim(gm) == []
    layer.kernel = "float32" if layer.fast_kernel != "float32" else "int8-mm"
    assert any("proves only" in p for p in check_int_sim(gm))


def test_verify_needs_inputs_and_a_lowered_graph(lowered):
    gm, _, _ = lowered
    with pytest.raises(PassFailure, match="example_inputs"):
        with PassContext():
            PassManager.parse("graph(verify-int-sim)", assume=gm).run(gm)
    with pytest.raises(PropertyError, match="lower-to-int-sim"):
        PassManager.parse("graph(verify-int-sim)", assume={"calibrated"})


def test_recorded_values_survive_later_in_place_ops():
    from qpasses.passes.verify_int_sim import record_run

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 1)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            return self.relu(self.conv(x))

    torch.manual_seed(0)
    model = InPlace().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 1, 4, 4)
    values = record_run(gm, (x,))
    with torch.no_grad():
        conv_out = model.conv(x)
    assert (conv_out < 0).any()
    assert torch.equal(values["conv"], conv_out)      # not the ReLU'd tensor
    assert torch.equal(values["relu"], conv_out.clamp(min=0))


def test_deviation_false_runs_the_checks_only():
    """deviation=false: the bit-exact, range and width checks, no fake-quant comparison."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(4 * 4 * 4, 5)))
    gm, x, cal = calibrated(model, (2, 3, 6, 6))
    _, low = lower(gm, x, cal, verify="deviation=false")
    v = get_record(low, INT_SIM_KEY).verify
    assert v["num_nodes_checked"] > 0 and v["oracle"] == "independent"
    assert "codes_total" not in v and "local_points" not in v
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(verify-int-sim)", assume=low).run(low)
    assert get_record(low, INT_SIM_KEY).verify["local_points"] > 0
