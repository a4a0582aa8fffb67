"""prune-zero-bit-channels: exact removal, constant channels (ReLU-zeroed, folded, kept in padded
convs, approximate folds with the measured deviation), partial groups, the keep-one guard,
QMeta/shape/report updates, chunk/view rewrites, functional layers, fake-quant graphs, typed
errors and notes, equivalence (hypothesis) on torchvision models and random DAGs, the MobileNetV2
>= 30% case and the ResNet-50 timing."""
from __future__ import annotations

import copy
import io
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import (AnalysisManager, OptionError, PassContext, PassManager,
                             parse_pipeline, pass_names, print_graph)
from qpasses import get_qmeta
from qpasses.errors import AnnotationError, InputError
from qpasses.analyses.channel_groups import compute_channel_groups
from passes_registry import get_record
from qpasses.ir.records import PRUNE_LOG_KEY, PruneLog
from qpasses.passes.prune_zero_bit_channels import PruneZeroBitChannels

from .prune_util import (assert_same, layer_nodes, measured_macs, random_bits, randomize_bn, run,
                         set_bits, single_thread, trace_folded)

HYP = settings(max_examples=5, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with single_thread():
        yield


def prune(gm, mode="exact", inputs=None, statistics=False, stream=None):
    ctx = PassContext(example_inputs=inputs, statistics=statistics, print_stream=stream)
    return PassManager.parse(f"graph(prune-zero-bit-channels{{mode={mode}}})").run(gm, ctx)


def prune_stats(gm, mode="exact"):
    res = PruneZeroBitChannels(mode=mode).run(gm, PassContext(), AnalysisManager())
    gm.recompile()
    return res


def bits_for(gm, **named):
    """{layer node: bits} with defaults of 4 for unnamed layers."""
    out = {}
    for name, (_, info) in layer_nodes(gm).items():
        out[name] = np.array(named.get(name, [4] * info.out_channels))
    return out


# ---------------------------------------------------------------------------------------------
# small models


class Chain(nn.Module):
    """conv(3->6, no bias) -> relu -> conv(6->4, 3x3 pad 1) -> flatten -> linear."""

    def __init__(self, bias=False, pad=1, k=3):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1, bias=bias)
        self.b = nn.Conv2d(6, 4, k, padding=pad)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def chain(bias=False, pad=1, k=3, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2, 3, 8, 8)
    m = Chain(bias, pad, k)
    return qpasses.trace(m, (x,)), x, m


def test_removes_zero_bit_channels_exactly_and_updates_everything():
    gm, x, model = chain()
    before_w = model.a.weight.detach().clone()
    set_bits(gm, bits_for(gm, a=[4, 0, 2, 0, 0, 3]))
    y0 = run(gm, x)
    rep0 = qpasses.report(gm)
    prune(gm, inputs=(x,))
    assert gm.a.weight.shape == (3, 3, 3, 3) and gm.a.out_channels == 3
    assert gm.b.weight.shape == (4, 3, 3, 3) and gm.b.in_channels == 3
    q = get_qmeta(next(n for n in gm.graph.nodes if n.name == "a"))
    assert q.weight.bits_per_kernel == (4, 2, 3) and q.pruned_channels == (1, 3, 4)
    assert "prune-zero-bit-channels" in q.origin
    assert_same(run(gm, x), y0)
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
              if "tensor_meta" in n.meta and hasattr(n.meta["tensor_meta"], "shape")}
    assert shapes["a"] == (2, 3, 8, 8) and shapes["relu"] == (2, 3, 8, 8)
    rep = qpasses.report(gm)
    rows = {r["name"]: r for r in rep["layers"]}
    assert rows["a"]["pruned_channels"] == 3 and rows["b"]["pruned_channels"] == 0
    # dense counts drop; BitOPs and size already discounted the 0-bit (dead) channels before
    # pruning (the cost model counts planned pruning), so they must not grow
    for k in ("macs", "params"):
        assert rep["totals"][k] < rep0["totals"][k]
    for k in ("bitops", "size_bits"):
        assert rep["totals"][k] <= rep0["totals"][k]
    assert rows["a"]["macs"] == 3 * 27 * 64 and rows["b"]["macs"] == 4 * 27 * 64
    assert "pruned=3" in print_graph(gm)
    assert torch.equal(model.a.weight, before_w)   # the user's model is never touched
    log = get_record(gm, PRUNE_LOG_KEY).entries
    assert {"layer": "a", "node": "a", "mode": "exact", "removed": [1, 3, 4], "kept": []} in log


