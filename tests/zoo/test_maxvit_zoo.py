"""Issue 14, MaxViT: torchvision's MaxVit (MBConv with squeeze-excitation, block and grid
relative-position attention written with ``torch.einsum``) through ``graph(default)`` lowers with
no float island and verify-int-sim finds it bit-exact against the independent oracle.

A tiny MaxVit built from torchvision's own class (32x32 input, 2 stages of 1 block, 8/16 channels,
head_dim 4, partition 2: every layer type of ``maxvit_t``, ~4 s here); the full ``maxvit_t`` at
224x224 is swept by ``python -m tools.zoo_int_sim --models maxvit_t``. The einsum products become
``torch.matmul`` (canonicalize's ``einsum`` rule) and the relative position bias a folded constant;
the report must count 100% of the MACs in integer layers, checked against torch's FLOP counter on
the original model."""
from __future__ import annotations

import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.maxvit import MaxVit

import qpasses
from passes_registry import PassContext, PassManager, get_record
from qpasses.ir.records import INT_SIM_KEY
from qpasses.report import report


def _tiny_maxvit() -> MaxVit:
    torch.manual_seed(0)
    model = MaxVit(input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[8, 16],
                   block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=10)
    with torch.no_grad():  # non-trivial weights and BatchNorm statistics
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model.eval()


def test_tiny_maxvit_lowers_without_float_islands() -> None:
    model, x = _tiny_maxvit(), torch.randn(2, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    gm = qpasses.trace(model, x)
    assert sum(n.target is torch.einsum for n in gm.graph.nodes) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PassContext(example_inputs=(x,), calibration_data=[x]):
            PassManager.parse("graph(default)").run(gm)
    rep = report(gm)
    assert rep["float_islands"] == [], rep["float_islands"][:5]
    assert rep["totals"]["int_macs"] == rep["totals"]["macs"] == fc.get_total_flops() // 2 // 2
    rec = get_record(gm, INT_SIM_KEY)
    assert list(rec.float_islands) == []
    assert rec.verify["oracle"] == "independent" and rec.verify["num_nodes_checked"] > 150
