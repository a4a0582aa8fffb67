"""Value ranges the lowering observes on calibration data: the inputs of nonlinearities and tensor
products that no fake quantizer covers get an intermediate grid ranged from them."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor

from qpasses.modules.fake_quant import ActFakeQuant
from qpasses.modules.fake_quant_layers import is_fake_quant_layer
from qpasses.ir.fx import is_tensor_node
from qpasses.ir import ops

__all__ = ["observe_ranges", "range_candidates"]

Node = torch.fx.Node


def observe_ranges(gm: torch.fx.GraphModule, batches: Sequence[tuple[Tensor, ...]],
                   names: set[str]) -> dict[str, tuple[float, float]]:
    """Min/max of the named nodes' values over ``batches`` (fake-quant graph, no_grad)."""
    if not names or not batches:
        return {}
    out: dict[str, tuple[float, float]] = {}

    class _Rec(torch.fx.Interpreter):
        def run_node(self, node: Node) -> Any:
            v = super().run_node(node)
            if node.name in names and isinstance(v, Tensor) and v.is_floating_point() \
                    and v.numel():
                mn, mx = float(v.min()), float(v.max())
                if node.name in out:
                    a, b = out[node.name]
                    mn, mx = min(a, mn), max(b, mx)
                out[node.name] = (mn, mx)
            return v

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            for b in batches:
                _Rec(gm).run(*b)
    finally:
        gm.train(was)
    return out


def range_candidates(gm: torch.fx.GraphModule) -> set[str]:
    """Values that may need an intermediate grid: inputs of elementwise nonlinearities, tensor
    products, matmuls, softmax and LayerNorm that no fake quantizer covers."""
    mods = dict(gm.named_modules())
    names = set()
    for n in gm.graph.nodes:
        m = mods.get(str(n.target)) if n.op == "call_module" else None
        hit = (m is not None and type(m) in ops.UNARY_MODULES) or \
            (n.op == "call_function"
             and (n.target in ops.UNARY_FUNCTIONS or n.target in ops.MUL_FUNCTIONS)) or \
            (n.op == "call_method" and (n.target in ops.UNARY_METHODS or n.target in ops.MUL_METHODS))
        # softmax, LayerNorm and matmul read accumulators through an intermediate grid too
        hit = hit or isinstance(m, ops.SOFTMAX_MODULES + ops.LAYER_NORM_MODULES) or \
            (n.op == "call_function" and (n.target in ops.SOFTMAX_FUNCTIONS
                                          or n.target in ops.LAYER_NORM_FUNCTIONS
                                          or n.target in ops.MATMUL_FUNCTIONS)) or \
            (n.op == "call_method" and (n.target in ops.SOFTMAX_METHODS
                                        or n.target in ops.MATMUL_METHODS))
        if not hit:
            continue
        for src in n.all_input_nodes:
            sm = mods.get(str(src.target)) if src.op == "call_module" else None
            if not isinstance(sm, ActFakeQuant) and is_tensor_node(src):
                names.add(src.name)
    # BatchNorms not folded into a conv: their own range grids their output when it reaches no
    # quantizer (lowering/affine.py)
    names |= {n.name for n in gm.graph.nodes
              if (n.op == "call_module" and isinstance(mods.get(str(n.target)), ops.BATCH_NORM_BASE))
              or (n.op == "call_function" and n.target is torch.nn.functional.batch_norm)}
    # layer outputs reshaped before any quantizer (heads split from a qkv projection): their
    # channels may be split, onto an intermediate grid ranged from these (lowering/shapes.py)
    names |= {n.args[0].name for n in gm.graph.nodes
              if ((n.op == "call_function" and n.target in ops.RESHAPE_FUNCTIONS)
                  or (n.op == "call_method" and n.target in ops.RESHAPE_METHODS))
              and n.args and isinstance(n.args[0], Node) and n.args[0].op == "call_module"
              and is_fake_quant_layer(mods.get(str(n.args[0].target)))}
    return names

