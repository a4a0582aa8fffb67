"""calibrate's channels-last feeding: which graphs may take it (``channels_last_blocker``), the
ranges it gives (those of an NCHW run up to float summation order), the fallback of a graph
that fails on it, the direct oneDNN convolutions it runs under, and per-tensor / per-channel
min-max on strided layouts."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.ir.memory_format import channels_last_blocker, to_channels_last
from qpasses.modules.fake_quant import ActFakeQuant, WeightFakeQuant
from qpasses.modules.fake_quant_layers import FakeQuantConv2d, onednn_convolutions, wrap_layer
from qpasses.numerics.observers import batch_minmax

PREP = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths{weight-bits=8 act-bits=8 "
        "first-last-bits=none},insert-fake-quant)")


class Pooled(nn.Module):
    """conv -> relu -> max-pool -> conv -> global pool -> ``view(n, -1)`` -> linear."""

    def __init__(self, flatten_by_view: bool = True) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 4)
        self.flatten_by_view = flatten_by_view

    def forward(self, x):
        y = F.max_pool2d(torch.relu(self.c1(x)), 2)
        y = F.adaptive_avg_pool2d(torch.relu(self.c2(y)) + y.sum(1, keepdim=True), 1)
        y = y.view(y.shape[0], -1) if self.flatten_by_view else torch.flatten(y, 1)
        return self.fc(y)


class SpatialView(nn.Module):
    """``view`` that merges spatial dims with channels: invalid on channels-last."""

    def __init__(self, through_aten: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)
        self.through_aten = through_aten

    def forward(self, x):
        y = torch.relu(self.c1(x))
        if self.through_aten:   # an aten op the node check lets through
            y = torch.ops.aten.view.default(y, [y.shape[0], -1])
        else:
            y = y.view(y.shape[0], -1)
        return self.fc(y)


class Opaque(nn.Module):
    def forward(self, x):
        return x * 2


class WithLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.leaf = Opaque()

    def forward(self, x):
        return self.leaf(self.c1(x))


class Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, name):
        return isinstance(m, Opaque) or super().is_leaf_module(m, name)


def batches(n=2, batch=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def prepared(model):
    torch.manual_seed(0)
    gm = qpasses.trace(model.eval(), torch.randn(1, 3, 8, 8))
    PassManager.parse(PREP).run(gm)
    return gm


def calibrated(gm, channels_last, data):
    gm = copy.deepcopy(gm)
    text = f"graph(calibrate{{channels-last={'true' if channels_last else 'false'}}})"
    with PassContext(calibration_data=data):
        PassManager.parse(text, assume=gm).run(gm)
    return gm


def act_ranges(gm):
    return {n: (m.observer.min_val.clone(), m.observer.max_val.clone(), m.scale.clone())
            for n, m in gm.named_modules() if isinstance(m, ActFakeQuant)}


# -- which graphs may run channels-last ------------------------------------------------------------

def test_blocker_lets_pooling_networks_through_with_a_single_pixel_view():
    torch.manual_seed(0)
    assert channels_last_blocker(qpasses.trace(Pooled().eval(), torch.randn(1, 3, 8, 8))) is None
    assert channels_last_blocker(prepared(Pooled())) is None


def test_blocker_names_a_spatial_view_a_layout_query_and_an_opaque_leaf():
    gm = qpasses.trace(SpatialView().eval(), torch.randn(1, 3, 8, 8))
    assert "calls .view()" in channels_last_blocker(gm)

    class Strides(nn.Module):
        def forward(self, x):
            return x + x.stride(1)
    blocked = channels_last_blocker(torch.fx.symbolic_trace(Strides()))
    assert blocked is not None and ".stride()" in blocked

    model = WithLeaf()
    leaf = torch.fx.GraphModule(model, Tracer().trace(model))
    assert "Opaque" in channels_last_blocker(leaf)


def test_to_channels_last_only_touches_4d_float_cpu_tensors():
    x = torch.randn(2, 3, 4, 5)
    assert to_channels_last(x).is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(to_channels_last(x), x)
    for t in (torch.randn(2, 3, 4), torch.randint(0, 9, (2, 3, 4, 5))):
        assert to_channels_last(t) is t


# -- what calibration gives ----------------------------------------------------------------------

def test_channels_last_ranges_equal_an_nchw_run_up_to_float_rounding(monkeypatch):
    gm = prepared(Pooled())
    data = batches()
    calls = []
    direct = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or direct(*a))
    fast = act_ranges(calibrated(gm, True, data))
    assert len(calls) == 2 * len(data) or not torch.backends.mkldnn.is_available()
    plain = act_ranges(calibrated(gm, False, data))
    assert len(calls) == 2 * len(data) or not torch.backends.mkldnn.is_available()
    assert fast.keys() == plain.keys() and len(fast) >= 4
    for name in fast:
        for a, b in zip(fast[name], plain[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_graph_the_node_check_cannot_see_into_falls_back_to_the_batches_as_given():
    gm = prepared(SpatialView(through_aten=True))
    assert channels_last_blocker(gm) is None       # the aten view is not recognised ...
    with pytest.raises(RuntimeError):               # ... and fails on channels-last input
        gm(to_channels_last(torch.randn(2, 3, 8, 8)))
    data = batches(n=3)
    fast, plain = act_ranges(calibrated(gm, True, data)), act_ranges(calibrated(gm, False, data))
    for name in plain:                              # the failed try left nothing behind
        for a, b in zip(fast[name], plain[name]):
            assert torch.equal(a, b), name


def test_a_blocked_graph_calibrates_as_given():
    gm = prepared(SpatialView())
    data = batches()
    fast, plain = act_ranges(calibrated(gm, True, data)), act_ranges(calibrated(gm, False, data))
    for name in plain:
        for a, b in zip(fast[name], plain[name]):
            assert torch.equal(a, b), name


# -- direct oneDNN convolutions ------------------------------------------------------------------

@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("kernel,stride,groups,bias", [(1, 1, 1, True), (3, 1, 1, False),
                                                      (3, 2, 4, True), (1, 2, 1, False)])
def test_onednn_convolutions_match_torch_and_apply_only_where_they_may(kernel, stride, groups,
                                                                      bias, monkeypatch):
    torch.manual_seed(0)
    conv = wrap_layer(nn.Conv2d(8, 16, kernel, stride=stride, padding=kernel // 2,
                                groups=groups, bias=bias), WeightFakeQuant(16)).eval()
    assert isinstance(conv, FakeQuantConv2d)
    conv.weight_fake_quant.enable_fake_quant(False)
    calls = []
    direct = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution",
                        lambda *a: calls.append(1) or direct(*a))
    x = torch.randn(2, 8, 9, 9)
    xc = to_channels_last(x)
    with torch.no_grad():
        ref = conv(x)
        outside = conv(xc)                           # no block: torch's own dispatch
        with onednn_convolutions():
            plain = conv(x)                          # NCHW input: torch's own dispatch
            assert not calls
            fast = conv(xc)
            assert len(calls) == 1
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outside, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, ref)
    with onednn_convolutions():                      # autograd on: torch's own dispatch
        out = conv(xc)
    assert out.requires_grad and len(calls) == 1
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)


# -- min / max on any layout -----------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(*(st.integers(1, 5) for _ in range(4))), axis=st.sampled_from([None, 0, 1, -1]),
       layout=st.sampled_from(["contiguous", "channels-last", "transposed"]), seed=st.integers(0, 99))
def test_batch_minmax_is_the_same_on_every_layout(shape, axis, layout, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if layout == "channels-last":
        y = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        y = x.transpose(1, 3).contiguous().transpose(1, 3)
    else:
        y = x
    assert torch.equal(y, x)
    got, want = batch_minmax(y, axis), batch_minmax(x.contiguous(), axis)
    ax = None if axis is None else axis % 4
    if ax is None:
        want = (x.min().reshape(1), x.max().reshape(1))
    else:
        dims = tuple(d for d in range(4) if d != ax)
        want = (x.amin(dims), x.amax(dims))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