@pytest.mark.parametrize("which", ["chain", "chunk-shuffle"])
def test_shapes_without_example_inputs_match_shape_propagation(which):
    if which == "chain":
        gm, x, _ = chain()
        set_bits(gm, bits_for(gm, a=[0, 4, 0, 4, 4, 4]))
    else:
        torch.manual_seed(0)
        x = torch.randn(2, 3, 4, 4)
        gm = qpasses.trace(ChunkShuffle(), (x,))
        set_bits(gm, bits_for(gm, a=[0, 4, 4, 4, 4, 4, 4, 4], b=[4, 0, 4, 4], c=[4, 0, 4, 4]))
    g1, g2 = copy.deepcopy(gm), copy.deepcopy(gm)
    prune(g1)                        # arithmetic shape update
    prune(g2, inputs=(x,))           # shape propagation
    s1 = {n.name: n.meta.get("tensor_meta") for n in g1.graph.nodes}
    s2 = {n.name: n.meta.get("tensor_meta") for n in g2.graph.nodes}
    for k, v in s2.items():
        if hasattr(v, "shape"):
            assert tuple(s1[k].shape) == tuple(v.shape), k
        elif isinstance(v, (list, tuple)):
            assert [tuple(t.shape) for t in s1[k]] == [tuple(t.shape) for t in v], k


def test_repeated_runs_record_original_indices():
    gm, x, _ = chain()
    set_bits(gm, bits_for(gm, a=[4, 0, 4, 4, 0, 4]))
    y0 = run(gm, x)
    prune(gm)
    assert_same(run(gm, x), y0)
    node = next(n for n in gm.graph.nodes if n.name == "a")
    assert get_qmeta(node).pruned_channels == (1, 4)
    set_bits(gm, {"a": np.array([4, 0, 4, 4])})   # now original channel 2 goes too
    y1 = run(gm, x)
    prune(gm)
    assert get_qmeta(node).pruned_channels == (1, 2, 4)
    assert get_record(gm, PRUNE_LOG_KEY).entries[-2]["removed"] == [2]
    assert_same(run(gm, x), y1)


# ---------------------------------------------------------------------------------------------
# constant channels: the hard case


def test_negative_bias_before_relu_is_provably_zero():
    gm, x, _ = chain(bias=True)
    with torch.no_grad():
        gm.a.bias.copy_(torch.tensor([0.5, -0.3, 0.2, -1.0, 0.7, 0.1]))
    set_bits(gm, bits_for(gm, a=[0, 0, 4, 0, 4, 4]))
    y0 = run(gm, x)
    res = prune_stats(gm)
    assert gm.a.out_channels == 4                  # channels 1 and 3 (bias <= 0) removed
    assert res.stats["num_channels_removed"] == 2 and res.stats["num_kept_inexact"] == 1
    kept = [e for e in get_record(gm, PRUNE_LOG_KEY).entries if e["layer"] == "a"][0]["kept"]
    assert kept[0]["channel"] == 0 and "zero padding" in kept[0]["reason"] \
        and "layer 'b'" in kept[0]["reason"]
    assert_same(run(gm, x), y0)


@pytest.mark.parametrize("k,pad", [(1, 0), (3, 0)])
def test_positive_constant_folds_exactly_into_unpadded_consumers(k, pad):
    gm, x, _ = chain(bias=True, pad=pad, k=k)
    with torch.no_grad():
        gm.a.bias.copy_(torch.tensor([0.5, 0.3, 0.2, 1.0, 0.7, 0.1]))
    set_bits(gm, bits_for(gm, a=[0, 4, 0, 4, 4, 4]))
    y0 = run(gm, x)
    res = prune_stats(gm)
    assert gm.a.out_channels == 4 and res.stats["num_constants_folded"] == 2
    assert res.stats["num_approx_folds"] == 0
    assert_same(run(gm, x), y0)


