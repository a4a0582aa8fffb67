"""export_onnx (docs/export.md): onnxruntime reproduces the int-sim graph (rounding=float-rne) at
every quantization point, in the QDQ and QOperator formats; the checked model properties; and the
errors users can hit."""
from __future__ import annotations

import copy
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402

from passes_registry import PassContext, PassManager  # noqa: E402
from qpasses.errors import ExportDependencyError, ExportError, ExportWarning  # noqa: E402
from qpasses.export import export_onnx  # noqa: E402

from ..passes.int_sim_helpers import calibrated, lower, randomize  # noqa: E402
from .helpers import compare_codes, ort_session  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FORMATS = ["qdq", "qoperator"]
W8A8 = "weight-bits=8 act-bits=8"
W4A8 = "weight-bits=4 act-bits=8 first-last-bits=8"


class Small(nn.Module):
    """conv/relu, residual add, max pool, 1x1 conv, ReLU before global pool, linear."""

    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=bias)
        self.c3 = nn.Conv2d(8, 16, 1, bias=bias)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.max_pool2d(F.relu(self.c2(a)) + a, 2)
        c = F.relu(self.c3(b))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(c, 1), 1))


def _lowered(bits: str, bias: bool = False, seed: int = 0):
    gm, x, cal = calibrated(randomize(Small(bias), seed), (2, 3, 8, 8), bits=bits, seed=seed)
    return lower(gm, x, cal, "rounding=float-rne")[1]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", [W8A8, W4A8])
def test_bit_exact_at_every_quantization_point(fmt, bits):
    """Without float biases (the one op where onnxruntime's arithmetic differs) every code that
    onnxruntime computes equals the int-sim's, and the logits agree to float rounding."""
    gm = _lowered(bits)
    res = export_onnx(gm, None, format=fmt)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    rep = compare_codes(res, x)
    out = rep.pop("__output__")
    assert len(rep) >= 5
    assert all(v["max"] == 0 for v in rep.values()), rep
    assert out["top1"] == 1.0 and out["max"] < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_float_bias_bound(fmt):
    """With biases the int-sim adds fbgemm's float bias, onnxruntime the int32 bias: per layer at
    most 1 LSB (measured), cascading to a few LSB; same top-1."""
    gm = _lowered(W8A8, bias=True)
    res = export_onnx(gm, None, format=fmt)
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    rep = compare_codes(res, x)
    assert rep["c1"]["max"] <= 1 and rep["c1"]["frac"] < 0.05
    assert all(v["max"] <= 3 for k, v in rep.items() if k != "__output__")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bits", [W8A8, W4A8])
def test_digits_top1_agreement(digits_cnn, fmt, bits):
    d = digits_cnn
    model = copy.deepcopy(d.model)
    import qpasses
    x0 = d.x_train[:64]
    gm = qpasses.trace(model, (x0,))
    cal = [b for b, _ in d.batches(4)]
    with PassContext(example_inputs=(x0,), calibration_data=cal):
        PassManager.parse(f"graph(canonicalize,fold-batch-norm,annotate-bitwidths{{{bits}}},"
                          "insert-fake-quant,calibrate,lower-to-int-sim{rounding=float-rne})"
                          ).run(gm)
    res = export_onnx(gm, None, format=fmt)
    rep = compare_codes(res, d.x_test)
    assert rep.pop("__output__")["top1"] == 1.0
    assert all(v["max"] <= 2 for v in rep.values()), rep


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_properties(tmp_path, fmt):
    gm = _lowered(W8A8)
    path = tmp_path / "m.onnx"
    res = export_onnx(gm, path, format=fmt)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert res.opset >= 17
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    names = {n.name for n in model.graph.node}
    for fx_name in ("c1", "c2", "add", "fc"):
        assert fx_name in names
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    sess = ort_session(model)
    for batch in (1, 5):
        y = sess.run(None, {"x": np.random.rand(batch, 3, 8, 8).astype(np.float32)})[0]
        assert y.shape == (batch, 5)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]       # no temporary file left
    if fmt == "qoperator":
        ops = {n.op_type for n in model.graph.node}
        assert {"QLinearConv", "QLinearAdd", "MaxPool", "ConvInteger"} <= ops
        assert "Conv" not in ops
    else:
        ops = [n.op_type for n in model.graph.node]
        assert "Conv" in ops and "QLinearConv" not in ops
        # per-channel weight scales
        w_dq = [n for n in model.graph.node if n.name == "c1/weight_dequantize"][0]
        init = {i.name: i for i in model.graph.initializer}
        assert onnx.numpy_helper.to_array(init[w_dq.input[1]]).shape == (8,)
        assert onnx.numpy_helper.to_array(init[w_dq.input[0]]).dtype == np.int8


def test_sub_8_bit_codes_stay_in_range():
    gm = _lowered("weight-bits=4 act-bits=4 first-last-bits=none")
    res = export_onnx(gm, None, format="qdq")
    init = {i.name: onnx.numpy_helper.to_array(i) for i in res.model.graph.initializer}
    w = init["c2.weight_q"]
    assert w.dtype == np.int8 and w.min() >= -8 and w.max() <= 7
    x = torch.randn(8, 3, 8, 8)
    rep = compare_codes(res, x)
    assert all(v["max"] == 0 for k, v in rep.items() if k != "__output__"), rep


def test_lowers_a_copy_of_a_calibrated_graph_and_never_mutates():
    gm, x, cal = calibrated(randomize(Small()), (2, 3, 8, 8))
    before = str(gm.graph)
    with pytest.raises(ExportError, match="lower-to-int-sim"):
        export_onnx(gm, None)
    res = export_onnx(gm, None, example_inputs=(x,), calibration_data=cal)
    assert str(gm.graph) == before and res.lowered is not gm


def test_not_calibrated_names_the_pass():
    import qpasses
    gm = qpasses.trace(Small(), (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ExportError, match="calibrate"):
        export_onnx(gm, None)


class WithIsland(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        return self.c2(a / (a + 1.0))


def test_float_islands_warn_or_fail_strict(tmp_path):
    gm, x, cal = calibrated(randomize(WithIsland()), (2, 3, 6, 6))
    gm = lower(gm, x, cal, "rounding=float-rne")[1]
    from passes_registry import get_record
    from qpasses.ir.records import INT_SIM_KEY
    if not get_record(gm, INT_SIM_KEY).float_islands:
        pytest.skip("exp was lowered as a table")
    path = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match="float islands"):
        export_onnx(gm, path, strict=True)
    assert not os.listdir(tmp_path)                 # never a half-written file
    with pytest.warns(ExportWarning, match="float islands"):
        export_onnx(gm, path)


def test_qoperator_rejects_wide_codes():
    gm = _lowered("weight-bits=8 act-bits=12 first-last-bits=none")
    with pytest.raises(ExportError, match="wider than 8 bits.*qdq"):
        export_onnx(gm, None, format="qoperator")
    res = export_onnx(gm, None, format="qdq")           # 16-bit containers, opset 21
    assert res.opset >= 21


def test_missing_onnx_names_the_extra(monkeypatch):
    gm = _lowered(W8A8)
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ExportDependencyError, match=r"qpasses\[onnx\]"):
        export_onnx(gm, None)


def test_unknown_format():
    with pytest.raises(ExportError, match="unknown format"):
        export_onnx(_lowered(W8A8), None, format="tflite")
