"""emulate-int-sim: the emulating fake-quant graph computes what lower-to-int-sim computes.

- small conv/relu/avg-pool/add/linear stacks (hypothesis over seeds, widths and contracts):
  lower-to-int-sim of the emulating graph, checked by verify-int-sim against it, has deviation 0
  at every quantization point and on the outputs;
- gradients reach the weights and quantizer parameters (straight-through), and after an optimizer
  step the emulation follows the new weights (relowered);
- fake-quant layers take the integer graph's accumulator (no second GEMM) with their own
  gradients;
- the trained digits CNN after a few QAT steps in emulation mode (W8A8, W4A8, W3A3): int-sim top-1
  agreement with the emulating graph 100% and equal accuracy;
- bad input: another contract at lowering -> EmulationContractError naming both; an op without an
  integer kernel -> a listed float island and an EmulationWarning.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.errors import EmulationContractError, EmulationWarning
from qpasses.ir.records import EMULATION_KEY, INT_SIM_KEY
from qpasses.modules.emulation import emulation_points, is_emulating, strip_emulation
from qpasses.modules.fake_quant_layers import EMULATED_ACCUMULATORS

from .int_sim_helpers import calibrated, randomize

BITS = {"W8A8": "weight-bits=8 act-bits=8", "W4A8": "weight-bits=4 act-bits=8",
        "W3A3": "weight-bits=3 act-bits=3 first-last-bits=none"}


class Stack(nn.Module):
    """conv-relu, conv-relu, residual add, average pool, linear."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(c * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c1(x))
        x = self.pool(F.relu(x + F.relu(self.c2(x))))
        return self.fc(torch.flatten(x, 1))


def _emulate(gm: torch.fx.GraphModule, x: torch.Tensor, cal: list, opts: str = "") -> None:
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse(f"graph(emulate-int-sim{{{opts}}})", assume=gm).run(gm)


def _lower_and_verify(gm: torch.fx.GraphModule, x: torch.Tensor, cal: list, opts: str = ""
                      ) -> dict:
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse(f"graph(lower-to-int-sim{{{opts}}},verify-int-sim{{samples=4}})",
                          assume=gm).run(gm)
    return get_record(gm, INT_SIM_KEY).verify


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2 ** 16), bits=st.sampled_from(sorted(BITS)),
       rounding=st.sampled_from(["gemmlowp", "single", "hawq", "float-rne"]))
def test_lowered_emulating_graph_has_zero_deviation(seed, bits, rounding):
    gm, x, cal = calibrated(randomize(Stack(), seed), (4, 3, 8, 8), bits=BITS[bits], seed=seed)
    _emulate(gm, x, cal, f"rounding={rounding}")
    v = _lower_and_verify(gm, x, cal, f"rounding={rounding}")
    assert v["fq_points"] == v["fq_points_exact"] >= 4
    assert v["max_lsb_diff"] == 0 and v["codes_off_by_one"] == v["codes_off_more"] == 0
    assert v["output_max_abs_diff"] == 0.0 and v["top1_agree_pct"] == 100.0


def test_emulation_equals_int_sim_where_plain_fake_quant_does_not():
    """W3A3, gemmlowp: the plain fake-quant graph differs from int-sim, the emulating one not."""
    gm, x, cal = calibrated(randomize(Stack(), 3), (4, 3, 8, 8), bits=BITS["W3A3"], seed=3)
    emu = copy.deepcopy(gm)
    _emulate(emu, x, cal)
    lowered = copy.deepcopy(gm)
    _lower_and_verify(lowered, x, cal)
    with torch.no_grad():
        y_int, y_fq, y_emu = lowered(x), gm(x), emu(x)
    assert torch.equal(y_int, y_emu)
    assert not torch.equal(y_int, y_fq)


def test_strip_restores_the_fake_quant_graph_and_the_user_graph_is_untouched():
    gm, x, cal = calibrated(randomize(Stack(), 1), (2, 3, 8, 8))
    before = gm.code
    emu = copy.deepcopy(gm)
    _emulate(emu, x, cal)
    assert gm.code == before and not is_emulating(gm)
    assert is_emulating(emu) and len(emulation_points(emu)) >= 4
    rec = get_record(emu, EMULATION_KEY)
    assert rec.rounding == "gemmlowp" and set(rec.points) == set(emulation_points(emu))
    plain = copy.deepcopy(emu)
    assert strip_emulation(plain)
    assert plain.code == before
    with torch.no_grad():
        assert torch.equal(plain(x), gm(x))


