"""``--emit onnx=PATH``: the ONNX export flags shared by tools/dump_graph.py and tools/qpass_opt.py.

After the pipeline ran, the final graph is written with :func:`qpasses.export.export_onnx`
(docs/export.md): a lowered graph as it is, a calibrated fake-quant graph lowered on a copy with
``lower-to-int-sim{rounding=float-rne bias=int32}`` (the tool's example inputs and calibration
data). ``--onnx-format`` picks ``qdq`` (default), ``qoperator`` or ``qonnx``; ``--onnx-strict``
makes float islands an error. A graph that cannot be exported gets the exporter's typed error
naming the pass to run.
"""
from __future__ import annotations

from typing import Any

import torch.fx

from qpasses.errors import InputError

__all__ = ["EMIT_KINDS", "ONNX_FORMATS", "add_emit_arguments", "emit", "parse_emit"]

EMIT_KINDS = ("onnx",)
ONNX_FORMATS = ("qdq", "qoperator", "qonnx")


def add_emit_arguments(group: Any) -> None:
    """Add ``--emit``, ``--onnx-format`` and ``--onnx-strict`` to a parser or argument group."""
    group.add_argument("--emit", action="append", default=None, metavar="onnx=PATH",
                       help="also write the final graph as ONNX (docs/export.md); a calibrated "
                            "graph is lowered on a copy first (repeatable)")
    group.add_argument("--onnx-format", choices=ONNX_FORMATS, default="qdq",
                       help="ONNX flavour for --emit onnx=PATH: qdq (QuantizeLinear/"
                            "DequantizeLinear), qoperator (QLinearConv, ... integer-only) or "
                            "qonnx (QONNX Quant nodes with the real bit-widths)")
    group.add_argument("--onnx-strict", action="store_true",
                       help="--emit: float islands are an error instead of a warning")


def parse_emit(specs: list[str] | None) -> list[tuple[str, str]]:
    """``[(kind, path)]`` of ``--emit KIND=PATH`` values; :class:`InputError` for a bad one."""
    out = []
    for spec in specs or ():
        kind, sep, path = spec.partition("=")
        if not sep or not path or kind not in EMIT_KINDS:
            raise InputError(f"--emit {spec!r}: expected KIND=PATH with KIND one of "
                             f"{', '.join(EMIT_KINDS)} (e.g. --emit onnx=model.onnx)")
        out.append((kind, path))
    return out


def emit(gm: torch.fx.GraphModule, inputs: tuple | None, specs: list[str] | None,
         onnx_format: str = "qdq", onnx_strict: bool = False,
         calibration_data: Any = None) -> list[str]:
    """Write every ``--emit`` target (``specs``) for ``gm``; returns one line per file."""
    targets = parse_emit(specs)
    if not targets:
        return []
    from qpasses.export import export_onnx
    lines = []
    for _kind, path in targets:
        res = export_onnx(gm, path, format=onnx_format, strict=onnx_strict,
                          example_inputs=inputs, calibration_data=calibration_data)
        lines.append(f"wrote {res.path} ({res.format}, opset {res.opset}, "
                     f"{len(res.model.graph.node)} nodes, {len(res.float_islands)} float islands)")
    return lines