def test_fold_into_linear_after_flatten_creates_bias():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(16, 3, bias=False)

        def forward(self, x):
            return self.fc(torch.flatten(F.max_pool2d(torch.relu(self.a(x)), 4), 1))
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8)
    gm = qpasses.trace(M(), (x,))
    with torch.no_grad():
        gm.a.bias.copy_(torch.tensor([0.5, 0.3, -0.2, 1.0]))
    set_bits(gm, bits_for(gm, a=[0, 4, 0, 0]))
    y0 = run(gm, x)
    prune(gm, inputs=(x,))
    assert gm.fc.weight.shape == (3, 4) and gm.fc.bias is not None
    assert_same(run(gm, x), y0)


def test_fold_constant_mode_folds_padded_convs_and_reports_deviation():
    gm, x, _ = chain(bias=True)
    with torch.no_grad():
        gm.a.bias.copy_(torch.tensor([0.5, 0.3, 0.2, 1.0, 0.7, 0.1]))
    set_bits(gm, bits_for(gm, a=[0, 4, 0, 4, 4, 4]))
    y0 = run(gm, x)
    exact = copy.deepcopy(gm)
    prune(exact)
    assert exact.a.out_channels == 6               # exact mode keeps both
    buf = io.StringIO()
    prune(gm, mode="fold-constant", inputs=(x,), statistics=True, stream=buf)
    assert gm.a.out_channels == 4
    rec = [e for e in get_record(gm, PRUNE_LOG_KEY).entries if e["layer"] is None][-1]
    measured = float((run(gm, x) - y0).abs().max())
    assert rec["max_deviation"] == pytest.approx(measured, rel=1e-6, abs=1e-9)
    assert rec["max_deviation"] > 0
    assert "max deviation on example inputs" in buf.getvalue()
    assert "num_approx_folds" in buf.getvalue()


def test_constant_through_avgpool_with_padding_is_inexact_but_zero_is_fine():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.b = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            return self.b(F.avg_pool2d(self.a(x), 3, 1, padding=1)).mean((2, 3))
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 6)
    gm = qpasses.trace(M(), (x,))
    with torch.no_grad():
        gm.a.bias.copy_(torch.tensor([0.0, 0.4, 0.0, 0.3]))
    set_bits(gm, bits_for(gm, a=[0, 0, 4, 4]))
    y0 = run(gm, x)
    prune(gm)
    assert gm.a.out_channels == 3                  # the zero channel goes, the 0.4 one stays
    reason = [e for e in get_record(gm, PRUNE_LOG_KEY).entries if e["layer"] == "a"][0]["kept"][0]["reason"]
    assert "average pool with padding" in reason
    assert_same(run(gm, x), y0)


def test_spatial_attention_zero_stays_zero_constant_does_not():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 1)
            self.att = nn.Conv2d(4, 1, 1)
            self.c = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(y * torch.sigmoid(self.att(y))).mean((2, 3))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    gm = qpasses.trace(M(), (x,))
    with torch.no_grad():
        gm.a.bias.copy_(torch.tensor([-0.5, 0.3, 0.2, 0.1]))
    set_bits(gm, bits_for(gm, a=[0, 0, 4, 4]))
    y0 = run(gm, x)
    prune(gm)
    assert gm.a.out_channels == 3 and gm.att.in_channels == 3 and gm.c.in_channels == 3
    kept = [e for e in get_record(gm, PRUNE_LOG_KEY).entries if e["layer"] == "a"][0]["kept"]
    assert kept[0]["channel"] == 1 and "not constant" in kept[0]["reason"]
    assert_same(run(gm, x), y0)


# ---------------------------------------------------------------------------------------------
# groups, guards, rewrites


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.b = nn.Conv2d(4, 4, 1, bias=False)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        return self.c(torch.relu(self.b(y) + y)).mean((2, 3))


def test_partially_zero_groups_are_kept_and_reported():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 4, 4)
    gm = qpasses.trace(ResBlock(), (x,))
    set_bits(gm, bits_for(gm, a=[0, 0, 4, 4], b=[0, 4, 0, 4]))
    y0 = run(gm, x)
    res = prune_stats(gm)
    assert gm.a.out_channels == 3 and gm.b.out_channels == 3 and gm.b.in_channels == 3
    assert res.stats["num_kept_partial"] == 2
    log = {e["layer"]: e for e in get_record(gm, PRUNE_LOG_KEY).entries if e["layer"]}
    assert log["a"]["kept"][0]["channel"] == 1 and "'b'" in log["a"]["kept"][0]["reason"]
    assert log["b"]["kept"][0]["channel"] == 2 and "'a'" in log["b"]["kept"][0]["reason"]
    assert_same(run(gm, x), y0)


