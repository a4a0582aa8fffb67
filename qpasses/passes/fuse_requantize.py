"""fuse-requantize: fold each requantization into the integer layer it is the only consumer of."""
from __future__ import annotations

from typing import Any

import torch.fx

from passes_registry import PassResult, register_pass

from qpasses.algorithms.lowering.steps import IntSimRewrite
from qpasses.algorithms.lowering.fusion import fuse_requant
from qpasses.algorithms.lowering.record import add_to_stats, int_sim_record, rename_fq_nodes

__all__ = ["FuseRequantize"]


@register_pass
class FuseRequantize(IntSimRewrite):
    """Fold a ``Requantize`` node that is the only consumer of an ``IntConv*``/``IntLinear`` into
    the layer, so the layer outputs codes in one fused epilogue instead of an int32 accumulator
    tensor. Where the requantization multiplier is large (coarse inputs and weights, a fine output
    grid), the layer keeps fractional bias bits as the graph's ``bias-frac-bits`` says
    (docs/int-sim.md, "Integer arithmetic"). A step of ``lower-to-int-sim``; updates the int-sim
    record (``num_requantize``, ``num_fused_requant``, the quantization points). Stats:
    ``num_fused_requant``.
    """
    name = "fuse-requantize"
    summary = "fold a requantize into the integer conv/linear it is the only consumer of"

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        fused = fuse_requant(gm, int_sim_record(gm).bias_frac_bits)
        if fused:
            rename_fq_nodes(gm, fused)
            add_to_stats(gm, num_requantize=-len(fused), num_fused_requant=len(fused))
        return PassResult(modified=bool(fused), stats={"num_fused_requant": len(fused)})
