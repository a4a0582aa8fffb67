"""exact-zero-kernel-constants: integer biases of all-zero kernels giving the fake-quant output."""
from __future__ import annotations

from typing import Any

import torch.fx

from passes_registry import PassResult, register_pass

from qpasses.algorithms.lowering.steps import IntSimRewrite
from qpasses.algorithms.lowering.biases import exact_zero_kernel_constants
from qpasses.algorithms.lowering.record import add_to_stats

__all__ = ["ExactZeroKernelConstants"]


@register_pass
class ExactZeroKernelConstants(IntSimRewrite):
    """Give every all-zero (0-bit) kernel of an integer layer the integer bias whose output, after
    the ops up to its requantization, equals the fake-quant graph's constant (the float bias,
    clamped, through the output quantizer). Rounding the bias onto the accumulator grid and
    requantizing it can land one LSB off; with this, graphs pruned by ``prune-zero-bit-channels``
    and unpruned ones lower to the same integers. Only biases within the layer's current
    ``max |b_q|`` are used, so every declared range stays valid. A step of ``lower-to-int-sim``;
    updates the int-sim record. Stats: ``num_exact_zero_kernel_constants``.
    """
    name = "exact-zero-kernel-constants"
    summary = "set the integer bias of 0-bit kernels to reproduce the fake-quant constant"

    def run(self, gm: torch.fx.GraphModule, ctx: Any, am: Any) -> PassResult:
        n = exact_zero_kernel_constants(gm)
        if n:
            add_to_stats(gm, num_exact_zero_kernel_constants=n)
        return PassResult(modified=n > 0, stats={"num_exact_zero_kernel_constants": n})
