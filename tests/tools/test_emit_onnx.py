"""``--emit onnx=PATH`` (tools/emit.py) in tools/dump_graph.py and tools/qpass_opt.py, in-process on
a tiny model: every format writes a checked model that onnxruntime (qdq, qoperator) runs; a
calibrated graph is lowered on a copy; bad specs and unexportable graphs get typed errors."""
from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import numpy as np  # noqa: E402
import onnx  # noqa: E402

from tools import dump_graph, qpass_opt  # noqa: E402

TINY = ["--model", "tests.models:tiny_cnn", "--input-shape", "2,3,8,8"]
CALIBRATED = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths,insert-fake-quant,"
              "calibrate)")
LOWERED = CALIBRATED[:-1] + ",lower-to-int-sim{rounding=float-rne bias=int32})"


def _run_ort(path, batch=3):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    x = np.random.rand(batch, *inp.shape[1:]).astype(np.float32)
    return sess.run(None, {inp.name: x})[0]


@pytest.mark.parametrize("fmt", ["qdq", "qoperator"])
def test_qpass_opt_emits_onnx(tmp_path, capsys, fmt):
    out = tmp_path / "m.onnx"
    rc = qpass_opt.main(TINY + ["--pass-pipeline", LOWERED, "--calibration", "random:2",
                                "--no-output", "--emit", f"onnx={out}", "--onnx-format", fmt])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"wrote {out} ({fmt}" in err
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert ("QLinearConv" in ops) == (fmt == "qoperator")
    assert _run_ort(out).shape[0] == 3


def test_dump_graph_emits_from_a_calibrated_graph(tmp_path, capsys):
    """A calibrated (not lowered) graph is lowered on a copy; stdout keeps only the report."""
    out = tmp_path / "m.onnx"
    rc = dump_graph.main(TINY + ["--pipeline", CALIBRATED, "--format", "json", "--emit",
                                 f"onnx={out}", "--onnx-format", "qoperator"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert cap.out.lstrip().startswith("{") and "wrote" in cap.err
    onnx.checker.check_model(onnx.load(str(out)))
    assert _run_ort(out).shape[0] == 3


def test_dump_graph_emits_qonnx(tmp_path):
    pytest.importorskip("qonnx")
    out = tmp_path / "m.onnx"
    dump_graph.dump("tests.models:tiny_cnn", "2,3,8,8", LOWERED, emit_specs=[f"onnx={out}"],
                    onnx_format="qonnx")
    model = onnx.load(str(out))
    assert "Quant" in {n.op_type for n in model.graph.node}


@pytest.mark.parametrize("spec", ["onnx", "onnx=", "tflite=m.tflite"])
def test_bad_emit_spec_is_a_typed_error(tmp_path, capsys, spec):
    rc = qpass_opt.main(TINY + ["--pass-pipeline", "graph(dce)", "--emit", spec])
    err = capsys.readouterr().err
    assert rc == 2 and "--emit" in err and "onnx=" in err


def test_uncalibrated_graph_names_the_passes(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = dump_graph.main(TINY + ["--pipeline", "graph(canonicalize)", "--emit", f"onnx={out}"])
    err = capsys.readouterr().err
    assert rc == 2 and "calibrate" in err and "lower-to-int-sim" in err
    assert not list(tmp_path.iterdir())
