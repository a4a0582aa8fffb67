"""Shared helpers of the export tests: run an exported model in onnxruntime with every code
tensor named after an fx node exposed as an output, and the int-sim's value of every node."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from passes_registry import get_record
from qpasses.ir.records import INT_SIM_KEY


def int_sim_values(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every node's value in the lowered graph (fx Interpreter)."""
    out: dict[str, np.ndarray] = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            v = super().run_node(n)
            if isinstance(v, torch.Tensor):
                out[n.name] = v.detach().numpy()
            return v
    with torch.no_grad():
        Rec(gm).run(x)
    return out


def ort_session(model: Any, extra_outputs: list[str] = (), threads: int = 1) -> Any:
    """An onnxruntime session on ``model`` (a ModelProto) with ``extra_outputs`` exposed."""
    import onnx
    import onnxruntime as ort
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in extra_outputs:
        if name not in have:
            m.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def code_points(result: Any) -> dict[str, int]:
    """fx node name -> shift (ONNX code = int-sim code + shift) of every quantization point the
    exported model names after the fx node (the int-sim record's fq_map nodes)."""
    rec = get_record(result.lowered, INT_SIM_KEY)
    onnx_names = {o for n in result.model.graph.node for o in n.output}
    out = {}
    for v in rec.fq_map.values():
        if v["node"] in onnx_names:
            out[v["node"]] = result.shifts.get(v["node"], 0)
    return out


def compare_codes(result: Any, x: torch.Tensor, threads: int = 1) -> dict[str, dict[str, float]]:
    """Per quantization point: max |ORT code − int-sim code| and the fraction that differs; plus
    ``__output__``: max |diff| of the float outputs and top-1 agreement."""
    points = code_points(result)
    sess = ort_session(result.model, list(points), threads)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x.numpy()})))
    ref = int_sim_values(result.lowered, x)
    rep: dict[str, dict[str, float]] = {}
    for node, shift in points.items():
        a = outs[node].astype(np.int64) - shift
        b = ref[node].astype(np.int64)
        d = np.abs(a - b)
        rep[node] = {"max": float(d.max(initial=0)), "frac": float((d > 0).mean()) if d.size else 0.0}
    y_ort = outs[names[0]]
    out_node = [n for n in result.lowered.graph.nodes if n.op == "output"][0]
    y_ref = ref[out_node.args[0].name]
    rep["__output__"] = {"max": float(np.abs(y_ort - y_ref).max()),
                         "top1": float((y_ort.reshape(len(x), -1).argmax(1)
                                        == y_ref.reshape(len(x), -1).argmax(1)).mean())}
    return rep
