"""Cost analyses (macs, bitops, model-size) through trace + annotate + the analysis manager:
FracBits' reference numbers (docs/algorithms.md, "FracBits"), exactness for per-kernel / grouped / pruned
layers, the differentiable cost model, caching/invalidation and bad input."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import qpasses
from passes_registry import (AnalysisError, AnalysisManager, Instrument, Pass, PassContext,
                             PassManager, PassResult, PreservedAnalyses, register_pass)
from qpasses.algorithms import cost_model as cm
from qpasses.ir.annotations import QuantSpec, update_qmeta
from qpasses.analyses.bitops import BitopsResult
from qpasses.analyses.model_size import ModelSizeResult

from .cost_helpers import annotate, traced

# FracBits (GBitOPs at b = 2, 3, 4, 5; MB at b = 2, 3, 4 weight-only)
REFERENCE = {
    "resnet18": (1_814_073_344, (14.343, 22.825, 34.698, 49.962), None),
    "mobilenet_v1": (568_740_352, (2.938, 5.730, 9.636, 14.657), (1.825, 2.223, 2.621)),
    "mobilenet_v2": (300_774_272, (1.869, 3.322, 5.353, 7.961), (1.832, 2.106, 2.379)),
}


@pytest.mark.parametrize("model", sorted(REFERENCE))
def test_fracbits_reference_numbers_through_the_graph(model):
    """Uniform b bits, first/last pinned to 8 by annotate-bitwidths, costs from print<...>."""
    total_macs, gbitops, mb = REFERENCE[model]
    gm = traced(model)
    for i, b in enumerate((2, 3, 4, 5)):
        annotate(gm, f"annotate-bitwidths{{weight-bits={b} act-bits={b} first-last-bits=8}}")
        am = AnalysisManager()
        assert am.get("macs", gm).total == total_macs
        bitops = am.get("bitops", gm)
        assert isinstance(bitops, BitopsResult)
        assert round(bitops.total / 1e9, 3) == pytest.approx(gbitops[i], abs=1e-9), (model, b)
        assert bitops.total_alive_macs == total_macs
        if mb is not None and b <= 4:
            size = am.get("model-size", gm)
            assert isinstance(size, ModelSizeResult)
            assert round(size.mb, 3) == pytest.approx(mb[i], abs=1e-9), (model, b)
        if b == 3:  # the report reads the same analyses: it agrees by construction
            rep = qpasses.report(gm, am)
            assert rep["totals"]["bitops"] == bitops.total
            assert rep["totals"]["macs"] == total_macs


def test_fc_counted_8x8_would_not_match_the_paper():
    """Pinning the FC *input* too (8x8) gives 22.846 for ResNet-18 at b = 3, not 22.83."""
    gm = annotate(traced("resnet18"),
                  "annotate-bitwidths{weight-bits=3 act-bits=3 first-last-bits=8}")
    update_qmeta(next(n for n in gm.graph.nodes if n.target == "fc"),
                 act=QuantSpec(bits=8, signed=False, scheme="unsigned"))
    assert round(AnalysisManager().get("bitops", gm).total / 1e9, 3) == 22.846


def test_print_analyses_and_report_table():
    gm = annotate(traced("resnet18", 32),
                  "annotate-bitwidths{weight-bits=4 act-bits=4 granularity=kernel}")
    buf = io.StringIO()
    with PassContext(print_stream=buf):
        PassManager.parse("graph(print<macs>,print<bitops>,print<model-size>,print<acc-width>,"
                          "print<cost-layers>)", assume=gm).run(gm)
    text = buf.getvalue()
    for head in ("// ----- macs -----", "// ----- bitops -----", "// ----- model-size -----",
                 "// ----- acc-width -----", "GBitOPs", "MB (MB = 1e6 bytes)"):
        assert head in text
    table = qpasses.format_table(qpasses.report(gm))
    assert "per-kernel weight bit-widths" in table and "layer4.1.conv2" in table


# ---------------------------------------------------------------------------------------------
# Exactness: per-kernel bits, groups, pruned kernels and pruned input channels

class Branchy(nn.Module):
    """conv(+bias) -> bn -> relu -> grouped conv; a residual add; a channel concat; linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.g = nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False)
        self.b = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        ya = torch.relu(self.bn(self.a(x)))
        s = ya + self.b(x)                       # residual add: dead only where both are dead
        z = torch.cat([self.g(ya), self.dw(s), x[:, :2]], dim=1)   # 6 + 8 + 2 = 16 channels
        return self.fc(torch.flatten(self.c(z), 1))