def test_gradients_flow_and_emulation_follows_weight_updates():
    gm, x, cal = calibrated(randomize(Stack(), 2), (4, 3, 8, 8), bits=BITS["W4A8"])
    _emulate(gm, x, cal)
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    y = torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(gm(x), y)
    loss.backward()
    grads = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert grads["c1.weight"] is not None and float(grads["c1.weight"].abs().sum()) > 0
    assert float(grads["fc.weight"].abs().sum()) > 0
    engine = gm.int_sim_emulation
    n0 = engine.num_lowerings
    opt.step()
    gm.eval()
    with torch.no_grad():
        y_emu = gm(x)
    assert engine.num_lowerings == n0 + 1            # relowered for the new weights
    with torch.no_grad():
        assert torch.equal(gm(x), y_emu)             # the weight scales observed after the
        n1 = engine.num_lowerings                    # step may cost one more lowering
        gm(x)
    assert n1 <= n0 + 2 and engine.num_lowerings == n1   # then cached while nothing changes
    lowered = copy.deepcopy(gm)
    v = _lower_and_verify(lowered, x, cal)
    assert v["max_lsb_diff"] == 0 and v["output_max_abs_diff"] == 0.0
    with torch.no_grad():
        assert torch.equal(lowered(x), y_emu)


def _grads(gm: torch.fx.GraphModule, x: torch.Tensor, y: torch.Tensor
           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    gm.zero_grad(set_to_none=True)
    out = gm(x)
    F.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in gm.named_parameters()
                          if p.grad is not None}


class Grouped(nn.Module):
    """Strided, depthwise, grouped/dilated and 1-d convolutions, and a linear on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c1d = nn.Conv1d(8, 6, 3, padding=1, bias=False)
        self.tokens = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped(F.relu(self.dw(x))))
        x = F.relu(self.c1d(x.flatten(2)))              # (N, 6, 16)
        return self.tokens(x.transpose(1, 2)).flatten(1)   # (N, 16, 5) -> (N, 80)


@pytest.mark.parametrize("model,rounding", [(Stack, "gemmlowp"), (Stack, "float-rne"),
                                            (Grouped, "single")])
def test_layers_take_the_integer_accumulator_with_their_own_gradients(model, rounding):
    """Each fake-quant conv/linear of an emulating graph takes its value from the integer
    graph's accumulator (no second GEMM): same outputs, and the same gradients up to float32
    rounding as when it convolves itself; the float value it stands for is the layer's own."""
    gm, x, cal = calibrated(randomize(model(), 3), (4, 3, 8, 8), bits=BITS["W4A8"])
    _emulate(gm, x, cal, f"rounding={rounding}")
    gm.train()
    engine = gm.int_sim_emulation
    layers = {n for n, m in model().named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d,
                                                                      nn.Linear))}
    assert engine.accumulating == layers
    with torch.no_grad():
        values = engine(x)
    accs = values[EMULATED_ACCUMULATORS]
    assert {m for m in accs} == {gm.get_submodule(n) for n in layers}
    # the accumulator in real units is the layer's float value on the emulated input
    first = gm.get_submodule("c1" if model is Stack else "stem")
    with torch.no_grad():
        conv = first._conv_forward(values["activation_fake_quant_x"],
                                   first.weight_fake_quant(first.weight), None)
    torch.testing.assert_close(accs[first], conv, rtol=1e-5, atol=1e-5)
    y = torch.tensor([0, 1, 2, 3])
    out, shared = _grads(gm, x, y)
    engine.accumulating.clear()               # every layer convolves itself again
    engine.__dict__["_cache"] = None
    out2, own = _grads(gm, x, y)
    assert torch.equal(out, out2)
    assert set(shared) == set(own) and {f"{n}.weight" for n in layers} <= set(shared)
    for name in own:
        torch.testing.assert_close(shared[name], own[name], rtol=1e-4, atol=1e-6)