def test_mask_that_would_empty_a_layer_keeps_one_channel():
    gm, x, _ = chain()
    set_bits(gm, bits_for(gm, a=[0] * 6))
    y0 = run(gm, x)
    res = prune_stats(gm)
    assert gm.a.out_channels == 1 and res.stats["num_kept_last"] == 1
    kept = [e for e in get_record(gm, PRUNE_LOG_KEY).entries if e["layer"] == "a"][0]["kept"]
    assert len(kept) == 1 and "last channel" in kept[0]["reason"]
    assert get_qmeta(next(n for n in gm.graph.nodes if n.name == "a")).weight.bits == 0
    assert_same(run(gm, x), y0)


def test_no_per_kernel_annotations_is_a_noop_with_a_note():
    gm, x, _ = chain()
    text = print_graph(gm)
    with pytest.warns(UserWarning, match="no layer has 0-bit kernels"):
        prune(gm)
    assert print_graph(gm) == text
    assert get_record(gm, PRUNE_LOG_KEY).entries[-1]["note"].startswith("no layer has 0-bit kernels")
    # per-layer annotations without zeros: the same no-op
    gm2, _, _ = chain()
    set_bits(gm2, bits_for(gm2))
    with pytest.warns(UserWarning, match="nothing to prune"):
        res = prune_stats(gm2)
    assert not res.modified and res.stats["num_zero_bit_kernels"] == 0


def test_annotation_that_does_not_fit_the_layer_is_a_typed_error():
    gm, x, _ = chain()
    set_bits(gm, {"a": np.array([0, 4, 4])}, zero_weights=False)   # 3 entries, 6 kernels
    with pytest.raises(AnnotationError, match="layer 'a'.*does not fit"):
        prune(gm)


def test_example_inputs_that_do_not_fit_are_a_typed_error_before_any_change():
    gm, x, _ = chain()
    set_bits(gm, bits_for(gm, a=[0, 4, 0, 4, 4, 4]))
    text = print_graph(gm)
    with pytest.raises(InputError, match="example input for 'x' has shape"):
        prune(gm, inputs=(torch.randn(2, 3, 5, 5),))
    assert print_graph(gm) == text
    prune(gm, inputs=(torch.randn(4, 3, 8, 8),))     # another batch size is fine
    assert gm.a.out_channels == 4


def test_graph_without_shapes_needs_example_inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = torch.fx.symbolic_trace(Chain())
    with pytest.raises(InputError, match="no shape information"):
        prune(gm)
    y = run(gm, x)
    with pytest.warns(UserWarning, match="nothing to prune"):
        prune(gm, inputs=(x,))             # shapes are propagated first; nothing annotated
    assert "tensor_meta" in next(iter(gm.graph.nodes)).meta
    assert_same(run(gm, x), y)


def test_bad_option_is_a_typed_error():
    with pytest.raises(OptionError):
        PassManager.parse("graph(prune-zero-bit-channels{mode=approx})")
    p = parse_pipeline("graph(prune-zero-bit-channels{mode=fold-constant})")
    assert parse_pipeline(p.to_text()) == p
    assert "mode=exact" in PassManager.parse("graph(prune-zero-bit-channels)").pipeline.to_text()


class Unmappable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1, bias=False)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.fc = nn.Linear(4 * 16, 2)
        self.fc2 = nn.Linear(4 * 16, 2)

    def forward(self, x):
        y = self.a(x)
        z = y.reshape(y.shape[0] * 4, 16)          # channels merged into the batch dim
        return self.fc(z.reshape(-1, 64)) + self.fc2(torch.flatten(self.b(x), 1))