def _explicit_bitops(c_in, c_out, groups, k, hw, in_alive, w_bits, a_bits):
    """Σ over (output o, input i) pairs in the same group, alive input i: k·hw·w_o·a."""
    per_in, per_out = c_in // groups, c_out // groups
    return sum(k * hw * w_bits[o] * a_bits for o in range(c_out) for i in range(c_in)
               if o // per_out == i // per_in and in_alive[i])


def test_per_kernel_grouped_and_pruned_inputs_are_exact():
    gm = qpasses.trace(Branchy(), torch.randn(1, 3, 5, 5))
    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    u4 = QuantSpec(bits=4, signed=False, scheme="unsigned")
    s8 = QuantSpec(bits=8)
    a_bits_a = (4, 0, 4, 2, 4, 0, 3, 4)          # kernels 1 and 5 of 'a' pruned
    update_qmeta(nodes["a"], weight=QuantSpec(bits=4, bits_per_kernel=a_bits_a), act=s8)
    update_qmeta(nodes["b"], weight=QuantSpec(bits=3, bits_per_kernel=(3, 3, 3, 3, 3, 0, 3, 3)),
                 act=s8)                          # b kills 5 as well, 1 stays alive
    update_qmeta(nodes["g"], weight=QuantSpec(bits=5, bits_per_kernel=(5, 4, 3, 2, 1, 5)),
                 act=u4)
    update_qmeta(nodes["dw"], weight=QuantSpec(bits=6, bits_per_kernel=(6,) * 7 + (0,)),
                 act=QuantSpec(bits=6))           # output channel 7: 0 bits
    update_qmeta(nodes["c"], weight=QuantSpec(bits=2), act=QuantSpec(bits=3))
    am = AnalysisManager()
    res = am.get("bitops", gm)
    layers = am.get("cost-layers", gm)
    # g reads relu(bn(a)): inputs 1 and 5 dead
    g_alive = [i not in (1, 5) for i in range(8)]
    assert layers["g"].in_alive == tuple(g_alive)
    assert res["g"].bitops == _explicit_bitops(8, 6, 2, 9, 25, g_alive, (5, 4, 3, 2, 1, 5), 4)
    assert res["g"].kernel_bitops is not None and sum(res["g"].kernel_bitops) == res["g"].bitops
    # dw reads a + b: only channel 5 is dead in both addends
    dw_alive = [i != 5 for i in range(8)]
    assert layers["dw"].in_alive == tuple(dw_alive)
    dw_w = [6] * 7 + [0]
    assert res["dw"].bitops == _explicit_bitops(8, 8, 8, 9, 25, dw_alive, dw_w, 6)
    # c reads cat(g: all alive, dw: kernel 7 at 0 bits, x[:, :2]: not a layer -> alive)
    c_alive = [True] * 6 + [i != 7 for i in range(8)] + [True, True]
    assert layers["c"].in_alive == tuple(c_alive)
    assert res["c"].bitops == _explicit_bitops(16, 4, 1, 1, 25, c_alive, [2] * 4, 3)
    # a is a first layer: its input counts as 8 bits whatever the annotation
    assert res["a"].counted_a_bits == 8
    assert res["a"].bitops == _explicit_bitops(3, 8, 1, 9, 25, [True] * 3, a_bits_a, 8)
    # fc: no annotation -> fp32 (32 x 32); propagation stops at flatten (conservative)
    assert res["fc"].float_layer and res["fc"].bitops == 100 * 3 * 32 * 32
    assert res.total == sum(r.bitops for r in res.rows)
    # alive MACs: dense minus pruned kernels and dead inputs
    assert res["g"].alive_macs == _explicit_bitops(8, 6, 2, 9, 25, g_alive, [1] * 6, 1)
    # model size: weights on dead inputs and of pruned kernels cost nothing, biases fp32
    size = am.get("model-size", gm)
    assert size["g"].size_bits == sum(9 * b * sum(g_alive[(o // 3) * 4 + i] for i in range(4))
                                      for o, b in enumerate((5, 4, 3, 2, 1, 5)))
    assert size["dw"].size_bits == 9 * 6 * 6 + 8 * 32   # kernel 5: dead input, 7: 0 bits
    assert size["a"].size_bits == 27 * sum(a_bits_a) + 8 * 32
    assert size.total_bits == sum(r.size_bits for r in size.rows)


def test_macs_are_dense_and_structure_only():
    gm = qpasses.trace(Branchy(), torch.randn(1, 3, 5, 5))
    annotate(gm, "annotate-bitwidths{weight-bits=4 act-bits=4}")
    m = AnalysisManager().get("macs", gm)
    assert m["g"].macs == 4 * 6 * 9 * 25 and m["dw"].macs == 8 * 9 * 25
    assert m["fc"].macs == 100 * 3 and m.total == sum(r.macs for r in m.rows)
    assert qpasses.analyses.macs.MacsAnalysis.depends_on == frozenset({"structure"})


def test_cost_model_is_differentiable_and_matches_integer_bits():
    gm = annotate(traced("mobilenet_v2", 64),
                  "annotate-bitwidths{weight-bits=3 act-bits=3 granularity=kernel}")
    layers = cm.cost_layers(gm)
    w_int, a_int = cm.annotated_bits(gm)
    exact = AnalysisManager().get("bitops", gm).total
    assert int(cm.model_bitops(layers, w_int, a_int)) == exact
    # trainable λ: per-kernel for weights, scalar for activations
    lam_w = {k: torch.tensor(v, dtype=torch.float32, requires_grad=True) for k, v in w_int.items()}
    lam_a = {k: torch.tensor(float(v), requires_grad=True) for k, v in a_int.items()}
    total, parts = cm.model_bitops(layers, lam_w, lam_a, per_layer=True)
    assert total.dtype == torch.float64 and float(total.detach()) == pytest.approx(exact, rel=1e-12)
    total.backward()
    name = "features.3.conv.1.0"                  # a depthwise conv
    layer = next(c for c in layers if c.name == name)
    assert torch.allclose(lam_w[name].grad.double(),
                          layer.kernel_macs().double() * a_int[name])
    assert float(lam_a[name].grad) == pytest.approx(float(layer.kernel_macs().double()
                                                          @ torch.tensor(w_int[name]).double()))
    first = next(c for c in layers if c.first)
    assert lam_a[first.name].grad is None   # the first layer's input is counted as 8
    size = cm.model_size_bits(layers, lam_w)
    assert float(size.detach()) == pytest.approx(AnalysisManager().get("model-size", gm).total_bits)
    # GMPQ/EdMIPS conventions: stem and classifier out of BitOPs
    gmpq = cm.model_bitops(layers, w_int, a_int, cm.GMPQ)
    stem_fc = sum(int(cm.layer_bitops(c, w_int, a_int)) for c in layers if c.first or c.last)
    assert int(gmpq) == exact - stem_fc
    with pytest.raises(qpasses.errors.NumericsError, match="did you mean"):
        cm.model_bitops(layers, {"features.3.conv.1.1": 4}, {})


# ---------------------------------------------------------------------------------------------
# Caching and invalidation

class Counting(Instrument):
    def __init__(self):
        self.computed: list[str] = []

    def before_analysis(self, name, gm):
        self.computed.append(name)


@register_pass
class _ScaleWeights(Pass):
    """Test pass: doubles the first conv's weights (touches weights only)."""
    name = "test-cost-scale-weights"
    preserves = PreservedAnalyses.unaffected_by("weights")

    def run(self, gm, ctx, am):
        with torch.no_grad():
            next(p for p in gm.parameters() if p.dim() == 4).mul_(2.0)
        return PassResult(modified=True)


def test_analyses_are_cached_and_invalidated_by_what_they_depend_on():
    gm = qpasses.trace(Branchy(), torch.randn(1, 3, 5, 5))
    inst = Counting()
    text = ("graph(annotate-bitwidths{weight-bits=4 act-bits=4},"
            "require<macs>,require<bitops>,require<model-size>,require<acc-width>,"
            "print<bitops>,print<macs>,"                  # cache hits: nothing recomputed
            "test-cost-scale-weights,"                    # weights only
            "print<bitops>,print<acc-width>,"             # only acc-width recomputed
            "annotate-bitwidths{weight-bits=3 act-bits=4},"  # annotations
            "print<macs>,print<bitops>)")                  # macs kept, bitops recomputed
    with PassContext(instruments=(inst,), print_stream=io.StringIO()):
        PassManager.parse(text).run(gm)
    c = inst.computed
    assert c.count("macs") == 1                      # structure never changed
    assert c.count("acc-width") == 2                 # recomputed after the weight change
    assert c.count("bitops") == 2                    # kept across the weight pass
    assert c.count("cost-layers") == 2               # its dependency, same story
    assert c.count("model-size") == 1


def test_stale_fingerprint_caught_and_results_compare_equal():
    gm = annotate(qpasses.trace(Branchy(), torch.randn(1, 3, 5, 5)))
    r1 = AnalysisManager().get("bitops", gm)
    r2 = AnalysisManager().get("bitops", gm)
    assert r1 == r2 and r1 is not r2
    a1, a2 = AnalysisManager().get("acc-width", gm), AnalysisManager().get("acc-width", gm)
    assert a1 == a2
    # check-preservation recomputes preserved analyses and compares them with ==
    with PassContext(check_preservation=True, print_stream=io.StringIO()):
        PassManager.parse("graph(require<bitops>,require<macs>,test-cost-scale-weights,"
                          "print<bitops>)", assume=gm).run(gm)


# ---------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("analysis", ["bitops", "model-size", "acc-width"])
def test_analysis_without_annotations_names_the_providing_pass(analysis):
    gm = qpasses.trace(Branchy(), torch.randn(1, 3, 5, 5))
    with pytest.raises(AnalysisError, match="annotate-bitwidths") as e:
        PassManager.parse(f"graph(print<{analysis}>)").run(gm)
    assert analysis in str(e.value)
    # macs needs no annotation, and the report of a float graph counts fp32
    AnalysisManager().get("macs", gm)
    rep = qpasses.report(gm)
    assert rep["layers"][0]["bitops"] == rep["layers"][0]["macs"] * 32 * 32


def test_cost_model_rejects_bad_bits():
    gm = annotate(qpasses.trace(Branchy(), torch.randn(1, 3, 5, 5)))
    layers = cm.cost_layers(gm)
    with pytest.raises(qpasses.errors.NumericsError, match=">= 0"):
        cm.model_bitops(layers, {"g": -1}, {})
    with pytest.raises(qpasses.errors.NumericsError, match="entries for 6"):
        cm.model_bitops(layers, {"g": [4, 4]}, {})
    with pytest.raises(qpasses.errors.NumericsError, match="scalar"):
        cm.model_bitops(layers, {}, {"g": [4, 4]})
    assert math.isclose(float(cm.model_bitops(layers, {"g": 2.5}, {"g": 3.5})),
                        float(cm.model_bitops(layers, {"g": 2.5}, {"g": 3.5})))


class _PrunableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def test_planned_pruning_costs_equal_the_physically_pruned_graph():
    """0-bit kernels cost nothing and remove the consumers' inputs; after
    prune-zero-bit-channels removes them (pruned_channels then holds original indices, which
    must not be counted again), dense MACs, BitOPs and size are the same numbers."""
    gm = qpasses.trace(_PrunableNet(), torch.randn(1, 3, 6, 6))
    annotate(gm, "annotate-bitwidths{weight-bits=4 act-bits=4 granularity=kernel}")
    node = next(n for n in gm.graph.nodes if n.target == "a")
    from qpasses.ir.annotations import get_qmeta
    spec = get_qmeta(node).weight
    update_qmeta(node, weight=spec.replace(bits_per_kernel=(8, 8, 0, 8, 8, 0, 8, 8), bits=8))
    am = AnalysisManager()
    before_b, before_s = am.get("bitops", gm), am.get("model-size", gm)
    assert before_b["b"].alive_macs == 6 * 6 * 9 * 36 < am.get("macs", gm)["b"].macs
    with PassContext(example_inputs=(torch.randn(1, 3, 6, 6),), print_stream=io.StringIO()):
        PassManager.parse("graph(prune-zero-bit-channels)", assume=gm).run(gm)
    assert get_qmeta(node).pruned_channels == (2, 5)
    am = AnalysisManager()
    after_b, after_s = am.get("bitops", gm), am.get("model-size", gm)
    assert am.get("macs", gm).total == before_b.total_alive_macs == after_b.total_alive_macs
    assert after_b.total == before_b.total and after_s.total_bits == before_s.total_bits
    assert qpasses.report(gm)["layers"][0]["pruned_channels"] == 2