def test_relowering_shares_the_weights_and_leaves_the_trained_graph_alone():
    """The engine lowers a copy that shares the weights (no weight copy per step): the trained
    graph's tensors (values and versions), modules and train mode are untouched."""
    gm, x, cal = calibrated(randomize(Stack(), 4), (4, 3, 8, 8), bits=BITS["W4A8"])
    _emulate(gm, x, cal)
    gm.train()
    engine = gm.int_sim_emulation
    plain = engine.plain
    before = {k: (v.clone(), v._version) for k, v in plain.state_dict(keep_vars=True).items()}
    modes = {n: m.training for n, m in plain.named_modules()}
    mods = dict(plain.named_modules())
    lowered, _ = engine.lower(plain)
    assert lowered.c1 is not plain.c1 and lowered.c1.weight is plain.c1.weight
    after = plain.state_dict(keep_vars=True)
    assert set(after) == set(before)
    for k, (v, version) in before.items():
        assert torch.equal(after[k], v) and after[k]._version == version, k
    assert {n: m.training for n, m in plain.named_modules()} == modes
    assert dict(plain.named_modules()) == mods


def test_other_contract_at_lowering_is_a_typed_error_naming_both():
    gm, x, cal = calibrated(randomize(Stack(), 4), (2, 3, 8, 8))
    _emulate(gm, x, cal, "rounding=single multiplier-bits=15")
    with pytest.raises(Exception) as e:
        with PassContext(example_inputs=(x,), calibration_data=cal):
            PassManager.parse("graph(lower-to-int-sim{rounding=gemmlowp})", assume=gm).run(gm)
    err = e.value if isinstance(e.value, EmulationContractError) else e.value.__cause__
    assert isinstance(err, EmulationContractError), repr(e.value)
    msg = str(err)
    assert "rounding=single" in msg and "rounding=gemmlowp" in msg
    assert "multiplier-bits: emulated 15, lowering 31" in msg


class WithIsland(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)          # no integer kernel (LayerNorm has one)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.norm(F.relu(self.c1(x))), 1))


def test_op_without_integer_kernel_stays_a_listed_float_island_with_a_warning():
    gm, x, cal = calibrated(randomize(WithIsland(), 0), (2, 3, 8, 8))
    with pytest.warns(EmulationWarning, match="float island.*norm"):
        _emulate(gm, x, cal)
    rec = get_record(gm, EMULATION_KEY)
    assert any(i["op"] == "GroupNorm" or "norm" in i["node"] for i in rec.float_islands)
    v = _lower_and_verify(gm, x, cal)
    assert v["max_lsb_diff"] == 0 and v["output_max_abs_diff"] == 0.0
    assert [i["node"] for i in get_record(gm, INT_SIM_KEY).float_islands] == \
        [i["node"] for i in rec.float_islands]


@pytest.mark.parametrize("bits", ["W8A8", "W4A8", "W3A3"])
def test_digits_qat_in_emulation_mode_deploys_at_the_trained_accuracy(digits_cnn, bits):
    d = digits_cnn
    x, cal = d.x_test[:4], [b[0] for b in d.batches(4)]
    gm = qpasses.trace(copy.deepcopy(d.model), (x,))
    spec = BITS[bits].replace("first-last-bits=none", "first-last-bits=8")
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse(f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{{spec}}},"
                          "insert-fake-quant,calibrate,emulate-int-sim)").run(gm)
    # a few QAT steps in emulation mode
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    gm.train()
    for i in range(3):
        b = slice(64 * i, 64 * (i + 1))
        opt.zero_grad()
        F.cross_entropy(gm(d.x_train[b]), d.y_train[b]).backward()
        opt.step()
    gm.eval()
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(calibrate{method=trained})", assume=gm).run(gm)
    with torch.no_grad():
        y_emu = gm(d.x_test)
    acc_emu = float((y_emu.argmax(1) == d.y_test).double().mean() * 100)
    v = _lower_and_verify(gm, x, cal)
    assert v["max_lsb_diff"] == 0
    with torch.no_grad():
        y_int = gm(d.x_test)
    agree = float((y_int.argmax(1) == y_emu.argmax(1)).double().mean() * 100)
    acc_int = float((y_int.argmax(1) == d.y_test).double().mean() * 100)
    assert agree == 100.0 and acc_int == acc_emu
    assert torch.equal(y_int, y_emu)
