"""shift-unfused-biases: fractional bias bits for integer layers with an unfused requantization."""
from __future__ import annotations

from typing import Any

import torch.fx

from passes_registry import PassResult, register_pass

from qpasses.algorithms.lowering.steps import IntSimRewrite
from qpasses.algorithms.lowering.biases import shift_unfused_biases
from qpasses.algorithms.lowering.record import int_sim_record

__all__ = ["ShiftUnfusedBiases"]


@register_pass
class ShiftUnfusedBiases(IntSimRewrite):
    """Give an integer layer whose accumulator reaches its requantization through clamps, pools
    and shape ops the fractional bias bits a fused layer gets (the graph's ``bias-frac-bits``):
    the accumulator, the clamp bounds and the declared ranges along the way scale by ``2^k`` and
    the requantization divides by it. Without this a coarse accumulator grid rounds the bias by up
    to half an output LSB. A step of ``lower-to-int-sim``. Stats: ``num_shifted_biases``.
    """
    name = "shift-unfused-biases"
    summary = "keep fractional bias bits in layers whose requantize sits after clamps/pools"

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        n = shift_unfused_biases(gm, int_sim_record(gm).bias_frac_bits)
        return PassResult(modified=n > 0, stats={"num_shifted_biases": n})
