"""lower-to-int-sim of ``F.normalize`` (cosine attention as in Swin V2): a linear's output
normalized over the last dim feeds a matmul (one operand through a transpose); both lower to
:class:`IntL2Normalize` onto the matmul operand quantizers, verify-int-sim is bit exact against
the oracle under every contract and both backends agree; p != 2 stays a reported float island.
Swin V2's other two float-only spellings lower too: the logit scale ``attn * clamp(τ).exp()`` (a
constant subgraph folded into an affine op) and ``16 * sigmoid(bias)`` (scalar on the left: a
table)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.int_sim_ops import IntLUT
from qpasses.modules.int_sim_transformer import IntL2Normalize, IntMatMul
from qpasses.report import report

from .int_sim_helpers import assert_backends_bit_exact, calibrated

CONTRACTS = ["gemmlowp", "single", "hawq", "float-rne"]


class Cosine(nn.Module):
    def __init__(self, p: float = 2.0, dim: int = -1) -> None:
        super().__init__()
        self.p, self.dim = p, dim
        self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(6, 4)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.q(x), p=self.p, dim=self.dim)
        k = F.normalize(self.k(x), dim=self.dim)
        tau = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return self.o((q @ k.transpose(-2, -1)) * tau)


class ScaledSigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(16 * torch.sigmoid(self.a(x)))


def _lowered(model, rounding="single"):
    torch.manual_seed(0)
    gm, x, cal = calibrated(model.eval(), (2, 6, 8))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse(f"graph(lower-to-int-sim{{rounding={rounding}}},"
                          "verify-int-sim{samples=2})", assume=gm).run(gm)
    return gm, x


def _mods(gm, cls):
    return [m for m in gm.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("rounding", CONTRACTS)
def test_normalize_lowers_onto_the_matmul_operand_grids_bit_exact(rounding):
    gm, x = _lowered(Cosine(), rounding)
    assert report(gm)["float_islands"] == []
    norms, (mm,) = _mods(gm, IntL2Normalize), _mods(gm, IntMatMul)
    assert len(norms) == 2 and all(not m.constants().center for m in norms)
    # requantized straight onto the quantizers the matmul reads (through the transpose)
    assert {(m.out_scale, m.out_zero_point) for m in norms} == \
        {(mm.a_scale, mm.a_zero_point), (mm.b_scale, mm.b_zero_point)}
    assert get_record(gm, INT_SIM_KEY).stats["num_int_l2_normalizes"] == 2
    assert_backends_bit_exact(gm, x)


def test_normalize_over_another_dim_lowers_too():
    gm, x = _lowered(Cosine(dim=1))
    assert [m.dim for m in _mods(gm, IntL2Normalize)] == [1, 1]
    assert report(gm)["float_islands"] == []
    assert_backends_bit_exact(gm, x)


def test_normalize_with_p_1_is_a_reported_float_island():
    gm, _ = _lowered(Cosine(p=1.0))
    islands = report(gm)["float_islands"]
    assert any(i["node"] == "normalize" and "p=1.0" in i["reason"] for i in islands), islands
    assert len(_mods(gm, IntL2Normalize)) == 1


def test_scalar_times_a_value_lowers_to_a_table():
    gm, x = _lowered(ScaledSigmoid())
    assert report(gm)["float_islands"] == []
    assert any(n.startswith("int_sim.mul") for n, m in gm.named_modules()
               if isinstance(m, IntLUT)), gm.code
    assert_backends_bit_exact(gm, x)


def test_emulation_covers_the_l2_normalize():
    torch.manual_seed(0)
    gm, x, cal = calibrated(Cosine().eval(), (2, 6, 8))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(emulate-int-sim{rounding=hawq},lower-to-int-sim{rounding=hawq},"
                          "verify-int-sim{samples=2})", assume=gm).run(gm)
    v = get_record(gm, INT_SIM_KEY).verify
    assert report(gm)["float_islands"] == [] and len(_mods(gm, IntL2Normalize)) == 2
    assert v["max_lsb_diff"] == 0 and v["output_max_abs_diff"] == 0.0
