"""The per-layer report (schema in docs/annotations.md), read by tools and tests.

Every number comes from the cost analyses (``macs``, ``bitops``, ``model-size``, ``acc-width``),
so the report and ``print<...>`` agree by construction: inside a pipeline pass the run's
AnalysisManager (cached results are reused), outside one a throwaway manager is used. Costs follow
FracBits (docs/algorithms.md, "Cost accounting"; see :mod:`qpasses.algorithms.cost_model`): BitOPs = Σ_k MACs_k · w_k · a, summed
per kernel when bits are per kernel (0-bit kernels cost nothing); a quantized first layer's input
counts as 8 bits; layers without a bit annotation count as fp32 (32 × 32) so a float model has a
comparable total. Size is weights at their bit-width plus 32-bit biases. Activation x activation
products (matmul/bmm of two tensors, e.g. attention) follow the layers as rows of op ``matmul``:
MACs per sample, BitOPs = MACs · b_a1 · b_a2, no parameters and size 0. A graph with no bit
annotation at all is reported entirely as fp32 (the analyses themselves refuse such a graph).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx
from tabulate import tabulate

from passes_registry import AnalysisManager, get_record, graph_history

from qpasses.errors import InputError
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.records import INT_SIM_KEY, MODEL_KEY

FP_BITS = 32
FIRST_LAYER_INPUT_BITS = 8


def _num(x: Any) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() else x


def report(gm: torch.fx.GraphModule, am: AnalysisManager | None = None) -> dict[str, Any]:
    """The report dict: model, pipeline, per-layer rows, totals, pass timings.

    ``am``: the AnalysisManager to read (and cache) the analyses through; a fresh one by default.
    """
    from qpasses.algorithms.cost_model import has_bit_annotations
    from qpasses.analyses.bitops import compute_bitops
    from qpasses.analyses.model_size import compute_model_size

    if not isinstance(gm, torch.fx.GraphModule):
        raise InputError(f"report expects the GraphModule a pipeline ran on, got "
                         f"{type(gm).__name__}" + (" (trace the model first: gm = "
                         "qpasses.trace(model, example_inputs))"
                         if isinstance(gm, torch.nn.Module) else ""))
    am = am if am is not None else AnalysisManager()
    macs = am.get("macs", gm)
    if has_bit_annotations(gm):
        bitops, size, acc = am.get("bitops", gm), am.get("model-size", gm), am.get("acc-width", gm)
    else:
        bitops, size, acc = compute_bitops(gm, am), compute_model_size(gm, am), None
    nodes = {n.name: n for n in gm.graph.nodes}
    layers = am.get("cost-layers", gm).rows
    rows = []
    for layer, m, b, s in zip(layers, macs.rows, bitops.rows, size.rows):
        a = acc[m.name] if acc is not None else None
        node = nodes[layer.node]
        rows.append({
            "name": m.name, "op": m.op, "w_bits": b.w_bits,
            "w_bits_per_kernel": list(b.w_bits_per_kernel) if b.w_bits_per_kernel else None,
            "a_bits": b.a_bits, "macs": int(m.macs), "params": int(m.params),
            "bitops": _num(b.bitops), "size_bits": int(s.size_bits),
            "acc_bits": a.acc_bits if a is not None else None,
            "acc_bits_data": a.acc_bits_data if a is not None else None,
            "pruned_channels": len(get_qmeta(node).pruned_channels), "node": layer.node,
        })
    acc_products = {r.name: r for r in acc.products} if acc is not None else {}
    for p in bitops.products:  # act x act products (matmul of two activations): no weights
        pa = acc_products.get(p.name)
        rows.append({"name": p.name, "op": p.op, "w_bits": None, "w_bits_per_kernel": None,
                     "a_bits": p.a_bits, "macs": int(p.macs), "params": 0,
                     "bitops": _num(p.bitops), "size_bits": 0,
                     "acc_bits": pa.acc_bits if pa is not None else None,
                     "acc_bits_data": None, "pruned_channels": 0, "node": p.name})
    lowered = get_record(gm, INT_SIM_KEY) is not None
    for r in rows:
        r["integer"] = _runs_integer(gm, nodes.get(r["node"])) if lowered else None
        del r["node"]
    history = graph_history(gm)
    totals = {k: _num(sum(r[k] for r in rows)) if rows else 0
              for k in ("macs", "params", "bitops", "size_bits")}
    if lowered:
        totals["int_macs"] = sum(r["macs"] for r in rows if r["integer"])
    return {
        "model": get_record(gm, MODEL_KEY, type(gm).__name__),
        "pipeline": history["pipeline"][-1] if history["pipeline"] else "",
        "layers": rows,
        "totals": totals,
        "passes": [dict(p) for p in history["passes"]],
        "float_islands": float_islands(gm),
    }


def _runs_integer(gm: torch.fx.GraphModule, node: torch.fx.Node | None) -> bool:
    """Whether a layer/product row's node runs as an integer-simulation module (lowered graphs)."""
    from qpasses.modules.int_sim import IntSimModule

    if node is None or node.op != "call_module" or get_qmeta(node).float_island is not None:
        return False
    return isinstance(gm.get_submodule(str(node.target)), IntSimModule)


