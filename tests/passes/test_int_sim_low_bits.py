"""int-sim vs fake-quant at 2-4 bits on the trained residual digits CNN (tests/conftest.py).

Each check compares every activation quantizer *locally*: the fake-quant graph is run with the
output of every quantizer replaced by the int-sim codes, so a quantizer's codes are compared with
the integer graph's given the same inputs (one requantization, no cascade of earlier flips).

- DoReFa weights (``2·(k/L) − 1`` in float32, up to one ulp off the grid ``code/L``) lower to
  integer layers instead of float islands;
- the global average pool's requantization keeps fractional bits of the mean (gemmlowp's SRDHM
  otherwise rounds the sum before its rounding shift: ~10% of the pooled codes were 1 LSB off);
- with ``bias-frac-bits=16`` every requantization is within float error of the fake-quant one.
"""
from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.modules.int_sim_ops import IntAvgPoolSum
from qpasses.passes.verify_int_sim import record_run

from .int_sim_helpers import assert_backends_bit_exact, lower

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# (bits of the inner layers, weight scheme, activation scheme); first/last layers stay 8-bit
CONFIGS = [(2, "dorefa", "pact"), (3, "dorefa", "pact"), (3, "symmetric", "affine"),
           (4, "asymmetric", "symmetric")]


def _fake_quant(digits: Any, bits: int, wscheme: str, ascheme: str
                ) -> tuple[torch.fx.GraphModule, torch.Tensor, list[torch.Tensor]]:
    x = digits.x_test[:2]
    cal = [b[0] for b in digits.batches(4)]
    gm = qpasses.trace(copy.deepcopy(digits.model), (x,))
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse(
            f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{weight-bits={bits} "
            f"act-bits={bits} first-last-bits=8}},insert-fake-quant{{weight-scheme={wscheme} "
            f"act-scheme={ascheme}}},calibrate)").run(gm)
    return gm, x, cal


class _Forced(torch.fx.Interpreter):
    """The fake-quant graph with every mapped quantizer's output replaced by the int-sim codes
    (dequantized as the fake quantizer does); records each quantizer's own |code difference|."""

    def __init__(self, gm: torch.fx.GraphModule, fq_map: dict[str, dict[str, Any]],
                 int_values: dict[str, Any]) -> None:
        super().__init__(gm)
        self.fq_map, self.int_values = fq_map, int_values
        self.diff: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        v = super().run_node(n)
        m = self.fq_map.get(n.name)
        if m is None:
            return v
        z = m["zero_point"]
        codes = torch.round(v.double() / m["scale"]).to(torch.int64) + z
        q = self.int_values[m["node"]].to(torch.int64)
        self.diff[n.name] = (codes - q).abs()
        return (q - z).to(torch.float32) * torch.tensor(m["scale"], dtype=torch.float32)


def _local(fq: torch.fx.GraphModule, gm: torch.fx.GraphModule, x: torch.Tensor
           ) -> dict[str, torch.Tensor]:
    rec = get_record(gm, INT_SIM_KEY)
    values = record_run(gm, (x,))
    with torch.no_grad():
        f = _Forced(fq, rec.fq_map, values)
        f.run(x)
    assert len(f.diff) == len(rec.fq_map) >= 5
    return f.diff


def _agreement(fq: torch.fx.GraphModule, gm: torch.fx.GraphModule, x: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((fq(x).argmax(1) == gm(x).argmax(1)).double().mean())


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_dorefa_weights_lower_to_integer_layers(digits_cnn, bits):
    gm0, x, cal = _fake_quant(digits_cnn, bits, "dorefa", "pact")
    fq, gm = lower(gm0, x, cal, "rounding=float-rne")
    rec = get_record(gm, INT_SIM_KEY)
    assert rec.float_islands == (), rec.float_islands
    layers = {n: m for n, m in gm.named_modules() if isinstance(m, IntLayer)}
    assert sorted(layers) == ["conv1", "conv2", "conv3", "fc"]
    for name, m in layers.items():
        b = 8 if name in ("conv1", "fc") else bits
        codes = m.w_q - m.w_zp.reshape(-1, *[1] * (m.w_q.dim() - 1))
        # DoReFa's 2^b levels symmetric around 0: odd codes on the step 1/(2^b − 1)
        assert bool((codes.remainder(2) == 1).all()), name
        assert int(codes.abs().max()) <= 2 ** b - 1, name
    # float-rne is fbgemm's float32 order: every op equals the fake-quant op up to float error
    x_test = digits_cnn.x_test
    for name, d in _local(fq, gm, x_test).items():
        assert int(d.max()) <= 1 and float((d > 0).double().mean()) <= 1e-4, name
    assert _agreement(fq, gm, x_test) >= 99.5


@pytest.mark.parametrize("bits,wscheme,ascheme", CONFIGS)
def test_low_bit_requantizations_stay_within_the_contract(digits_cnn, bits, wscheme, ascheme):
    gm0, x, cal = _fake_quant(digits_cnn, bits, wscheme, ascheme)
    fq, gm = lower(gm0, x, cal)                    # gemmlowp, bias-frac-bits auto
    assert get_record(gm, INT_SIM_KEY).float_islands == ()
    pools = [m for m in gm.modules() if isinstance(m, IntAvgPoolSum)]
    assert len(pools) == 1 and pools[0].lcm > 16      # 4x4 window sums keep fractional bits
    for name, d in _local(fq, gm, digits_cnn.x_test).items():
        # the contract's error stays within ~1/32 LSB (bias and SRDHM rounding, M·2^-k <= 2^-5):
        # rare 1-LSB flips, never more; the pooled codes were ~10% off with SRDHM on L-sums
        assert int(d.max()) <= 1, name
        assert float((d > 0).double().mean()) <= 0.05, (name, float((d > 0).double().mean()))


@pytest.mark.parametrize("bits,wscheme,ascheme", CONFIGS)
def test_bias_frac_bits_make_int_sim_follow_fake_quant(digits_cnn, bits, wscheme, ascheme):
    gm0, x, cal = _fake_quant(digits_cnn, bits, wscheme, ascheme)
    fq, gm = lower(gm0, x, cal, "bias-frac-bits=16")
    x_test = digits_cnn.x_test
    for name, d in _local(fq, gm, x_test).items():
        assert int(d.max()) <= 1, name
        assert float((d > 0).double().mean()) <= 1e-3, (name, float((d > 0).double().mean()))
    assert _agreement(fq, gm, x_test) >= 99.0


def test_oracle_and_backends_agree_with_pool_fractional_bits(digits_cnn):
    gm0, x, cal = _fake_quant(digits_cnn, 3, "dorefa", "pact")
    _, gm = lower(gm0, x, cal, verify="samples=8 oracle=independent")
    v = get_record(gm, INT_SIM_KEY).verify
    assert v["oracle"] == "independent" and v["local_max_lsb_diff"] <= 1
    assert any(isinstance(m, IntAvgPoolSum) and m.lcm > 16 for m in gm.modules())
    assert_backends_bit_exact(gm, digits_cnn.x_test[:64])