def test_channels_coupled_across_an_unmappable_reshape_are_kept_and_the_node_named():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    gm = qpasses.trace(Unmappable(), (x,))
    set_bits(gm, bits_for(gm, a=[0, 4, 0, 4], b=[0, 4, 4, 4]))
    y0 = run(gm, x)
    res = prune_stats(gm)
    assert gm.a.out_channels == 4 and gm.b.out_channels == 3
    assert res.stats["num_kept_unsupported"] == 2
    kept = [e for e in get_record(gm, PRUNE_LOG_KEY).entries if e["layer"] == "a"][0]["kept"]
    assert all("'reshape'" in k["reason"] for k in kept)
    assert_same(run(gm, x), y0)


class ChunkShuffle(nn.Module):
    """chunk (becomes split when halves differ), a shuffle with literal view sizes."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.b = nn.Conv2d(4, 4, 1, bias=False)
        self.c = nn.Conv2d(4, 4, 1, bias=False)
        self.d = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        p, q = self.a(x).chunk(2, dim=1)
        y = torch.cat([self.b(p), self.c(q)], 1)
        y = y.view(2, 2, 4, 4, 4).transpose(1, 2).reshape(2, 8, 4, 4)
        return self.d(y).mean((2, 3))


def test_chunk_becomes_split_and_literal_view_sizes_follow():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    gm = qpasses.trace(ChunkShuffle(), (x,))
    set_bits(gm, bits_for(gm, a=[0, 4, 4, 4, 4, 4, 4, 4], b=[4, 0, 4, 4], c=[4, 0, 4, 4]))
    y0 = run(gm, x)
    prune(gm, inputs=(x,))
    assert gm.a.out_channels == 7 and gm.b.out_channels == 3 and gm.c.out_channels == 3
    split = next(n for n in gm.graph.nodes if n.name == "chunk")
    assert split.target is torch.split and split.args[1] == [3, 4]
    view = next(n for n in gm.graph.nodes if n.name == "view")
    assert view.args[1:] == (2, 2, 3, 4, 4)
    assert_same(run(gm, x), y0)


def test_functional_layers_are_pruned_through_their_attributes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(6, 3, 1, 1))
            self.b1 = nn.Parameter(torch.randn(6))
            self.w2 = nn.Parameter(torch.randn(4, 6, 1, 1))
            self.dw = nn.Parameter(torch.randn(4, 1, 3, 3))
            self.fc = nn.Parameter(torch.randn(2, 4))

        def forward(self, x):
            y = torch.relu(F.conv2d(x, self.w1, self.b1))
            y = F.conv2d(F.conv2d(y, self.w2), self.dw, None, 1, 1, 1, 4)
            return F.linear(y.mean((2, 3)), self.fc)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    gm = qpasses.trace(M(), (x,))
    names = [info.node for info in qpasses.quantizable_layers(gm)]
    with torch.no_grad():
        gm.b1.copy_(torch.tensor([0.4, -0.2, 0.3, 0.2, 0.1, 0.9]))
    set_bits(gm, {names[0]: np.array([0, 0, 4, 0, 4, 4]), names[1]: np.array([4, 0, 4, 0]),
                  names[2]: np.array([4, 0, 4, 0]), names[3]: np.array([4, 4])})
    y0 = run(gm, x)
    prune(gm, inputs=(x,))
    assert gm.w1.shape == (3, 3, 1, 1) and gm.w2.shape == (2, 3, 1, 1)
    assert gm.dw.shape == (2, 1, 3, 3) and gm.fc.shape == (2, 2)
    groups = [n for n in gm.graph.nodes if n.name == names[2]][0].args[6]
    assert groups == 2
    assert_same(run(gm, x), y0)


def test_verify_each_and_a_second_run_on_the_pruned_graph():
    gm, x, _ = chain(bias=True)
    with torch.no_grad():
        gm.a.bias.copy_(torch.tensor([0.5, 0.3, 0.2, -1.0, 0.7, 0.1]))
    set_bits(gm, bits_for(gm, a=[0, 4, 0, 0, 0, 4]))
    buf = io.StringIO()
    PassManager.parse("graph(print<channel-groups>,prune-zero-bit-channels,"
                      "print<channel-groups>)").run(gm, PassContext(
                          example_inputs=(x,), verify_each=True, check_preservation=True,
                          print_stream=buf))
    assert "group 0: 6 channels" in buf.getvalue() and "group 0: 5 channels" in buf.getvalue()
    # the kept 0-bit channels are still there: a second run keeps them again, unchanged
    res = prune_stats(gm)
    assert not res.modified and res.stats["num_kept_inexact"] == 3


# ---------------------------------------------------------------------------------------------
# torchvision models: equivalence over random 0-bit masks (hypothesis)

MODELS = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "densenet121": torchvision.models.densenet121,
    "shufflenet_v2": torchvision.models.shufflenet_v2_x0_5,
    "mobilenet_v3": torchvision.models.mobilenet_v3_small,
}
_CACHE: dict[str, tuple] = {}


def zoo(name: str):
    if name not in _CACHE:
        torch.manual_seed(0)
        model = randomize_bn(MODELS[name]().eval(), seed=1)
        x = torch.randn(1, 3, 32, 32)
        gm = trace_folded(model, x)
        _CACHE[name] = (gm, x, compute_channel_groups(gm))
    gm, x, cg = _CACHE[name]
    return copy.deepcopy(gm), x, cg


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
@HYP
@given(seed=st.integers(0, 2**16), frac=st.sampled_from([0.15, 0.5, 0.9]),
       noise=st.sampled_from([0.0, 0.05, 0.3]), whole=st.sampled_from([0.0, 0.1]))
def test_exact_pruning_preserves_outputs_on_torchvision(name, seed, frac, noise, whole):
    gm, x, cg = zoo(name)
    rng = np.random.default_rng(seed)
    set_bits(gm, random_bits(gm, rng, frac, noise, whole, cg=cg))
    y0 = run(gm, x)
    macs0 = measured_macs(gm, x)
    res = prune_stats(gm)
    assert_same(run(gm, x), y0)
    if frac >= 0.5:
        assert res.stats["num_channels_removed"] > 0
    rep = qpasses.report(gm)
    assert rep["totals"]["macs"] == measured_macs(gm, x) <= macs0


def test_model_zoo_prunes_through_every_coupling():
    """One fixed mask per model: each model's coupling (concat, shuffle, SE) is exercised."""
    for name in ("densenet121", "shufflenet_v2", "mobilenet_v3"):
        gm, x, cg = zoo(name)
        set_bits(gm, random_bits(gm, np.random.default_rng(5), 0.6, 0.0, cg=cg))
        y0 = run(gm, x)
        res = prune_stats(gm)
        assert res.stats["num_channels_removed"] > 100, (name, res.stats)
        assert_same(run(gm, x), y0)