def float_islands(gm: torch.fx.GraphModule) -> list[dict[str, str]]:
    """Nodes left in float (``QMeta.float_island``): ``[{"node", "op", "reason"}]`` in graph
    order (layers skipped by annotate-bitwidths, ops lower-to-int-sim could not lower)."""
    out = []
    for n in gm.graph.nodes:
        reason = get_qmeta(n).float_island
        if reason is None:
            continue
        if n.op == "call_module":
            op = type(gm.get_submodule(str(n.target))).__name__
        elif n.op == "call_method":
            op = f"Tensor.{n.target}"
        else:
            op = getattr(n.target, "__name__", str(n.target))
        out.append({"node": n.name, "op": op, "reason": reason})
    return out


def kernel_histograms(rep: dict[str, Any]) -> str:
    """Per-kernel weight bit histograms of the layers with per-kernel bits ('' when none):
    one row per layer, one column per bit-width, kernel counts in the cells."""
    per_kernel = [r for r in rep["layers"] if r.get("w_bits_per_kernel")]
    if not per_kernel:
        return ""
    widths = sorted({b for r in per_kernel for b in r["w_bits_per_kernel"]})
    body = []
    for r in per_kernel:
        counts = Counter(r["w_bits_per_kernel"])
        ks = r["w_bits_per_kernel"]
        body.append([r["name"], len(ks)] + [counts.get(b, "") for b in widths]
                    + [f"{sum(ks) / len(ks):.2f}"])
    total = Counter(b for r in per_kernel for b in r["w_bits_per_kernel"])
    n = sum(total.values())
    body.append(["TOTAL", n] + [total.get(b, "") for b in widths]
                + [f"{sum(b * c for b, c in total.items()) / n:.2f}"])
    return ("per-kernel weight bit-widths (kernels per bit-width; 0 = pruned)\n"
            + tabulate(body, headers=["layer", "kernels"] + [f"{b}b" for b in widths] + ["mean"],
                       intfmt=","))


def format_table(rep: dict[str, Any]) -> str:
    """The report as a tabulate table with a totals line and the pipeline header, followed by
    per-kernel bit histograms when some layer has per-kernel bits."""
    headers = ["layer", "op", "w", "a", "MACs", "params", "BitOPs", "size (B)", "acc",
               "acc (data)", "pruned"]
    body = []
    for r in rep["layers"]:
        w = r["w_bits"]
        if r["w_bits_per_kernel"] is not None:
            ks = r["w_bits_per_kernel"]
            w = f"{min(ks)}-{max(ks)} (avg {sum(ks) / len(ks):.2f})"
        body.append([r["name"], r["op"], "-" if w is None else w,
                     "-" if r["a_bits"] is None else r["a_bits"], r["macs"], r["params"],
                     r["bitops"], r["size_bits"] // 8, r["acc_bits"] or "-",
                     r.get("acc_bits_data") or "-", r["pruned_channels"]])
    t = rep["totals"]
    body.append(["TOTAL", "", "", "", t["macs"], t["params"], t["bitops"], t["size_bits"] // 8,
                 "", "", sum(r["pruned_channels"] for r in rep["layers"])])
    head = [f"model: {rep['model']}"]
    if rep["pipeline"]:
        head.append(f"pipeline: {rep['pipeline']}")
    head.append(f"GMACs {t['macs'] / 1e9:.4f}  GBitOPs {t['bitops'] / 1e9:.3f}  "
                f"size {t['size_bits'] / 8 / 1e6:.3f} MB")
    out = "\n".join(head) + "\n" + tabulate(body, headers=headers, intfmt=",", floatfmt=".4g")
    hist = kernel_histograms(rep)
    islands = rep.get("float_islands") or []
    if islands:
        out += (f"\nfloat islands ({len(islands)}): "
                + "; ".join(f"{i['node']} ({i['op']}): {i['reason']}" for i in islands[:8])
                + (" ..." if len(islands) > 8 else ""))
    return out + ("\n\n" + hist if hist else "")
