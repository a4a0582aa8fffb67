"""tools/export_onnx.py in-process on a tiny model."""
from __future__ import annotations

import pytest

pytest.importorskip("onnx")

import onnx  # noqa: E402

from tools.export_onnx import main  # noqa: E402


def test_writes_a_checked_model(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(["--model", "tests.models:tiny_mlp", "--input-shape", "2,12", "--format",
               "qoperator", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    onnx.checker.check_model(onnx.load(str(out)))
    assert "wrote" in capsys.readouterr().out
