"""Quantize a model and export it to ONNX (QDQ or QOperator), ready for onnxruntime.

    python -m tools.export_onnx --model torchvision:resnet18 --input-shape 1,3,224,224 \\
        --format qoperator --out resnet18_int8.onnx

The model is built (random init unless the factory loads weights), traced, run through
``--pipeline`` (default: canonicalize, fold BN, W8A8 annotation, fake-quant, calibration on
random batches, ``lower-to-int-sim{rounding=float-rne bias=int32}``) and written with
:func:`qpasses.export.export_onnx` (docs/export.md). Needs the ``onnx`` extra.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from qpasses.cli import calibration_data, run_main
from tools.dump_graph import build, run_pipeline

DEFAULT_PIPELINE = ("graph(canonicalize,fold-batch-norm,annotate-bitwidths,insert-fake-quant,"
                    "calibrate,lower-to-int-sim{rounding=float-rne bias=int32})")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.export_onnx", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="torchvision:NAME or package.module:factory")
    p.add_argument("--input-shape", default=None, help="e.g. 1,3,224,224")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE,
                   help="pipeline ending in a calibrated or lowered graph")
    p.add_argument("--calibration", default="random:4",
                   help="calibration data: random:N or a torch.save'd list of batches")
    p.add_argument("--format", choices=("qdq", "qoperator", "qonnx"), default="qdq")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--strict", action="store_true", help="float islands are an error")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def body() -> int:
        from qpasses.export import export_onnx
        gm, inputs = build(args.model, args.input_shape, args.seed)
        cal = calibration_data(args.calibration, inputs, args.seed)
        gm, _ = run_pipeline(gm, inputs, args.pipeline, calibration_data=cal)
        t0 = time.perf_counter()
        res = export_onnx(gm, args.out, format=args.format, opset=args.opset,
                          strict=args.strict, example_inputs=inputs, calibration_data=cal)
        dt = time.perf_counter() - t0
        print(f"wrote {res.path} ({res.format}, opset {res.opset}, "
              f"{len(res.model.graph.node)} nodes, {len(res.float_islands)} float islands) "
              f"in {dt:.2f} s")
        return 0
    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
