"""The ``ort-int8`` section of ``python -m tools.bench`` (importing this module registers it):
our exported QOperator model in onnxruntime vs onnxruntime's own ``quantize_static`` QDQ model of
the fp32 model, torch.ao fbgemm int8 (``convert_fx``) and our int-sim (fast backend), relative to
fp32, in one process, interleaved. ``--threads 1`` for the single-thread comparison; ``--batch``
and ``--image-size`` shrink the input (default ResNet-50, 8x3x224x224)."""
from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import warnings
from typing import Any

import torch

import qpasses
from passes_registry import PassContext, PassManager
from qpasses.export import EXPORT_LOWERING, export_onnx
from tools.bench_harness import Section, benchmark
from tools.bench_sections import INT_SIM_PIPELINE, time_variants, torch_ao_int8

ORT_MODEL = "resnet50"


def _ort_runner(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x.numpy()})[0]


def _ort_quantize_static(model: torch.nn.Module, x: torch.Tensor, cal: list[torch.Tensor],
                         folder: str) -> bytes:
    """onnxruntime's QDQ model (per-channel int8 weights, uint8 activations, MinMax) of fp32."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)
    fp32, q = os.path.join(folder, "fp32.onnx"), os.path.join(folder, "qdq.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), fp32, input_names=["x"], opset_version=17, dynamo=False)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": c.expand(x.shape[0], *c.shape[1:]).numpy()} for c in cal])

        def get_next(self) -> Any:
            return next(self.it, None)
    logging.disable(logging.WARNING)        # its root-logger advice on every conv bias
    try:
        quantize_static(fp32, q, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    with open(q, "rb") as f:
        return f.read()


@benchmark("ort-int8", "ResNet-50 batch 8 at 224x224 inference: our QOperator export in "
                       "onnxruntime vs onnxruntime quantize_static (QDQ), torch.ao fbgemm int8 "
                       "and the int-sim, vs fp32 (--batch, --image-size shrink it)")
def bench_ort_int8(cfg: argparse.Namespace) -> Section:
    import torchvision
    sec = Section("ort-int8", ratio_label="ratio vs fp32")
    threads = torch.get_num_threads()
    torch.manual_seed(cfg.seed)
    model = getattr(torchvision.models, ORT_MODEL)().eval()
    x = torch.randn(cfg.batch, 3, cfg.image_size, cfg.image_size)
    cal = [torch.randn(1, *x.shape[1:]) for _ in range(2)]
    gm = qpasses.trace(model, (x,))
    head = INT_SIM_PIPELINE.split(",lower-to-int-sim")[0] + ")"
    with PassContext(example_inputs=(x,), calibration_data=cal, verify_each=False):
        PassManager.parse(head).run(gm)
    fast = copy.deepcopy(gm)
    with PassContext(example_inputs=(x,), calibration_data=cal, verify_each=False):
        PassManager.parse(f"graph({EXPORT_LOWERING})", assume=gm).run(gm)
        PassManager.parse("graph(lower-to-int-sim{backend=fast keep-fake-quant=false})",
                          assume=fast).run(fast)
    ours = export_onnx(gm, None, format="qoperator").model.SerializeToString()
    fbgemm = torch_ao_int8(model, x, cal)
    with tempfile.TemporaryDirectory() as folder:
        qdq = _ort_quantize_static(model, x, cal, folder)
    variants = {"fp32": model, "ours: QOperator export in onnxruntime": _ort_runner(ours, threads),
                "onnxruntime quantize_static (QDQ)": _ort_runner(qdq, threads),
                "torch.ao convert_fx (fbgemm int8)": fbgemm, "int-sim fast (ours)": fast}
    time_variants(sec, variants, x, cfg, "fp32")
    sec.notes.append(f"{ORT_MODEL} {'x'.join(map(str, x.shape))}, W8A8; ours exported after "
                     f"{EXPORT_LOWERING}; {cfg.repeat} interleaved runs, {threads} threads "
                     "(onnxruntime sessions: the same intra-op threads)")
    return sec
