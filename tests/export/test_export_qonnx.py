"""export_onnx(format="qonnx") (docs/export.md, "QONNX"): QONNX ``Quant`` nodes with the real
bit-widths, run by the ``qonnx`` package's own executor, reproduce the fake-quant graph's outputs
to float tolerance (and the int-sim's), with per-layer and per-kernel widths, 0-bit kernels and
0-bit channels pruned away; the ``Quant`` parameters follow the QONNX semantics exactly."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("onnx")
pytest.importorskip("qonnx")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from qonnx.core.modelwrapper import ModelWrapper  # noqa: E402
from qonnx.core.onnx_exec import execute_onnx  # noqa: E402
from qonnx.custom_op.general.intquant import int_quant  # noqa: E402
from qonnx.transformation.infer_shapes import InferShapes  # noqa: E402

from passes_registry import PassContext, PassManager  # noqa: E402
from qpasses.export import export_onnx  # noqa: E402
from qpasses.export.onnx_qonnx import QONNX_DOMAIN, quant_range  # noqa: E402

from ..passes.int_sim_helpers import calibrated, lower, randomize  # noqa: E402
from .test_export_onnx import Small  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
INT32_BIAS = "rounding=float-rne bias=int32"


def run_qonnx(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    """qonnx's executor (node by node; custom ops in Python) on ``x``: it wants every shape
    fixed, so the dynamic batch dimension is set to ``len(x)`` on a copy first."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in list(m.graph.input) + list(m.graph.output):
        t.type.tensor_type.shape.dim[0].dim_value = len(x)
    mw = ModelWrapper(m).transform(InferShapes())
    out = execute_onnx(mw, {m.graph.input[0].name: x.numpy()})
    return out[m.graph.output[0].name]


def _check(fq, low, res, x, tol=1e-4):
    y = run_qonnx(res.model, x)
    with torch.no_grad():
        y_fq, y_int = fq(x).numpy(), low(x).numpy()
    scale = float(np.abs(y_fq).max())
    err = np.abs(y - y_fq).max()
    assert err <= tol * scale, err / scale
    assert (y.argmax(1) == y_fq.argmax(1)).all()


def _bitwidths(model: onnx.ModelProto) -> dict[str, float]:
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "Quant":
            assert n.domain == QONNX_DOMAIN
            bw = init[n.input[3]]
            assert bw.ndim == 0                     # the QONNX spec: a scalar bit-width
            out[n.name] = float(bw)
    return out


@pytest.mark.parametrize("bits", ["weight-bits=8 act-bits=8", "weight-bits=4 act-bits=8 "
                                  "first-last-bits=8", "weight-bits=3 act-bits=4 "
                                  "first-last-bits=none"])
def test_qonnx_executor_reproduces_fake_quant(bits):
    gm, x, cal = calibrated(randomize(Small(bias=True)), (2, 3, 8, 8), bits=bits)
    fq, low = lower(gm, x, cal, INT32_BIAS)
    res = export_onnx(low, None, format="qonnx")
    onnx.checker.check_model(res.model)
    assert {o.domain for o in res.model.opset_import} >= {"", QONNX_DOMAIN}
    ops = {n.op_type for n in res.model.graph.node}
    assert "Quant" in ops and not ops & {"QuantizeLinear", "DequantizeLinear", "QLinearConv"}
    widths = _bitwidths(res.model)
    w = int(bits.split("weight-bits=")[1].split()[0])
    assert widths["c2/weight_quant"] == w
    _check(fq, low, res, torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(3)))


def test_per_kernel_widths_and_zero_bit_kernels():
    """One Quant per width over that width's kernels (scalar bit-widths), put back in channel
    order; 0-bit kernels are exact zeros."""
    cfg = {"c2": {"weight_bits": [2, 3, 4, 0, 6, 4, 8, 2], "act_bits": 6}}
    gm, x, cal = calibrated(randomize(Small(bias=True)), (2, 3, 8, 8),
                            bits="first-last-bits=none", config=cfg)
    fq, low = lower(gm, x, cal, INT32_BIAS)
    res = export_onnx(low, None, format="qonnx")
    widths = _bitwidths(res.model)
    assert sorted(v for k, v in widths.items() if k.startswith("c2/weight")) == [2, 3, 4, 6, 8]
    init = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    assert init["c2.weight.0bit"].shape[0] == 1 and not init["c2.weight.0bit"].any()
    assert any(n.name == "c2/weight_order" for n in res.model.graph.node)
    _check(fq, low, res, torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4)))


