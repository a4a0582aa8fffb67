"""Static checker of the ``int-sim`` property (run by verify-each after ``lower-to-int-sim``).

The property: between the input quantize and the output dequantize every tensor is integer-valued
and inside its declared range, or explicitly a float island. Statically that means: no fake
quantizer is left; every value an integer-simulation module reads is an integer tensor (except
:class:`Quantize`, which reads float); integer tensors flow only into integer modules, shape-only
ops and shape queries; float islands (``QMeta.float_island``) read dequantized values; graph
outputs are float; each integer layer runs the reference kernel or the fast kernel its bound
proved. The dynamic half (values inside the declared ranges, on real inputs) is
``verify-int-sim``.
"""
from __future__ import annotations

import operator

import torch.fx

from passes_registry import has_record

from qpasses.modules.fake_quant import FakeQuantize
from qpasses.ir.annotations import get_qmeta
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.int_sim import Dequantize, IntSimModule, Quantize
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.ir import ops

__all__ = ["check_int_sim", "classify_nodes"]


def classify_nodes(gm: torch.fx.GraphModule) -> tuple[dict[str, str], list[str]]:
    """``(kind per node, problems)``; kinds: ``int``, ``float``, ``island``, ``value``."""
    mods = dict(gm.named_modules())
    kind: dict[str, str] = {}
    problems: list[str] = []
    for n in gm.graph.nodes:
        ins = [kind.get(a.name, "value") for a in n.all_input_nodes]
        if n.op == "placeholder":
            kind[n.name] = "float"
        elif n.op == "get_attr":
            kind[n.name] = "value"
        elif n.op == "output":
            if "int" in ins:
                problems.append("a graph output is an integer tensor (missing output dequantize)")
        elif n.op == "call_module" and isinstance(mods.get(str(n.target)), IntSimModule):
            m = mods[str(n.target)]
            if isinstance(m, Quantize):
                if any(k == "int" for k in ins):
                    problems.append(f"quantize node '{n.name}' reads an integer tensor")
            elif any(k in ("float", "island") for k in ins):
                problems.append(f"integer node '{n.name}' ({type(m).__name__}) reads a float "
                                "tensor")
            kind[n.name] = "float" if isinstance(m, Dequantize) else "int"
            if m.qmin > m.qmax:
                problems.append(f"node '{n.name}' declares an empty range [{m.qmin}, {m.qmax}]")
            if isinstance(m, IntLayer) and m.kernel not in ("reference", m.fast_kernel):
                problems.append(f"layer '{n.target}' runs kernel {m.kernel!r} but its bound "
                                f"proves only {m.fast_kernel!r} exact")
        elif get_qmeta(n).float_island is not None:
            if "int" in ins:
                problems.append(f"float island '{n.name}' reads an integer tensor without a "
                                "dequantize")
            kind[n.name] = "island"
        elif (n.op == "call_function" and (n.target in ops.PASSTHROUGH_FUNCTIONS
                                           or n.target in ops.SPLIT_FUNCTIONS
                                           or n.target in ops.BROADCAST_FUNCTIONS)) or \
                (n.op == "call_method" and (n.target in ops.PASSTHROUGH_METHODS
                                            or n.target in ops.SPLIT_METHODS
                                            or n.target in ops.BROADCAST_METHODS)):
            first = n.args[0] if n.args else None
            kind[n.name] = kind.get(first.name, "value") if isinstance(first, torch.fx.Node) \
                else "value"
        elif (n.op == "call_method" and n.target in ops.SHAPE_QUERY_METHODS) or \
                (n.op == "call_function" and n.target in (getattr, operator.getitem)):
            kind[n.name] = "value"
        else:
            if "int" in ins:
                problems.append(f"node '{n.name}' ({n.op} {n.target}) computes on an integer "
                                "tensor but is neither lowered nor a float island")
            kind[n.name] = "island" if "island" in ins else "float"
    return kind, problems


def check_int_sim(gm: torch.fx.GraphModule) -> list[str]:
    if not has_record(gm, INT_SIM_KEY):
        return ["the graph has not been lowered by lower-to-int-sim"]
    problems = []
    # a layer left in float (float island) keeps its weight quantizer: it computes exactly as the
    # fake-quant graph did
    islands = [str(n.target) for n in gm.graph.nodes
               if n.op == "call_module" and get_qmeta(n).float_island is not None]
    left = [n for n, m in gm.named_modules() if isinstance(m, FakeQuantize)
            and not any(n.startswith(f"{t}.") for t in islands)]
    if left:
        problems.append(f"fake quantizers left in the graph: {', '.join(left[:4])}")
    _, more = classify_nodes(gm)
    return problems + more
