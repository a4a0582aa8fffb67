"""qpasses.report: schema from docs/annotations.md and cost numbers checked against hand computation."""
from __future__ import annotations

import json

import torch
import torchvision
from torch import nn

import qpasses
from passes_registry import PassManager
from qpasses.ir.annotations import QuantSpec, update_qmeta


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


LAYER_KEYS = {"name", "op", "w_bits", "w_bits_per_kernel", "a_bits", "macs", "params", "bitops",
              "size_bits", "acc_bits", "acc_bits_data", "pruned_channels", "integer"}


def test_schema_and_float_costs():
    gm = qpasses.trace(TwoLayer(), torch.randn(1, 3, 16, 16))
    rep = qpasses.report(gm)
    json.dumps(rep)
    assert set(rep) == {"model", "pipeline", "layers", "totals", "passes", "float_islands"}
    assert rep["float_islands"] == []
    assert rep["model"] == "TwoLayer" and rep["pipeline"] == ""
    layers = {r["name"]: r for r in rep["layers"]}
    assert list(layers) == ["conv", "dw", "fc"]
    for r in rep["layers"]:
        assert set(r) == LAYER_KEYS
        assert r["w_bits"] is None and r["a_bits"] is None and r["acc_bits"] is None
    # conv: C_in/g·C_out·k²·H·W = 3·8·9·8·8; depthwise: 1·8·9·8·8; fc: 8·10
    assert layers["conv"]["macs"] == 3 * 8 * 9 * 64 and layers["conv"]["params"] == 216
    assert layers["dw"]["macs"] == 8 * 9 * 64 and layers["dw"]["op"] == "conv2d-dw"
    assert layers["dw"]["params"] == 72 + 8 and layers["fc"]["macs"] == 80
    assert layers["conv"]["bitops"] == layers["conv"]["macs"] * 32 * 32
    assert layers["fc"]["size_bits"] == (80 + 10) * 32
    assert rep["totals"]["macs"] == sum(r["macs"] for r in rep["layers"])


def test_bit_annotations_drive_costs_and_first_layer_input_counts_8_bits():
    gm = qpasses.trace(TwoLayer(), torch.randn(1, 3, 16, 16))
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    u4 = QuantSpec(bits=4, signed=False, scheme="unsigned")
    update_qmeta(nodes["conv"], weight=QuantSpec(bits=8), act=QuantSpec(bits=8))
    update_qmeta(nodes["dw"], weight=QuantSpec(bits=4, bits_per_kernel=(4, 4, 2, 2, 0, 0, 3, 3)),
                 act=u4, pruned_channels=(4, 5))
    update_qmeta(nodes["fc"], weight=QuantSpec(bits=3), act=u4)
    layers = {r["name"]: r for r in qpasses.report(gm)["layers"]}
    assert layers["conv"]["bitops"] == 3 * 8 * 9 * 64 * 8 * 8
    per_kernel_macs = 9 * 64
    assert layers["dw"]["bitops"] == per_kernel_macs * 4 * (4 + 4 + 2 + 2 + 0 + 0 + 3 + 3)
    assert layers["dw"]["w_bits_per_kernel"] == [4, 4, 2, 2, 0, 0, 3, 3]
    assert layers["dw"]["size_bits"] == 9 * 18 + 8 * 32 and layers["dw"]["pruned_channels"] == 2
    assert layers["fc"]["bitops"] == 80 * 3 * 4
    # worst case |acc| for W3 signed x A4 unsigned over 8 products: 8·4·15 = 480 -> 10 bits
    assert layers["fc"]["acc_bits"] == 10


def test_report_records_pipeline_and_pass_timings():
    gm = qpasses.trace(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    import tests.fake_passes  # noqa: F401  (registers test-infra-mark)
    pm = PassManager.parse("graph(test-infra-mark)")
    pm.run(gm)
    rep = qpasses.report(gm)
    assert rep["pipeline"] == str(pm)
    assert rep["passes"][0]["name"] == "test-infra-mark" and rep["passes"][0]["seconds"] >= 0
    assert len(rep["layers"]) == 21 and rep["totals"]["params"] == sum(
        p.numel() for n, p in gm.named_parameters() if "bn" not in n and "downsample.1" not in n)
    assert "TOTAL" in qpasses.format_table(rep)
