"""Requantization fusion: a :class:`Requantize` that is the only consumer of an integer layer
moves into the layer (one fused epilogue instead of an int32 accumulator tensor)."""
from __future__ import annotations

import torch.fx

from qpasses.modules.int_sim import Requantize
from qpasses.modules.int_sim_layers import IntLayer
from qpasses.modules.int_sim_transformer import IntMatMul
from qpasses.algorithms.lowering.biases import choose_bias_frac_bits, scaled_bias

__all__ = ["fuse_requant"]

Node = torch.fx.Node


def fuse_requant(gm: torch.fx.GraphModule, bias_frac_bits: int | None = None) -> dict[str, str]:
    """Fold a Requantize that is the only consumer of an IntLayer into the layer (with the bias's
    fractional bits, see :func:`~qpasses.algorithms.lowering.biases.choose_bias_frac_bits`), or
    of an accumulator-output IntMatMul into the matmul (as is); returns ``{removed requantize
    node: layer node}``."""
    fused: dict[str, str] = {}
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(mods.get(str(node.target)), Requantize):
            continue
        src = node.args[0]
        if not (isinstance(src, Node) and src.op == "call_module"):
            continue
        layer = mods.get(str(src.target))
        if isinstance(layer, IntMatMul) and len(src.users) == 1 and \
                layer.fuse(mods[str(node.target)]):       # matmul of activations (Q·Kᵀ)
            _drop_requant_node(gm, node, src, fused)
            continue
        if not isinstance(layer, IntLayer) or layer.requant is not None or len(src.users) != 1:
            continue
        rq = mods[str(node.target)]
        k = choose_bias_frac_bits(layer, rq.real, rq.rounding, bias_frac_bits)
        if k:
            layer.set_acc_shift(k, scaled_bias(layer, k))
            rq = Requantize(rq.real / 2.0 ** k, in_zero_point=0,
                            out_zero_point=rq.out_zero_point, qmin=rq.qmin, qmax=rq.qmax,
                            rounding=rq.rounding, multiplier_bits=rq.multiplier_bits,
                            axis=rq.axis)
            rq.set_backend(layer.backend)
        rq.prove(layer.acc_max)
        layer.set_requant(rq)
        node.replace_all_uses_with(src)
        meta = src.meta
        for k in ("tensor_meta",):
            if k in node.meta:
                meta[k] = node.meta[k]
        fused[node.name] = src.name
        gm.graph.erase_node(node)
    return fused



def _drop_requant_node(gm: torch.fx.GraphModule, node: Node, src: Node,
                       fused: dict[str, str]) -> None:
    """Remove a Requantize node now fused into its producer ``src``."""
    node.replace_all_uses_with(src)
    if "tensor_meta" in node.meta:
        src.meta["tensor_meta"] = node.meta["tensor_meta"]
    fused[node.name] = src.name
    gm.graph.erase_node(node)
