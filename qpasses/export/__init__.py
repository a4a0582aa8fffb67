"""Export a quantized graph to ONNX (docs/export.md).

``export_onnx(gm, path, format="qdq" | "qoperator")`` writes the lowered integer graph of ``gm``
(``lower-to-int-sim{rounding=float-rne bias=int32}``, ONNX Runtime's contract) as an ONNX
model with a dynamic batch dimension, opset 17 or newer, checked by ``onnx.checker``, nodes named
after the fx nodes. A calibrated fake-quant graph is lowered on a copy first (never the user's
graph). ``format=qdq`` puts QuantizeLinear/DequantizeLinear exactly at the quantization points
around float Conv/Gemm/Add/pool ops (per-channel weight scales, int32 biases at ``s_x·s_w``,
sub-8-bit codes in int8/uint8 containers clipped to their range); ``format=qoperator`` writes the
integer operators (QLinearConv, QGemm, QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, ...,
MaxPool on codes, lookup tables as Gather) so the model runs integer-only in onnxruntime;
``format=qonnx`` writes QONNX ``Quant`` nodes with the real (per-kernel) bit-widths for FINN /
hls4ml (:mod:`qpasses.export.onnx_qonnx`), reproducing the fake-quant graph.

The package needs the ``onnx`` extra (``pip install 'qpasses[onnx]'``); the rest of qpasses does
not import it.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from passes_registry import get_record, graph_properties

from qpasses.errors import ExportDependencyError, ExportError, ExportWarning
from qpasses.ir.records import INT_SIM_KEY

__all__ = ["EXPORT_LOWERING", "ExportResult", "export_onnx", "require_onnx"]

DEFAULT_OPSET = 17
# the lowering whose integers onnxruntime reproduces bit for bit (docs/export.md)
EXPORT_LOWERING = "lower-to-int-sim{rounding=float-rne bias=int32}"


def require_onnx() -> Any:
    """The ``onnx`` module, or :class:`ExportDependencyError` naming the extra to install."""
    try:
        import onnx
    except ImportError as e:
        raise ExportDependencyError(
            "export-onnx needs the 'onnx' package: pip install 'qpasses[onnx]' (or "
            "pip install onnx onnxruntime)") from e
    return onnx


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the path, the format, the opset, the ONNX model, the float
    islands it exported as float ops, the lowered graph it translated and, per fx node whose codes
    the ONNX graph names after it, ``shifts`` (ONNX code − int-sim code: int8 grids travel as
    uint8, see docs/export.md)."""
    path: str | None
    format: str
    opset: int
    model: Any = field(repr=False)
    float_islands: list[dict[str, str]] = field(default_factory=list)
    lowered: torch.fx.GraphModule | None = field(default=None, repr=False)
    shifts: dict[str, int] = field(default_factory=dict)


def _lowered(gm: torch.fx.GraphModule, example_inputs: tuple | None,
             calibration_data: Any) -> torch.fx.GraphModule:
    """``gm`` when it is lowered; else a lowered copy of a calibrated fake-quant graph."""
    if get_record(gm, INT_SIM_KEY) is not None:
        return gm
    props = graph_properties(gm)
    if "calibrated" not in props:
        what = "fake-quant-inserted" in props
        raise ExportError(
            "export-onnx: the graph is not calibrated; run "
            + ("calibrate" if what else "annotate-bitwidths,insert-fake-quant,calibrate")
            + f" and then {EXPORT_LOWERING} (or pass a lowered graph)")
    if example_inputs is None:
        raise ExportError(f"export-onnx: the graph is calibrated but not lowered; run "
                          f"{EXPORT_LOWERING} first, or pass example_inputs so that export_onnx "
                          "lowers a copy")
    from passes_registry import PassContext, PassManager
    low = copy.deepcopy(gm)
    with PassContext(example_inputs=tuple(example_inputs),
                     calibration_data=calibration_data or [tuple(example_inputs)]):
        PassManager.parse(f"graph({EXPORT_LOWERING})", assume=low).run(low)
    return low


def _float_biases(gm: torch.fx.GraphModule) -> bool:
    """Whether a layer of the lowered ``gm`` adds fbgemm's float bias (``bias=float``)."""
    from qpasses.modules.int_sim_layers import IntLayer
    return any(isinstance(m, IntLayer) and m.float_bias_fused for m in gm.modules())


def export_onnx(gm: torch.fx.GraphModule, path: str | os.PathLike | None = None, *,
                format: str = "qdq", opset: int = DEFAULT_OPSET, strict: bool = False,
                example_inputs: tuple | None = None,
                calibration_data: Any = None) -> ExportResult:
    """Export ``gm`` (lowered, or calibrated with ``example_inputs`` to lower a copy) to ONNX.

    ``path``: where to write (to a temporary file in the same folder, renamed when complete; None
    only builds the model). ``strict``: float islands raise :class:`ExportError` instead of a
    warning. The graph ``gm`` is never modified."""
    onnx = require_onnx()
    from onnx import helper
    from qpasses.export.onnx_export import GraphExporter
    if opset < 17:
        raise ExportError(f"export-onnx: opset {opset} is too old; use 17 or newer")
    low = _lowered(gm, example_inputs, calibration_data)
    rec = get_record(low, INT_SIM_KEY)
    if format == "qonnx":
        pass                  # QONNX reproduces the fake-quant graph, whatever the contract
    elif rec.rounding != "float-rne":
        warnings.warn(f"export-onnx: the graph was lowered with rounding={rec.rounding}; "
                      "onnxruntime requantizes like rounding=float-rne, so its outputs can "
                      "differ from the int-sim's by a few LSB (lower with "
                      f"{EXPORT_LOWERING} for the bit-exact contract)", ExportWarning,
                      stacklevel=2)
    elif rec.bias != "int32" and _float_biases(low):
        warnings.warn("export-onnx: the graph was lowered with rounding=float-rne bias=float "
                      "(fbgemm's float bias); onnxruntime adds the int32 bias, so codes after "
                      f"layers with a bias can differ by 1 LSB per layer (lower with "
                      f"{EXPORT_LOWERING} for the bit-exact contract)", ExportWarning,
                      stacklevel=2)
    ex = GraphExporter(low, format, strict=strict)
    g = ex.run()
    opset = max(opset, g.min_opset)
    graph = helper.make_graph(g.nodes, getattr(gm, "_get_name", lambda: "qpasses")(), g.inputs,
                              g.outputs, g.initializers)
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1)
                                                  for d in sorted(g.domains)]
    model = helper.make_model(graph, opset_imports=imports, producer_name="qpasses")
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    if path is not None:
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx.tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return ExportResult(path, format, opset, model, list(ex.islands), low, dict(ex.shifts))