def test_pruned_channels_are_physically_absent():
    cfg = {"c3": {"weight_bits": [8, 0, 8, 0, 8, 8, 8, 8, 4, 4, 4, 4, 0, 8, 8, 8], "act_bits": 8}}
    gm, x, cal = calibrated(randomize(Small()), (2, 3, 8, 8), bits="first-last-bits=none",
                            config=cfg)
    with PassContext(example_inputs=(x,), calibration_data=cal):
        PassManager.parse("graph(fixpoint(prune-zero-bit-channels,dce))", assume=gm).run(gm)
    fq, low = lower(gm, x, cal, INT32_BIAS)
    res = export_onnx(low, None, format="qonnx")
    init = {i.name: numpy_helper.to_array(i) for i in res.model.graph.initializer}
    assert init["c3.weight.8bit_float"].shape[0] == 9
    assert init["c3.weight.4bit_float"].shape[0] == 4
    assert init["fc.weight_float"].shape[1] == 13
    assert not any("0bit" in k for k in init)
    _check(fq, low, res, torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5)))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.data())
def test_quant_node_is_our_grid(bits, data):
    """Quant(scale, zeropt + offset, bitwidth, signed, narrow) of quant_range, then the float
    Clip the exporter adds for a narrower range, equals our fake quantizer on the grid
    (s, z, [qmin, qmax]) for every declared range (qonnx's own int_quant)."""
    signed = data.draw(st.booleans())
    lo_full, hi_full = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    qmin = data.draw(st.integers(lo_full, hi_full))
    qmax = data.draw(st.integers(qmin, hi_full))
    z = data.draw(st.integers(qmin, qmax))
    s = np.float32(data.draw(st.floats(1e-3, 10.0)))
    x = np.asarray(data.draw(st.lists(st.floats(-2e3, 2e3, width=32), min_size=1, max_size=20)),
                   dtype=np.float32) * s
    b, sg, nar, off = quant_range(qmin, qmax)
    y = int_quant(x, s, np.float32(z + off), np.float32(b), sg, nar, "ROUND")
    lo, hi = np.float32((qmin - z) * s), np.float32((qmax - z) * s)
    y = np.clip(y, lo, hi)
    codes = np.clip(np.round(x.astype(np.float64) / np.float64(s)) + z, qmin, qmax)
    ref = ((codes - z) * np.float64(s)).astype(np.float32)
    # x/s in float32 vs float64 can flip a value sitting on a rounding tie by one step
    assert np.all(np.abs(y - ref) <= s * (1 + 1e-6))
    assert np.mean(y == ref) >= 0.5 or len(x) < 4


def test_one_bit_signed_grid_is_not_bipolar():
    """A signed 1-bit grid {-1, 0} goes out unsigned with the zero point moved by one (a signed
    1-bit Quant would be QONNX's bipolar ±1)."""
    b, signed, narrow, off = quant_range(-1, 0)
    assert (b, signed, narrow, off) == (1, False, False, 1)
    x = np.array([-3.0, -0.6, -0.4, 0.0, 0.7], dtype=np.float32)
    y = int_quant(x, np.float32(1), np.float32(0 + off), np.float32(b), signed, narrow, "ROUND")
    assert y.tolist() == [-1.0, -1.0, -0.0, 0.0, 0.0]


def test_qonnx_written_atomically(tmp_path):
    gm, x, cal = calibrated(randomize(Small()), (2, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_onnx(gm, tmp_path / "m.onnx", format="qonnx", example_inputs=(x,),
                          calibration_data=cal)
    assert res.format == "qonnx" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
