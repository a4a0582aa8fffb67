"""Issue 18 (part B): honest ``modified`` in calibrate, a report that matches the computation
after lowering, and typed errors for user mistakes in the quantization passes."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, PassesError
from passes_registry.errors import OptionError, PipelineParseError
from qpasses.errors import (AnnotationError, CalibrationError, InputError, QpassesWarning,
                            TraceError)
from tests.models import ReluModel, TinyCNN

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
QUANT = "annotate-bitwidths{weight-bits=8 act-bits=8 first-last-bits=none},insert-fake-quant"


def _run(gm, text, data=None, assume=None):
    pm = PassManager.parse(text, **({"assume": assume} if assume is not None else {}))
    with PassContext(example_inputs=(X,), calibration_data=[X] if data is None else data,
                     verify_each=True):
        return pm.run(gm)


def _tiny():
    torch.manual_seed(0)
    return qpasses.trace(TinyCNN().eval(), X)


# -- calibrate reports modified honestly (verify-each checks the claim) ---------------------------

@pytest.mark.parametrize("case", ["all-skipped", "no-layers", "twice", "repeat"])
def test_calibrate_is_honest_when_nothing_changes(case):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case == "all-skipped":
            _run(_tiny(), "graph(annotate-bitwidths{skip={conv1,conv2,fc}},insert-fake-quant,"
                          "calibrate)")
        elif case == "no-layers":
            _run(qpasses.trace(ReluModel(), X), f"graph({QUANT},calibrate)")
        elif case == "twice":
            _run(_tiny(), f"graph(fold-batch-norm,{QUANT},calibrate,calibrate)")
        else:
            _run(_tiny(), f"graph(fold-batch-norm,{QUANT},"
                          "repeat{count=2}(calibrate,lower-to-int-sim))")


def test_default_twice_is_a_typed_error_naming_the_float_graph():
    gm = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(gm, "graph(default)")
        with pytest.raises(AnnotationError, match="already realized.*float graph"):
            _run(gm, "graph(default)")


def test_shape_less_graph_is_a_trace_error():
    gm = torch.fx.symbolic_trace(TinyCNN().eval())
    with pytest.raises(TraceError, match="example inputs"):
        _run(gm, "graph(annotate-bitwidths)")


# -- the report matches the computation -----------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_0"])
def test_report_macs_and_bitops_unchanged_by_lowering(name):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm = qpasses.trace(getattr(torchvision.models, name)().eval(), x)
    with warnings.catch_warnings(), PassContext(example_inputs=(x,), calibration_data=[x]):
        warnings.simplefilter("ignore")
        PassManager.parse("graph(fold-batch-norm,annotate-bitwidths,insert-fake-quant,"
                          "calibrate)").run(gm)
        before = qpasses.report(gm)
        PassManager.parse("graph(lower-to-int-sim)", assume=gm).run(gm)
        after = qpasses.report(gm)
    rows = {r["name"]: r for r in after["layers"]}
    assert set(rows) == {r["name"] for r in before["layers"]}
    for r in before["layers"]:
        assert (rows[r["name"]]["macs"], rows[r["name"]]["bitops"]) == (r["macs"], r["bitops"]), \
            r["name"]
    if name == "resnet18":      # conv1 then ReLU + MaxPool: the conv's 16x16 output, not 8x8
        assert rows["conv1"]["macs"] == 64 * 3 * 49 * 16 * 16


@pytest.mark.parametrize("text", [
    "annotate-bitwidths{weight-bits=4}", "solve-bitwidths{target-bitops=0.001}",
    "search-mixquant{qem=20}"])
@pytest.mark.parametrize("stage", ["fake-quant", "int-sim"])
def test_reannotating_realized_widths_is_typed(text, stage):
    gm = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _run(gm, f"graph(fold-batch-norm,{QUANT},calibrate"
                 + (",lower-to-int-sim)" if stage == "int-sim" else ")"))
        before = qpasses.report(gm)
        with pytest.raises(AnnotationError, match="already realized.*float graph"):
            _run(gm, f"graph({text})", assume=gm)
    assert qpasses.report(gm)["layers"] == before["layers"]


# -- typed errors ---------------------------------------------------------------------------------

def test_huge_budget_is_an_option_error():
    with pytest.raises(OptionError, match="beyond any model"):
        PassManager.parse("graph(annotate-bitwidths,solve-bitwidths{target-bitops=1e308})")


def test_pact_alpha_must_be_finite():
    for v in ("inf", "nan", "0"):
        with pytest.raises((OptionError, PipelineParseError), match="pact-alpha"):
            PassManager.parse(f"graph(annotate-bitwidths,insert-fake-quant{{act-scheme=pact "
                              f"pact-alpha={v}}})")


@pytest.mark.parametrize("batch, match", [
    (torch.randn(2, 5, 8, 8), r"batch 0 .*shape \(2, 5, 8, 8\).*Nx3x8x8"),
    (torch.randn(2, 3, 8), r"batch 0 .*shape"),
    (torch.randint(0, 4, (2, 3, 8, 8)), r"batch 0 .*dtype torch.int64.*float32"),
])
def test_malformed_calibration_batches_are_typed(batch, match):
    gm = _tiny()
    with pytest.raises(CalibrationError, match=match):
        _run(gm, f"graph({QUANT},calibrate)", data=[X, batch][1:])


def test_a_raising_iterator_is_a_calibration_error_with_the_cause():
    def batches():
        yield X
        raise ValueError("disk gone")

    gm = _tiny()
    with pytest.raises(CalibrationError, match="batch 1.*disk gone") as info:
        _run(gm, f"graph({QUANT},calibrate)", data=batches())
    causes, e = [], info.value
    while e is not None and len(causes) < 10:
        causes.append(e)
        e = e.__cause__ if e.__cause__ is not e else None
    assert any(isinstance(c, ValueError) and str(c) == "disk gone" for c in causes)


def test_keyboard_interrupt_in_the_iterator_is_not_swallowed():
    def batches():
        yield X
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(_tiny(), f"graph({QUANT},calibrate)", data=batches())


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.c(torch.relu(self.c(x))).mean((2, 3)))


def test_one_conv_called_twice_quantizes_and_lowering_is_typed():
    gm = qpasses.trace(_Twice().eval(), X)
    _run(gm, f"graph({QUANT},calibrate)")
    assert gm(X).shape == (2, 2)              # the fake-quant graph computes it
    with pytest.raises(AnnotationError, match="'c' is one module called 2 times"):
        _run(gm, "graph(lower-to-int-sim)", assume=gm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_are_typed_at_lowering(dtype):
    torch.manual_seed(0)
    x = X.to(dtype)
    gm = qpasses.trace(TinyCNN().eval().to(dtype), x)
    with pytest.raises(InputError, match="model.float"), warnings.catch_warnings(), \
            PassContext(example_inputs=(x,), calibration_data=[x]):
        warnings.simplefilter("ignore")
        PassManager.parse("graph(default)").run(gm)


@pytest.mark.parametrize("bits", [24, 25, 32])
def test_act_bits_beyond_int_sim_range_are_typed(bits):
    gm = _tiny()
    text = (f"graph(fold-batch-norm,annotate-bitwidths{{act-bits={bits} first-last-bits=none}},"
            "insert-fake-quant,calibrate,lower-to-int-sim)")
    if bits <= 24:
        _run(gm, text)
        return
    with pytest.raises(AnnotationError, match=f"{bits}-bit.*up to 24 bits"):
        _run(gm, text)


# -- usability -------------------------------------------------------------------------------------

def test_unfolded_batch_norm_warns_once_naming_it():
    with pytest.warns(QpassesWarning, match="bn1") as rec:
        _run(_tiny(), f"graph({QUANT},calibrate)")
    msgs = [str(w.message) for w in rec if "BatchNorm" in str(w.message)]
    assert len(msgs) == 1 and "run fold-batch-norm" in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", QpassesWarning)
        _run(_tiny(), f"graph(fold-batch-norm,{QUANT},calibrate)")


def test_solver_prints_nothing(capfd):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    gm = qpasses.trace(torchvision.models.resnet18().eval(), x)
    with PassContext(example_inputs=(x,)):
        PassManager.parse("graph(fold-batch-norm,annotate-bitwidths{granularity=kernel})").run(gm)
        target = qpasses.report(gm)["totals"]["bitops"] * 0.7 / 1e9
        PassManager.parse(f"graph(solve-bitwidths{{granularity=kernel method=milp "
                          f"target-bitops={target!r}}})", assume=gm).run(gm)
    out, _ = capfd.readouterr()
    assert out == ""




def test_batch_norm_that_no_fold_can_reach_says_so():
    """Pre-activation BN (DenseNet style: not after a conv) is named, and the warning does not
    send the user to fold-batch-norm, which cannot fold it."""
    class PreAct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(torch.relu(self.bn(x)))

    gm = qpasses.trace(PreAct().eval(), (torch.randn(1, 3, 8, 8),))
    with pytest.warns(QpassesWarning, match="cannot fold them") as rec:
        PassManager.parse("graph(fold-batch-norm,annotate-bitwidths)").run(gm)
    assert any("(bn)" in str(w.message) for w in rec)