# ---------------------------------------------------------------------------------------------
# random DAGs with residual adds and concats


class RandomDag(nn.Module):
    def __init__(self, spec, width):
        super().__init__()
        self.spec = spec
        self.convs = nn.ModuleDict()
        for i, op in enumerate(spec):
            if op[0] == "conv":
                _, src, cin, cout, k, pad, groups = op
                self.convs[str(i)] = nn.Conv2d(cin, cout, k, padding=pad, groups=groups)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        ts = [x]
        for i, op in enumerate(self.spec):
            kind = op[0]
            if kind == "conv":
                ts.append(self.convs[str(i)](ts[op[1]]))
            elif kind == "relu":
                ts.append(torch.relu(ts[op[1]]))
            elif kind == "add":
                ts.append(ts[op[1]] + ts[op[2]])
            elif kind == "cat":
                ts.append(torch.cat([ts[j] for j in op[1]], 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(ts[-1], 1), 1))


@st.composite
def dags(draw):
    chans = [3]
    spec = []
    n = draw(st.integers(3, 9))
    for _ in range(n):
        i = len(chans) - 1
        kind = draw(st.sampled_from(["conv", "conv", "relu", "add", "cat"]))
        if kind in ("add", "cat") or i == 0:
            same = [j for j in range(1, len(chans) - 1) if chans[j] == chans[i]]
            if kind == "add" and same and i > 0:
                spec.append(("add", i, draw(st.sampled_from(same))))
                chans.append(chans[i])
                continue
            if kind == "cat" and i > 0 and len(chans) > 2:
                j = draw(st.integers(1, len(chans) - 2))
                spec.append(("cat", [i, j]))
                chans.append(chans[i] + chans[j])
                continue
            kind = "conv"
        if kind == "relu":
            spec.append(("relu", i))
            chans.append(chans[i])
            continue
        src = draw(st.integers(max(0, i - 2), i))
        cin = chans[src]
        cout = draw(st.sampled_from([2, 3, 4, 6]))
        k, pad = draw(st.sampled_from([(1, 0), (3, 1), (3, 0)]))
        groups = 2 if cin % 2 == 0 and cout % 2 == 0 and src > 0 and draw(st.booleans()) else 1
        if pad == 0 and k == 3:
            k, pad = 1, 0   # keep spatial sizes equal so adds/cats always line up
        spec.append(("conv", src, cin, cout, k, pad, groups))
        chans.append(cout)
    return spec, chans[-1]


