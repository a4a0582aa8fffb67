"""Real-data accuracy of an integer-only vision transformer (issue 14): the session's small ViT
trained on scikit-learn's digits (tests/conftest.py ``digits_vit``; 450 held-out images, one image
is 0.22 points), quantized, lowered to the integer graph and checked against its oracle.

- W8A8 (``ptq-int8``): no float island, int-sim top-1 within 0.5 points of fp32 and >= 99% top-1
  agreement with its fake-quant graph;
- W4A8 (the default pipeline's widths, 8-bit first/last layers): reported (printed and attached
  as a junit property), with no float island.
"""
from __future__ import annotations

import copy

import pytest

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.report import report
from tests.conftest import accuracy

LOWER = "lower-to-int-sim,verify-int-sim{samples=8}"
QUANT = {
    "W8A8": "ptq-int8",
    "W4A8": ("canonicalize,fold-batch-norm,dce,annotate-bitwidths{weight-bits=4 act-bits=8 "
             "first-last-bits=8},insert-fake-quant{weight-scheme=symmetric per-channel=true},"
             "calibrate"),
}


def _lowered(d, quant: str):
    gm = qpasses.trace(d.model, d.x_test[:1])
    with PassContext(calibration_data=d.batches(4), example_inputs=(d.x_test[:8],)):
        PassManager.parse(f"graph({quant})").run(gm)
        fq = copy.deepcopy(gm).eval()
        PassManager.parse(f"graph({LOWER})", assume=gm).run(gm)
    return fq, gm.eval()


@pytest.mark.parametrize("widths", sorted(QUANT))
def test_integer_vit_accuracy(digits_vit, widths, record_property):
    d = digits_vit
    fq, gm = _lowered(d, QUANT[widths])
    islands = report(gm)["float_islands"]
    assert islands == [], islands
    rec = get_record(gm, INT_SIM_KEY)
    assert rec.verify is not None and rec.verify["num_nodes_checked"] > 0  # it raises if not exact
    acc_fq = accuracy(fq, d.x_test, d.y_test)
    acc_int = accuracy(gm, d.x_test, d.y_test)
    agree = 100.0 * float((fq(d.x_test).argmax(1) == gm(d.x_test).argmax(1)).float().mean())
    line = (f"digits ViT fp32 {d.fp32_acc:.2f}% (trained in {d.train_seconds:.1f}s); {widths}: "
            f"fake-quant {acc_fq:.2f}%, int-sim {acc_int:.2f}%, top-1 agreement {agree:.2f}%")
    print("\n" + line)
    record_property(f"vit_{widths}", line)
    assert d.fp32_acc > 90.0
    if widths == "W8A8":
        assert d.fp32_acc - acc_int <= 0.5, line
        assert agree >= 99.0, line
