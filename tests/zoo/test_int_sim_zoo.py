"""Issue 14, zoo part: torchvision classifiers end in an integer graph with no float island.

A sample of families (plain and inverted residual CNNs, squeeze-excitation, dense concatenation
with pre-activation BatchNorm, grouped and channel-shuffled blocks, ConvNeXt with LayerNorm and
layer scale, the vision transformer with decomposed attention; Swin V2 with shifted-window cosine
attention in its own test), seeded random weights at the
smallest input (``tools.zoo_models.build``), through the default pipeline (W4A8, 8-bit first/last
layers) and the W8A8 ``ptq-int8`` variant, then ``lower-to-int-sim`` and ``verify-int-sim``
(bit-exact against its oracle, or it raises). Each must have 0 float islands, and the report must
count 100% of its MACs in integer layers, checked against an independent count:
``torch.utils.flop_counter.FlopCounterMode`` on the original model (FLOPs / 2 / batch: the report
counts MACs per sample).

The whole zoo (80 models, about half an hour here) is swept by ``python -m tools.zoo_int_sim``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.report import report
from tools.zoo_models import build

PIPELINES = {"default": "graph(default)",
             "w8a8": "graph(ptq-int8,lower-to-int-sim,verify-int-sim)"}
CASES = [("resnet18", "default"), ("mobilenet_v3_small", "default"),
         ("efficientnet_b0", "w8a8"), ("regnet_x_400mf", "default"),
         ("shufflenet_v2_x0_5", "w8a8"), ("googlenet", "default"), ("convnext_tiny", "default"),
         ("vit_b_16", "default"), ("vit_b_16", "w8a8")]



def _independent_macs(model: torch.nn.Module, x: torch.Tensor) -> int:
    """MACs per sample of conv/linear/matmul ops as torch's FLOP counter sees them."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # the fused attention path is not counted
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return fc.get_total_flops() // 2 // x.shape[0]


@pytest.mark.parametrize("name,widths", CASES)
def test_integer_graph_has_no_float_island(name: str, widths: str):
    model, x = build(name)
    expected_macs = _independent_macs(model, x)
    gm = qpasses.trace(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PassContext(example_inputs=(x,), calibration_data=[x]):
            PassManager.parse(PIPELINES[widths]).run(gm)
    rep = report(gm)
    assert rep["float_islands"] == [], rep["float_islands"][:5]
    totals = rep["totals"]
    assert totals["int_macs"] == totals["macs"] == expected_macs, \
        [r["name"] for r in rep["layers"] if not r["integer"]][:5]
    assert all(r["integer"] for r in rep["layers"])


def test_swin_v2_lowers_to_integers_and_lowering_keeps_the_costs():
    """Swin V2 (shifted windows, cosine attention: integer L2 normalize): 0 float islands, every
    MAC in integer layers, and the same MAC count before and after lowering (an intermediate grid
    once gave a layer its consumer's shape). Not compared with FlopCounterMode: its continuous
    position-bias MLP runs once per forward on a constant table (the counter divides it by the
    batch, the report counts it per sample; lowering folds it into a constant)."""
    model, x = build("swin_v2_t")
    gm = qpasses.trace(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PassContext(example_inputs=(x,), calibration_data=[x]):
            PassManager.parse("graph(canonicalize,fold-batch-norm,dce,annotate-bitwidths{"
                              "weight-bits=4 act-bits=8 first-last-bits=8},insert-fake-quant{"
                              "weight-scheme=symmetric per-channel=true},calibrate)").run(gm)
            before = report(gm)["totals"]["macs"]
            PassManager.parse("graph(lower-to-int-sim,verify-int-sim)", assume=gm).run(gm)
    rep = report(gm)
    assert rep["float_islands"] == [], rep["float_islands"][:5]
    assert rep["totals"]["int_macs"] == rep["totals"]["macs"] == before


def test_swin_costs_count_every_window_of_a_sample():
    """Swin's linears and attention products run on (batch·windows, tokens, C): the report counts
    every window of a sample (rows per sample = leading dim / traced batch), so its MACs equal
    torch's FLOP counter / 2 / batch."""
    model, x = build("swin_t")
    expected_macs = _independent_macs(model, x)
    gm = qpasses.trace(model, x)
    PassManager.parse("graph(canonicalize)").run(gm)
    assert report(gm)["totals"]["macs"] == expected_macs
