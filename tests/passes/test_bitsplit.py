"""Bit-split and stitching PTQ (issue 9): the math in qpasses.algorithms.bitsplit and the ptq-bitsplit
pass. The digits figures (fp32 / round-to-nearest / bit-split at W3A8 and W2A8) are printed
(``pytest -s``) and attached as junit properties."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qpasses
from passes_registry import PassContext, PassManager, get_record
from passes_registry.errors import OptionError
from qpasses.errors import CalibrationError
from qpasses.modules.fake_quant import WeightFakeQuant
from qpasses.ir.annotations import get_qmeta
from qpasses.algorithms.bitsplit import (bitsplit, bitsplit_solve, channel_error, gram_stats,
                                         qmax_for, rtn_mse_clip, split_planes, stitch_planes)
from tests.conftest import accuracy


def _problem(seed: int, m: int, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Correlated inputs X = Z A (random mixing A), weights W, targets Y = X W^T."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(k, n, generator=g, dtype=torch.float64)
    mix = torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5 + \
        0.5 * torch.eye(n, dtype=torch.float64)
    x = z @ mix
    w = torch.randn(m, n, generator=g, dtype=torch.float64) * 0.1
    return x, w, x @ w.T


# ------------------------------------------------------------------------------------------------
# math


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_split_then_stitch_is_identity(bits):
    q = torch.arange(-(2 ** (bits - 1) - 1), 2 ** (bits - 1))
    planes = split_planes(q, bits)
    assert planes.shape == (bits - 1, q.numel())
    assert set(planes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(stitch_planes(planes), q)


def test_split_example_msb_first():
    assert split_planes(torch.tensor([-5]), 4).flatten().tolist() == [-1, 0, -1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), m=st.integers(1, 6), n=st.integers(1, 20),
       kmul=st.floats(0.5, 3.0),
       bits=st.one_of(st.integers(2, 5), st.lists(st.sampled_from([0, 2, 3, 4, 5]), min_size=6,
                                                  max_size=6)))
def test_bitsplit_never_worse_than_rtn_best_mse_clip(seed, m, n, kmul, bits):
    x, w, y = _problem(seed, m, n, max(1, int(kmul * n)))
    b = torch.tensor(bits[:m] if isinstance(bits, list) else [bits] * m)
    A, C, yy = gram_stats(x, y)
    q0, a0 = rtn_mse_clip(w, b)
    rtn_err = channel_error(A, C, a0[:, None] * q0.double(), yy)
    res = bitsplit_solve(A, C, b, iters=4, w=w, yy=yy)
    # per layer and per channel: never worse than round-to-nearest at the best MSE clip
    tol = 1e-9 * (1.0 + yy)
    assert bool((res.error <= rtn_err + tol).all()), (res.error, rtn_err)
    assert torch.allclose(res.error, channel_error(A, C, res.weight, yy), rtol=1e-9, atol=1e-9)
    # per-kernel bits respected: every code inside its channel's symmetric narrow range
    assert bool((res.q.abs() <= qmax_for(b)[:, None]).all())
    assert bool((res.q[b == 0] == 0).all())
    assert bool((res.alpha > 0).all()) and bool(torch.isfinite(res.alpha).all())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), bits=st.integers(2, 4))
def test_objective_non_increasing_in_iterations(seed, bits):
    x, w, y = _problem(seed, 5, 16, 40)
    A, C, yy = gram_stats(x, y)
    errs = [float(bitsplit_solve(A, C, bits, iters=k, w=w, yy=yy).error.sum())
            for k in range(4)]
    for a, b in zip(errs, errs[1:]):
        assert b <= a + 1e-9 * (1 + abs(a))


def test_bitsplit_clearly_beats_rtn_on_correlated_inputs():
    x, w, y = _problem(0, 16, 64, 400)
    A, C, yy = gram_stats(x, y)
    q0, a0 = rtn_mse_clip(w, 3)
    rtn = float(channel_error(A, C, a0[:, None] * q0.double(), yy).sum())
    res = bitsplit(x, y, w, 3, iters=10)
    assert float(res.error.sum()) < 0.8 * rtn


def test_identity_inputs_reduce_to_weight_fit():
    # X = I: the response objective is the weight MSE, and bit-split can only improve on RTN
    w = torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eye = torch.eye(12, dtype=torch.float64)
    res = bitsplit(eye, w.T, w, 3, iters=5)
    q0, a0 = rtn_mse_clip(w, 3)
    rtn = ((w - a0[:, None] * q0) ** 2).sum(1)
    assert torch.allclose(((w - res.weight) ** 2).sum(1), res.error, atol=1e-10)
    assert bool((res.error <= rtn + 1e-12).all())


def test_per_layer_scale_is_shared():
    x, w, y = _problem(3, 6, 10, 30)
    res = bitsplit(x, y, w, 3, iters=3, per_channel=False)
    assert torch.allclose(res.alpha, res.alpha[0].expand_as(res.alpha))


# ------------------------------------------------------------------------------------------------
# the pass


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


PREFIX = ("graph(annotate-bitwidths{weight-bits=3 act-bits=8 first-last-bits=none},"
          "insert-fake-quant{weight-scheme=symmetric per-channel=true},calibrate")


def _tiny() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    data = [torch.randn(16, 1, 8, 8) for _ in range(3)]
    return model, data


def _weight_quantizers(gm):
    return {n.rsplit(".weight_fake_quant", 1)[0]: m for n, m in gm.named_modules()
            if isinstance(m, WeightFakeQuant)}


@pytest.mark.parametrize("source", ["fp", "quantized"])
def test_pass_end_to_end_writes_codes_where_lowering_reads_them(source):
    model, data = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gm = qpasses.trace(model, data[0][:1])
    with PassContext(calibration_data=data):
        pm = PassManager.parse(PREFIX + f",ptq-bitsplit{{iters=3 source={source}}})")
        pm.run(gm)
        # a later calibrate keeps the frozen bit-split scales
        wq_scales = {k: q.scale.clone() for k, q in _weight_quantizers(gm).items()}
        PassManager.parse("graph(calibrate)", assume=gm).run(gm)
    for k, v in model.state_dict().items():     # the user's model is untouched
        assert torch.equal(v, before[k])
    errs = get_record(gm, "ptq_bitsplit").layers
    assert set(errs) == {"conv1", "conv2", "fc"}
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    for name, wq in _weight_quantizers(gm).items():
        assert torch.equal(wq.scale, wq_scales[name])
        w = gm.get_submodule(name).weight.detach()
        codes = w.reshape(w.shape[0], -1) / wq.scale[:, None]
        q = codes.round()                   # what a lowering computes: rne(w / scale)
        assert float((codes - q).abs().max()) < 1e-4
        assert torch.equal(q * wq.scale[:, None], w.reshape(w.shape[0], -1))  # w = scale * q
        assert float(q.abs().max()) <= 3                             # 3-bit narrow range
        assert torch.equal(wq(w), w)                                 # fake-quant reproduces them
        spec = get_qmeta(nodes[name]).weight
        assert spec.scale is not None
        assert torch.allclose(torch.tensor(spec.scale, dtype=torch.float32), wq.scale)
        if source == "fp":
            assert errs[name].bitsplit <= errs[name].rtn + 1e-9
    # lower-to-int-sim takes the stitched codes as its integer weights, unchanged
    low = PassManager.parse("graph(lower-to-int-sim{backend=reference})", assume=gm).run(
        copy.deepcopy(gm), PassContext(example_inputs=(data[0][:2],)))
    for name, wq in _weight_quantizers(gm).items():
        w = gm.get_submodule(name).weight.detach()
        codes = torch.round(w.reshape(w.shape[0], -1) / wq.scale[:, None]).to(torch.int64)
        int_layer = low.get_submodule(name)
        assert torch.equal(int_layer.w_q.reshape(w.shape[0], -1) - int_layer.w_zp.reshape(-1, 1),
                           codes), name


def test_pass_respects_per_kernel_bits():
    model, data = _tiny()
    gm = qpasses.trace(model, data[0][:1])
    bits = [2, 3, 4, 0, 2, 3, 4, 5]
    with PassContext(calibration_data=data):
        PassManager.parse(PREFIX + ")").run(gm)
        wq = _weight_quantizers(gm)["conv1"]
        wq.set_bits(bits)
        PassManager.parse("graph(ptq-bitsplit{iters=2})", assume=gm).run(gm)
    w = gm.conv1.weight.detach().reshape(8, -1)
    codes = (w / wq.scale[:, None]).round()
    assert torch.equal(codes * wq.scale[:, None], w)
    qmax = qmax_for(torch.tensor(bits)).float()
    assert bool((codes.abs() <= qmax[:, None]).all())
    assert bool((w[3] == 0).all())
    assert torch.equal(wq(gm.conv1.weight), gm.conv1.weight)


def test_w_bits_option_overrides_annotation():
    model, data = _tiny()
    gm = qpasses.trace(model, data[0][:1])
    with PassContext(calibration_data=data):
        PassManager.parse(PREFIX + ",ptq-bitsplit{w-bits=2 iters=1})").run(gm)
    for name, wq in _weight_quantizers(gm).items():
        assert int(wq.bits.max()) == 2
        w = gm.get_submodule(name).weight.detach()
        assert float((w.reshape(w.shape[0], -1) / wq.scale[:, None]).abs().max()) <= 1
    node = next(n for n in gm.graph.nodes if n.target == "conv1")
    assert get_qmeta(node).weight.bits == 2


def test_error_no_calibration_data():
    model, data = _tiny()
    gm = qpasses.trace(model, data[0][:1])
    with PassContext(calibration_data=data):
        PassManager.parse(PREFIX + ")").run(gm)
    with PassContext(), pytest.raises(CalibrationError, match="calibration data"):
        PassManager.parse("graph(ptq-bitsplit)", assume=gm).run(gm)
    with PassContext(calibration_data=[]), pytest.raises(CalibrationError, match="no batches"):
        PassManager.parse("graph(ptq-bitsplit)", assume=gm).run(gm)


@pytest.mark.parametrize("bits", [0, 1])
def test_error_w_bits_below_two(bits):
    with pytest.raises(OptionError, match="ternary"):
        PassManager.parse(f"graph(ptq-bitsplit{{w-bits={bits}}})")


def test_error_one_bit_kernels():
    model, data = _tiny()
    gm = qpasses.trace(model, data[0][:1])
    with PassContext(calibration_data=data):
        PassManager.parse(PREFIX + ")").run(gm)
        _weight_quantizers(gm)["conv2"].set_bits([1] + [3] * 7)
        with pytest.raises(OptionError, match="conv2"):
            PassManager.parse("graph(ptq-bitsplit)", assume=gm).run(gm)


def test_error_layer_never_observed():
    model, data = _tiny()
    gm = qpasses.trace(model, data[0][:1])
    with PassContext(calibration_data=data):
        PassManager.parse(PREFIX + ")").run(gm)
    with PassContext(calibration_data=[torch.empty(0, 1, 8, 8)]), \
            pytest.raises(CalibrationError, match="'conv1'.*never observed"):
        PassManager.parse("graph(ptq-bitsplit)", assume=gm).run(gm)


def test_requires_fake_quant_inserted():
    from passes_registry.errors import PropertyError
    model, data = _tiny()
    gm = qpasses.trace(model, data[0][:1])
    with PassContext(calibration_data=data), pytest.raises(PropertyError):
        PassManager.parse("graph(ptq-bitsplit)").run(gm)


# ------------------------------------------------------------------------------------------------
# must reach: digits W3A8


def _digits_acc(d, w_bits: int, a_bits: int, tail: str) -> float:
    gm = qpasses.trace(d.model, d.x_test[:1])
    pipeline = (f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{weight-bits={w_bits} "
                f"act-bits={a_bits} first-last-bits=none}},insert-fake-quant{{weight-scheme="
                f"symmetric per-channel=true}},calibrate{{method=mse}}{tail})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with PassContext(calibration_data=d.batches(8)):
            PassManager.parse(pipeline).run(gm)
    return accuracy(gm.eval(), d.x_test, d.y_test)


def test_digits_w3a8_bitsplit_recovers_half_the_gap(digits_cnn, record_property):
    d = digits_cnn
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        minmax = _digits_acc(d, 3, 8, "")                            # RTN, min/max weights
        mse = _digits_acc(d, 3, 8, ",ptq-bitsplit{iters=0}")         # RTN, best MSE clip
        bsplit = _digits_acc(d, 3, 8, ",ptq-bitsplit{iters=20}")
    finally:
        torch.set_num_threads(threads)
    line = (f"digits W3A8: fp32 {d.fp32_acc:.2f}%, RTN min/max {minmax:.2f}%, RTN best-MSE clip "
            f"{mse:.2f}%, bit-split {bsplit:.2f}%")
    print("\n" + line)
    record_property("bitsplit_w3a8", line)
    for rtn in (minmax, mse):
        gap = d.fp32_acc - rtn
        assert d.fp32_acc - bsplit <= 0.5 * gap + 1e-6, line


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2),
                                  nn.Conv2d(3, 5, (1, 3), padding=(0, 1)),
                                  nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect")])
def test_sampled_patches_match_unfold(conv):
    from qpasses.passes.ptq_bitsplit import _Layer, _rows
    x = torch.randn(3, conv.in_channels, 9, 10)
    layer = _Layer(info=None, mod=conv, wq=None, index=0, groups=conv.groups)  # type: ignore
    sampled = _rows(layer, x, 5, 123)
    everything = _rows(layer, x, 10 ** 6, 123)                      # full im2col, in order
    assert everything.shape[1] == 3 * conv(x).shape[2] * conv(x).shape[3]
    # every sampled patch is one of the full im2col rows, and the rows reproduce the conv
    full = everything.transpose(0, 1).reshape(everything.shape[1], -1)
    samp = sampled.transpose(0, 1).reshape(sampled.shape[1], -1)
    dist = torch.cdist(samp.double(), full.double(),
                       compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float(dist.max()) < 1e-5
    w = conv.weight.detach().reshape(conv.groups, conv.out_channels // conv.groups, -1)
    y = (everything @ w.transpose(1, 2)).transpose(0, 1).reshape(3, -1, conv.out_channels)
    ref = conv._conv_forward(x, conv.weight, None).detach().flatten(2).transpose(1, 2)
    assert torch.allclose(y, ref, atol=1e-5)
