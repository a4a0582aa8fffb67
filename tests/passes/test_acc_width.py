"""acc-width analysis and check-acc-width: soundness of both bounds against realized
integer accumulators (hypothesis), data-aware <= worst case, calibrated pipelines, flagging."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import AnalysisManager, PassContext, PassFailure, PassManager
from passes_registry.errors import OptionError
from qpasses.ir.annotations import QuantSpec, update_qmeta

from .cost_helpers import annotate, traced


def _grid(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    if bits == 0:
        return 0, 0
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return int(narrow), 2 ** bits - 1


@st.composite
def layer_cases(draw):
    linear = draw(st.booleans())
    groups = 1 if linear else draw(st.sampled_from([1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    k = 1 if linear else draw(st.sampled_from([1, 3]))
    bias = draw(st.booleans())
    per_kernel = draw(st.booleans())
    w_signed = draw(st.booleans())
    w_narrow = w_signed and draw(st.booleans())
    if per_kernel:
        kb = draw(st.lists(st.integers(0, 8), min_size=c_out, max_size=c_out))
        if max(kb) == 0:
            kb[0] = draw(st.integers(1, 8))
    else:
        kb = [draw(st.integers(1, 8))] * c_out
    w_zp = [0 if b == 0 else draw(st.integers(*_grid(b, w_signed, w_narrow))) for b in kb]
    if w_signed and draw(st.booleans()):
        w_zp = [0] * c_out                      # symmetric
    w_scale = draw(st.lists(st.floats(1e-3, 1.0), min_size=c_out, max_size=c_out))
    a_bits = draw(st.integers(1, 8))
    a_signed = draw(st.booleans())
    a_narrow = a_signed and a_bits > 1 and draw(st.booleans())
    a_zp = draw(st.integers(*_grid(a_bits, a_signed, a_narrow)))
    a_scale = draw(st.floats(1e-3, 1.0))
    calibrated = draw(st.booleans())
    seed = draw(st.integers(0, 2 ** 16))
    return dict(linear=linear, groups=groups, c_in=c_in, c_out=c_out, k=k, bias=bias,
                per_kernel=per_kernel, kb=kb, w_signed=w_signed, w_narrow=w_narrow, w_zp=w_zp,
                w_scale=w_scale, a_bits=a_bits, a_signed=a_signed, a_narrow=a_narrow,
                a_zp=a_zp, a_scale=a_scale, calibrated=calibrated, seed=seed)


@settings(max_examples=60, deadline=None)
@given(layer_cases())
def test_realized_accumulators_fit_both_widths(case):
    torch.manual_seed(case["seed"])
    c_in, c_out, k, groups = case["c_in"], case["c_out"], case["k"], case["groups"]
    if case["linear"]:
        layer = nn.Linear(c_in, c_out, bias=case["bias"])
        x_shape = (1, c_in)
    else:
        layer = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=case["bias"])
        x_shape = (1, c_in, 4, 4)
    with torch.no_grad():   # weights that saturate the grids now and then, large biases
        layer.weight.mul_(torch.tensor(case["w_scale"]).view(-1, *[1] * (layer.weight.dim() - 1))
                          * 2 ** max(case["kb"]) * 3)
        if layer.bias is not None:
            layer.bias.normal_(0, 50.0)
    gm = qpasses.trace(nn.Sequential(layer), torch.randn(*x_shape))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    kb = case["kb"]
    w_spec = QuantSpec(
        bits=max(kb), signed=case["w_signed"], scheme="symmetric" if case["w_signed"]
        else "asymmetric", narrow_range=case["w_narrow"], axis=0,
        bits_per_kernel=tuple(kb) if case["per_kernel"] else None,
        scale=tuple(case["w_scale"]) if case["calibrated"] else None,
        zero_point=tuple(case["w_zp"]) if case["calibrated"] or any(case["w_zp"]) else None)
    if w_spec.zero_point is not None and w_spec.scale is None:
        w_spec = w_spec.replace(scale=tuple(case["w_scale"]))
    a_spec = QuantSpec(bits=case["a_bits"], signed=case["a_signed"],
                       scheme="symmetric" if case["a_signed"] else "unsigned",
                       narrow_range=case["a_narrow"], scale=(case["a_scale"],),
                       zero_point=(case["a_zp"],))
    update_qmeta(node, weight=w_spec, act=a_spec)
    row = AnalysisManager().get("acc-width", gm)["0"]
    assert row.acc_bits is not None
    per_kernel_worst = row.kernel_acc_bits or (row.acc_bits,) * c_out
    if row.acc_bits_data is not None:
        assert row.acc_bits_data <= row.acc_bits
        per_kernel_data = row.kernel_acc_bits_data or (row.acc_bits_data,) * c_out
        assert all(d <= w for d, w in zip(per_kernel_data, per_kernel_worst))
    else:
        per_kernel_data = None
    # Realize the integer accumulator Σ (w_q − z_w)(x_q − z_x) + b_int independently.
    s_w = torch.tensor(case["w_scale"], dtype=torch.float32)
    zw = torch.tensor([z if b else 0 for z, b in zip(case["w_zp"], kb)], dtype=torch.float64) \
        if w_spec.zero_point is not None else torch.zeros(c_out, dtype=torch.float64)
    lo_w = torch.tensor([_grid(b, case["w_signed"], case["w_narrow"])[0] for b in kb])
    hi_w = torch.tensor([_grid(b, case["w_signed"], case["w_narrow"])[1] for b in kb])
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    if w_spec.scale is not None:
        qw = torch.round(layer.weight.detach() * (1.0 / s_w.view(shape))).double() + zw.view(shape)
        qw = torch.maximum(torch.minimum(qw, hi_w.view(shape).double()), lo_w.view(shape).double())
        qw = torch.where(torch.tensor(kb).view(shape) == 0, 0.0, qw)
        weights = [qw]
    else:  # no data: the worst case must hold for any codes: try grid corners
        g = torch.Generator().manual_seed(case["seed"])
        weights = []
        for _ in range(4):
            pick = torch.randint(0, 2, layer.weight.shape, generator=g).bool()
            weights.append(torch.where(pick, hi_w.view(shape), lo_w.view(shape)).double())
    a_lo, a_hi = _grid(case["a_bits"], case["a_signed"], case["a_narrow"])
    g = torch.Generator().manual_seed(case["seed"] + 1)
    xs = [torch.full(x_shape, float(a_lo)), torch.full(x_shape, float(a_hi)),
          torch.randint(a_lo, a_hi + 1, x_shape, generator=g).double(),
          torch.where(torch.randint(0, 2, x_shape, generator=g).bool(), a_hi, a_lo).double()]
    b_int = None
    if layer.bias is not None and w_spec.scale is not None:
        b_int = torch.round(layer.bias.detach().double()
                            / (torch.tensor(case["w_scale"], dtype=torch.float64)
                               * case["a_scale"]))
    assert row.bias_included == (b_int is not None)
    for wq in weights:
        v = wq - (zw.view(shape) if w_spec.scale is not None else 0)
        # per-kernel maximizer/minimizer inputs (channel-constant, so they also fit convs)
        for x in xs:
            xz = x.double() - case["a_zp"]
            if case["linear"]:
                acc = xz @ v.T
            else:
                acc = torch.nn.functional.conv2d(xz, v, padding=k // 2, groups=groups)
            if b_int is not None:
                acc = acc + b_int.view(1, -1, *[1] * (acc.dim() - 2))
            per_ch = acc.transpose(0, 1).reshape(c_out, -1)
            for j in range(c_out):
                lim = 2 ** (per_kernel_worst[j] - 1)
                assert -lim <= per_ch[j].min() and per_ch[j].max() <= lim - 1, (j, row)
                if per_kernel_data is not None:
                    lim = 2 ** (per_kernel_data[j] - 1)
                    assert -lim <= per_ch[j].min() and per_ch[j].max() <= lim - 1, (j, row)


def test_reference_example_and_data_bound_after_calibration():
    # K = 3·3·512 = 4608, W8 signed x A8 unsigned -> 29 bits worst case
    gm = annotate(traced("resnet18", 32), "annotate-bitwidths{weight-bits=8 act-bits=8}")
    acc = AnalysisManager().get("acc-width", gm)
    assert acc["layer4.1.conv2"].fan_in == 4608
    assert acc["layer4.1.conv2"].acc_bits == 29
    assert acc["layer4.1.conv2"].acc_bits_data is None and "calibrate" in acc["layer4.1.conv2"].note
    # calibrated: the data-aware bound appears in the report and never exceeds the worst case
    x = torch.randn(2, 3, 32, 32)
    with PassContext(example_inputs=(x,), calibration_data=[x]):
        PassManager.parse("graph(insert-fake-quant,calibrate)", assume=gm).run(gm)
    rep = qpasses.report(gm)
    rows = [r for r in rep["layers"] if r["acc_bits"] is not None]
    assert rows and all(r["acc_bits_data"] is not None for r in rows)
    assert all(r["acc_bits_data"] <= r["acc_bits"] for r in rows)
    assert any(r["acc_bits_data"] <= r["acc_bits"] - 3 for r in rows)   # much tighter


def test_per_kernel_results_and_pruned_kernels():
    gm = annotate(traced("resnet18", 32), "annotate-bitwidths{weight-bits=4 act-bits=4 "
                                          "granularity=kernel}")
    node = next(n for n in gm.graph.nodes if n.target == "layer1.0.conv1")
    from qpasses.ir.annotations import get_qmeta
    spec = get_qmeta(node).weight
    bits = (0, 2, 8) + spec.bits_per_kernel[3:]
    update_qmeta(node, weight=spec.replace(bits=8, bits_per_kernel=bits))
    row = AnalysisManager().get("acc-width", gm)["layer1.0.conv1"]
    assert row.kernel_acc_bits is not None and len(row.kernel_acc_bits) == 64
    assert row.kernel_acc_bits[0] == 1           # pruned kernel, no bias: constant 0
    assert row.kernel_acc_bits[1] < row.kernel_acc_bits[3] < row.kernel_acc_bits[2]
    assert row.acc_bits == max(row.kernel_acc_bits)


def test_check_acc_width_flags_and_fails():
    gm = annotate(traced("resnet18", 32), "annotate-bitwidths{weight-bits=4 act-bits=4}")
    buf = io.StringIO()
    with PassContext(print_stream=buf, statistics=True):
        PassManager.parse("graph(check-acc-width{target=18})", assume=gm).run(gm)
    out = buf.getvalue()
    assert "need more than 18 accumulator bits" in out and "conv1" in out
    assert "num_over_target" in out
    with pytest.raises(PassFailure, match=r"conv1' \(23 bits\)") as e:
        with PassContext(print_stream=io.StringIO()):
            PassManager.parse("graph(check-acc-width{target=18 fail=true})", assume=gm).run(gm)
    assert "layer4.0.conv2" in str(e.value) and "check-acc-width" in str(e.value)
    with PassContext(print_stream=io.StringIO()):   # everything fits 32 bits
        PassManager.parse("graph(check-acc-width{target=32 fail=true})", assume=gm).run(gm)
    with pytest.raises(OptionError, match="target"):
        PassManager.parse("graph(check-acc-width{target=1})", assume=gm)
    fresh = traced("resnet18", 32)
    with pytest.raises(qpasses.errors.PropertyError, match="annotate-bitwidths"):
        PassManager.parse("graph(check-acc-width)", assume=fresh)
