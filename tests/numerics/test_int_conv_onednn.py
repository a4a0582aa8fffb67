"""oneDNN's direct int8 convolution (int_conv_onednn) returns the exact accumulators
Σ (x − z)(w − z_w) (padding contributes nothing) wherever they are within 2^24, and beyond it
float32 values on the same side of ±2^24 (what the requantization window argument needs); the
integer layers that use it stay bit-exact against the reference backend, node by node."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qpasses.modules.int_sim_layers import IntConv2d, kernel_table
from qpasses.numerics import int_conv_onednn
from qpasses.numerics.int_conv_onednn import (PreparedOnednnConv, onednn_conv_blocks,
                                              onednn_conv_ok, prepare_onednn_conv)
from tests.passes.int_sim_helpers import assert_backends_bit_exact, calibrated, lower, randomize

pytestmark = [pytest.mark.skipif(not onednn_conv_ok(),
                                 reason="no oneDNN int8 convolution with VNNI/AMX here"),
              pytest.mark.usefixtures("native_any_threads")]


def _rows(x: torch.Tensor, p: PreparedOnednnConv, z: int, block: int | None) -> torch.Tensor:
    run = onednn_conv_blocks(x, p, z, block_elems=block)
    out = torch.full((run.rows, p.out_channels), float("nan"), dtype=torch.float64)
    for r0, r1, acc in run.blocks:
        assert acc.dtype == torch.float32
        out[r0:r1] = acc
    n = x.shape[0]
    return out.view(n, *run.out_sizes, p.out_channels).permute(0, 3, 1, 2)


@st.composite
def convs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    cg, og = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    k = draw(st.sampled_from([1, 1, 3, 5]))
    stride, dil = draw(st.integers(1, 2)), draw(st.sampled_from([1, 1, 2]))
    pad = draw(st.integers(0, k // 2 * dil))
    size = draw(st.integers((k - 1) * dil + 1, 9))
    signed = draw(st.booleans())
    lo, hi = (-128, 127) if signed else (0, 255)
    if draw(st.booleans()):
        lo, hi = draw(st.sampled_from([(lo, lo + 100), (hi - 60, hi)]))
    z = draw(st.integers(lo, hi))
    extreme = draw(st.booleans())
    return groups, cg, og, k, stride, dil, pad, size, lo, hi, z, extreme, draw(st.integers(0, 999))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(convs())
def test_onednn_conv_is_the_exact_accumulator(case):
    groups, cg, og, k, stride, dil, pad, size, lo, hi, z, extreme, seed = case
    g = torch.Generator().manual_seed(seed)
    dt = torch.int8 if lo < 0 else torch.uint8
    x = torch.randint(lo, hi + 1, (2, cg * groups, size, size + 1), generator=g).to(dt)
    w = torch.randint(-128, 128, (og * groups, cg, k, k), generator=g)
    if extreme:          # long runs of 255 × 127: a saturating pairwise int16 sum would show
        x[0] = hi
        w[: og * groups // 2 + 1] = 127
    p = prepare_onednn_conv(w, stride=[stride] * 2, padding=[pad] * 2, dilation=[dil] * 2,
                            groups=groups, x_qmin=lo, x_qmax=hi, x_zero_point=z)
    assert p is not None
    got = _rows(x.contiguous(memory_format=torch.channels_last), p, z, 64)
    ref = F.conv2d(x.to(torch.float64) - z, w.to(torch.float64), None, stride, pad, dil, groups)
    assert torch.equal(got, ref)
    # any memory layout, any block size
    assert torch.equal(_rows(x, p, z, None), ref)


def test_beyond_2_24_the_float32_accumulator_keeps_its_side():
    x = torch.full((1, 512, 5, 5), 255, dtype=torch.uint8)
    w = torch.full((4, 512, 3, 3), 127, dtype=torch.int8)
    w[1] = -128
    w[2, :, :, :] = 1
    p = prepare_onednn_conv(w, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1,
                            x_qmin=0, x_qmax=255, x_zero_point=0)
    got = _rows(x, p, 0, None)
    ref = F.conv2d(x.to(torch.float64), w.to(torch.float64), None, 1, 1)
    assert float(ref.abs().max()) > 2 ** 24
    big = ref.abs() > 2 ** 24
    assert torch.equal(got[~big], ref[~big])
    assert bool((got[big].sign() == ref[big].sign()).all()) and \
        bool((got[big].abs() >= 2 ** 24).all())


def test_preconditions_decline():
    w = torch.randint(-128, 128, (4, 3, 3, 3))
    kw = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    assert prepare_onednn_conv(w, x_qmin=-200, x_qmax=55, x_zero_point=0, **kw) is None
    assert prepare_onednn_conv(w, x_qmin=0, x_qmax=256, x_zero_point=0, **kw) is None
    assert prepare_onednn_conv(w * 2, x_qmin=0, x_qmax=255, x_zero_point=0, **kw) is None
    assert prepare_onednn_conv(w[:, :, 0], x_qmin=0, x_qmax=255, x_zero_point=0,
                               stride=[1], padding=[1], dilation=[1], groups=1) is None
    assert prepare_onednn_conv(w, x_qmin=0, x_qmax=255, x_zero_point=0, **kw) is not None
    # windows wholly in the padding (pad > dilation·(k − 1)): oneDNN once left such outputs
    # unwritten (a 2x2 kernel, padding 2, one input channel), so they take the GEMM path
    assert prepare_onednn_conv(w[:, :1, :2, :2], x_qmin=0, x_qmax=255, x_zero_point=0,
                               stride=[1, 1], padding=[2, 2], dilation=[1, 1], groups=1) is None
    assert prepare_onednn_conv(w[:, :1, :2, :2], x_qmin=0, x_qmax=255, x_zero_point=0,
                               stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1) is not None


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(16, 32, 1)
        self.c4 = nn.Conv2d(32, 16, 3, padding=2, dilation=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.relu(self.c2(y)) + y
        y = self.c4(torch.relu(self.c3(y)))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("rounding", ["gemmlowp", "single", "hawq", "float-rne"])
def test_layers_on_onednn_are_bit_exact(rounding, monkeypatch):
    gm, x, cal = calibrated(randomize(_Net(), 1), (2, 3, 20, 20))
    _, gm = lower(gm, x, cal, f"backend=fast rounding={rounding}")
    convs = [m for m in gm.modules() if isinstance(m, IntConv2d)]
    assert convs and all(m.kernel == "int8-mm" for m in convs)
    assert_backends_bit_exact(gm, x * 3)
    used = [m for m in convs if isinstance(m._direct(x), PreparedOnednnConv)]
    assert len(used) == len(convs)
    monkeypatch.setattr(int_conv_onednn, "ENABLED", False)     # the _int_mm path agrees too
    assert all(m._direct(x) is None for m in convs)
    assert_backends_bit_exact(gm, x * 3)


def test_the_kernel_table_names_the_engine_that_runs_each_layer(monkeypatch, capsys):
    from passes_registry import PassContext, PassManager
    from qpasses.modules.int_sim import set_backend
    gm, x, cal = calibrated(randomize(_Net(), 1), (2, 3, 20, 20))
    _, gm = lower(gm, x, cal, "backend=fast")
    rows = {r["layer"]: r for r in kernel_table(gm)}
    assert {rows[n]["cpu_engine"] for n in ("c1", "c2", "c3", "c4")} == {"onednn-conv"}
    assert rows["fc"]["cpu_engine"] == rows["fc"]["kernel"] == "int8-mm"   # a linear: the GEMM
    with PassContext(example_inputs=(x,)):
        PassManager.parse("graph(print<int-sim-kernels>)").run(gm)
    assert "on CPU: int8-mm: 1, onednn-conv: 4" in capsys.readouterr().out
    monkeypatch.setattr(int_conv_onednn, "ENABLED", False)
    assert {r["cpu_engine"] for r in kernel_table(gm)} == {"int8-mm"}
    monkeypatch.setattr(int_conv_onednn, "ENABLED", True)
    set_backend(gm, "reference")
    assert {r["cpu_engine"] for r in kernel_table(gm)} == {"reference"}


def test_the_kernel_table_reuses_what_a_forward_packed():
    # cpu_engine needs no input size: it takes the forward's packing instead of repacking
    # (which the next forward would undo, repacking for its size again)
    gm, x, cal = calibrated(randomize(_Net(), 1), (2, 3, 20, 20))
    _, gm = lower(gm, x, cal, "backend=fast")
    with torch.no_grad():
        gm(x)
    convs = [m for m in gm.modules() if isinstance(m, IntConv2d)]
    packed = [m.__dict__["_cache"]["onednn"] for m in convs]
    assert {r["cpu_engine"] for r in kernel_table(gm) if r["layer"] != "fc"} == {"onednn-conv"}
    with torch.no_grad():
        gm(x)
    assert all(m.__dict__["_cache"]["onednn"] is p for m, p in zip(convs, packed))
