"""The per-layer report (schema fixed in DESIGN.md), read by tools and tests.

Costs follow FracBits (reference §1.5, §7): BitOPs = Σ_k MACs_k · w_k · a, summed per kernel when
bits are per kernel (0-bit kernels cost nothing); a quantized first layer's input counts as 8 bits;
layers without a bit annotation are counted as fp32 (32 × 32, HAWQ's convention) so a float model
has a comparable total. Size is weights at their bit-width plus 32-bit biases.
"""
from __future__ import annotations

import math
from typing import Any

import torch.fx
from tabulate import tabulate

from passes_registry import graph_history

from .graph import LayerInfo, first_last_layers, quantizable_layers
from .meta import QMeta, get_qmeta
from .numerics import costs
from .trace import MODEL_KEY

FP_BITS = 32
FIRST_LAYER_INPUT_BITS = 8


def layer_row(info: LayerInfo, qmeta: QMeta, is_first: bool) -> dict[str, Any]:
    """One report row from the layer's shapes and its annotation."""
    w, a = qmeta.weight, qmeta.act
    kernel_macs = info.fan_in * math.prod(info.out_spatial)
    kernel_params = info.fan_in
    w_bits = w.bits if w is not None else None
    per_kernel = list(w.kernel_bits(info.out_channels)) if w is not None and w.per_kernel else None
    a_bits = a.bits if a is not None else None
    quantized = w is not None or a is not None
    wb: Any = per_kernel if per_kernel is not None else (w_bits if w_bits is not None else FP_BITS)
    ab = a_bits if a_bits is not None else FP_BITS
    if quantized and is_first:
        ab = FIRST_LAYER_INPUT_BITS
    bitops = costs.layer_bitops(kernel_macs, wb, ab, num_kernels=info.out_channels)
    size_bits = costs.layer_size_bits(kernel_params, wb,
                                      bias_count=info.out_channels if info.has_bias else 0,
                                      num_kernels=info.out_channels)
    acc_bits = None
    if w is not None and a is not None and w.bits > 0 and a.bits > 0:
        acc_bits = int(costs.acc_bits_worst_case(
            w.bits if per_kernel is None else per_kernel, a.bits, info.fan_in,
            w_signed=w.signed, a_signed=a.signed, w_narrow=w.narrow_range,
            a_narrow=a.narrow_range).max())
    return {
        "name": info.name, "op": info.kind, "w_bits": w_bits, "w_bits_per_kernel": per_kernel,
        "a_bits": a_bits, "macs": int(info.macs), "params": int(info.params),
        "bitops": _num(bitops), "size_bits": int(size_bits), "acc_bits": acc_bits,
        "acc_bits_data": None, "pruned_channels": len(qmeta.pruned_channels),
    }


def _num(x: Any) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() else x


def report(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """The report dict: model, pipeline, per-layer rows, totals, pass timings."""
    layers = quantizable_layers(gm)
    first, _ = first_last_layers(gm, layers)
    nodes = {n.name: n for n in gm.graph.nodes}
    rows = [layer_row(info, get_qmeta(nodes[info.node]), info.name in first) for info in layers]
    history = graph_history(gm)
    totals = {k: _num(sum(r[k] for r in rows)) if rows else 0
              for k in ("macs", "params", "bitops", "size_bits")}
    return {
        "model": gm.meta.get(MODEL_KEY, type(gm).__name__),
        "pipeline": history["pipeline"][-1] if history["pipeline"] else "",
        "layers": rows,
        "totals": totals,
        "passes": [dict(p) for p in history["passes"]],
    }


def format_table(rep: dict[str, Any]) -> str:
    """The report as a tabulate table with a totals line and the pipeline header."""
    headers = ["layer", "op", "w", "a", "MACs", "params", "BitOPs", "size (B)", "acc", "pruned"]
    body = []
    for r in rep["layers"]:
        w = r["w_bits"]
        if r["w_bits_per_kernel"] is not None:
            ks = r["w_bits_per_kernel"]
            w = f"{min(ks)}-{max(ks)} (avg {sum(ks) / len(ks):.2f})"
        body.append([r["name"], r["op"], "-" if w is None else w,
                     "-" if r["a_bits"] is None else r["a_bits"], r["macs"], r["params"],
                     r["bitops"], r["size_bits"] // 8, r["acc_bits"] or "-", r["pruned_channels"]])
    t = rep["totals"]
    body.append(["TOTAL", "", "", "", t["macs"], t["params"], t["bitops"], t["size_bits"] // 8,
                 "", sum(r["pruned_channels"] for r in rep["layers"])])
    head = [f"model: {rep['model']}"]
    if rep["pipeline"]:
        head.append(f"pipeline: {rep['pipeline']}")
    head.append(f"GMACs {t['macs'] / 1e9:.4f}  GBitOPs {t['bitops'] / 1e9:.3f}  "
                f"size {t['size_bits'] / 8 / 1e6:.3f} MB")
    return "\n".join(head) + "\n" + tabulate(body, headers=headers, intfmt=",",
                                             floatfmt=".4g")