@settings(HYP, max_examples=60)
@given(dag=dags(), seed=st.integers(0, 2**16), frac=st.sampled_from([0.3, 0.7]),
       noise=st.sampled_from([0.0, 0.2]), mode=st.sampled_from(["exact", "fold-constant"]))
def test_random_dags_exact_equivalence_and_measured_deviation(dag, seed, frac, noise, mode):
    spec, width = dag
    torch.manual_seed(seed)
    model = RandomDag(spec, width).eval()
    x = torch.randn(2, 3, 6, 6)
    gm = qpasses.trace(model, (x,))
    rng = np.random.default_rng(seed)
    set_bits(gm, random_bits(gm, rng, frac, noise))
    y0 = run(gm, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune(gm, mode=mode, inputs=(x,))
    y1 = run(gm, x)
    if mode == "exact":
        assert_same(y1, y0)
    else:
        rec = [e for e in get_record(gm, PRUNE_LOG_KEY, PruneLog()).entries if e["layer"] is None][-1]
        dev = rec.get("max_deviation")
        measured = float((y1 - y0).abs().max())
        if dev is None:
            assert_same(y1, y0)
        else:
            assert dev == pytest.approx(measured, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# the MobileNetV2 target, fake-quant graphs, timing


def test_mobilenet_v2_kernelwise_zeros_prune_30_percent_and_macs_match():
    gm, x, cg = zoo("mobilenet_v2")
    rng = np.random.default_rng(7)
    # FracBits-style kernel-wise bits in 1..8 with 0 as one more candidate (about 40% zeros
    # drawn per coupled channel, plus stray zeros that leave partial groups)
    bits = random_bits(gm, rng, 0.4, 0.02, high=8, cg=cg)
    set_bits(gm, bits)
    prunable = sum(len(cg.class_producers[c]) for g in cg.groups
                   for k, c in enumerate(g.classes) if g.reasons[k] is None)
    y0 = run(gm, x)
    macs_before = measured_macs(gm, x)
    rep_before = qpasses.report(gm)["totals"]["macs"]
    am = AnalysisManager()
    macs_an_before = am.get("macs", gm).total if "macs" in _analyses() else rep_before
    res = prune_stats(gm)
    assert res.stats["num_channels_removed"] >= 0.30 * prunable, (res.stats, prunable)
    assert_same(run(gm, x), y0)
    macs_after = measured_macs(gm, x)
    rep_after = qpasses.report(gm)["totals"]["macs"]
    assert macs_before == rep_before and macs_after == rep_after
    if "macs" in _analyses():
        assert AnalysisManager().get("macs", gm).total == macs_after
        assert macs_an_before - AnalysisManager().get("macs", gm).total == \
            macs_before - macs_after
    assert macs_after < 0.75 * macs_before


def _analyses():
    from passes_registry import analysis_names
    return analysis_names()


def _fake_quant(name, weight_scheme="symmetric", seed=0):
    gm, x, cg = zoo(name)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    gm = PassManager.parse("graph(annotate-bitwidths{weight-bits=4 act-bits=8 "
                           "granularity=kernel})", assume=gm).run(gm, PassContext(
                               example_inputs=(x,)))
    bits = random_bits(gm, np.random.default_rng(seed), 0.5, 0.05, cg=cg)
    set_bits(gm, bits, zero_weights=False)     # the weight quantizer makes them 0
    # NCHW calibration, as before calibrate fed channels-last batches: with those ranges one
    # resnet18 activation sits a few ulps from a rounding tie, and the pruned float graph's
    # output differed from the unpruned one in about 1 of 10 fresh processes (a code flip). The
    # likely cause, a weight-observer cache keyed by id() that a new tensor at a freed address
    # could match, is fixed (WeightFakeQuant.mark_observed); unpin once many runs confirm it.
    gm = PassManager.parse(f"graph(insert-fake-quant{{weight-scheme={weight_scheme}}},"
                           "calibrate{channels-last=false})", assume=gm).run(
        gm, PassContext(example_inputs=(x,), calibration_data=[x]))
    return gm, x


@pytest.mark.parametrize("name,scheme", [("resnet18", "symmetric"),
                                         ("mobilenet_v3", "symmetric"),
                                         ("mobilenet_v2", "dorefa")])
def test_fake_quant_graph_exact_equivalence(name, scheme):
    if not {"insert-fake-quant", "calibrate", "annotate-bitwidths"} <= set(pass_names()):
        pytest.skip("fake-quant passes are not registered")
    gm, x = _fake_quant(name, scheme)
    y0 = run(gm, x)
    macs0 = qpasses.report(gm)["totals"]["macs"]
    res = PassManager.parse("graph(prune-zero-bit-channels)", assume=gm)
    gm = res.run(gm, PassContext(example_inputs=(x,)))
    assert_same(run(gm, x), y0)
    assert qpasses.report(gm)["totals"]["macs"] < macs0
    # quantizer state shrank with the layers
    for mod in gm.modules():
        q = getattr(mod, "weight_fake_quant", None)
        if q is not None:
            assert q.bits.shape[0] == q.scale.shape[0] == mod.weight.shape[0] == q.num_channels


def _lowered_pair(name, seed):
    gm, x = _fake_quant(name, seed=seed)
    pruned = PassManager.parse("graph(prune-zero-bit-channels)", assume=gm).run(
        copy.deepcopy(gm), PassContext(example_inputs=(x,)))
    lowered = [PassManager.parse("graph(lower-to-int-sim{backend=reference})", assume=g).run(
        copy.deepcopy(g), PassContext(example_inputs=(x,))) for g in (gm, pruned)]
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    with torch.no_grad():
        return [g(x) for g in lowered]


@pytest.mark.slow
@pytest.mark.parametrize("name,seed", [("resnet18", 0), ("resnet18", 1), ("mobilenet_v2", 0),
                                       ("mobilenet_v2", 2), ("resnet50", 0),
                                       ("shufflenet_v2", 0), ("densenet121", 0)])
def test_pruned_graph_is_bit_exact_after_lowering(name, seed):
    """Folded constants, 0-bit kernels' biases and intermediate grids all lower to the same
    integers with and without the pruned channels (see lowering._exact_zero_kernel_constants,
    qpasses.ir.layers.bias_parts)."""
    y_full, y_pruned = _lowered_pair(name, seed)
    assert torch.equal(y_full, y_pruned)   # dequantized integer outputs, bit for bit


def test_pruned_mobilenet_v3_is_close_after_lowering():
    """Known limit: a removed channel's constant that passes through the SE gate and hardswish
    lookup tables is computed on int-sim grids, not as the fake-quant constant the pruner folds,
    so pruned and unpruned int-sim graphs differ by a few LSB (not bit-exact)."""
    y_full, y_pruned = _lowered_pair("mobilenet_v3", 0)
    assert not torch.equal(y_full, y_pruned)       # flip when this becomes exact
    assert (y_full - y_pruned).abs().max() <= 0.02 * y_full.abs().max()   # measured: 1.05%
    assert torch.equal(y_full.argmax(1), y_pruned.argmax(1))


def test_resnet50_prunes_in_under_a_second():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet50().eval(), seed=1)
    x = torch.randn(1, 3, 224, 224)
    gm = trace_folded(model, x)
    set_bits(gm, random_bits(gm, np.random.default_rng(0), 0.4, 0.05))
    best = float("inf")
    for _ in range(3):
        g = copy.deepcopy(gm)
        t = time.perf_counter()
        PruneZeroBitChannels().run(g, PassContext(), AnalysisManager())
        best = min(best, time.perf_counter() - t)
    assert g.fc.in_features < 2048
    assert best < 1.0, f"pruning ResNet-50 took {best:.2f} s"
