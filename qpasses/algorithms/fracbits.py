"""FracBits' cost side: the model cost as a differentiable function of the learned fractional
bit-widths λ, and the budget penalty of FracBits Eq. 6-7 (FracBits: Mixed Precision Quantization
via Fractional Bit-Widths; docs/algorithms.md, "FracBits"). The quantizer modules are
:mod:`qpasses.modules.fracbits`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch import Tensor

from qpasses.algorithms.cost_model import (FRACBITS, CostConventions, LayerCost, annotated_bits,
                                           cost_layers, model_bitops, model_size_bits)
from qpasses.algorithms.product_costs import products_bitops
from qpasses.algorithms.sensitivity import register_lambda_source
from qpasses.errors import NumericsError
from qpasses.modules.fracbits import fracbits_modules, fracbits_record, has_fracbits

__all__ = ["fracbits_cost_layers", "fracbits_lambdas", "lambda_maps", "model_cost", "penalty"]


def lambda_maps(gm: torch.fx.GraphModule, *, detach: bool = False
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(w_bits, a_bits)`` for the cost model: clamped λ tensors of the FracBits layers (with
    gradient unless ``detach``) and the annotated bits of every other annotated layer."""
    w_map, a_map = annotated_bits(gm)
    for name, (wq, aq) in fracbits_modules(gm).items():
        w = wq.bits()
        w_map[name] = w.detach() if detach else w
        if aq is not None:
            a = aq.bits()
            a_map[name] = a.detach() if detach else a
    return w_map, a_map


def fracbits_lambdas(gm: torch.fx.GraphModule, ctx: Any = None) -> dict[str, Any] | None:
    """``{layer: λ_w}`` (float or per-kernel list), the ``lambda`` sensitivity's source."""
    if not has_fracbits(gm):
        return None
    return {name: (wq.bits().detach().tolist()) for name, (wq, _) in fracbits_modules(gm).items()
            if not wq.pinned}


def fracbits_cost_layers(gm: torch.fx.GraphModule, conventions: CostConventions
                         ) -> tuple[LayerCost, ...]:
    """The cost model's layer table of ``gm``, memoized on the FracBits record while searching
    (the penalty is evaluated every training step)."""
    info = fracbits_record(gm)
    if info is None:
        return cost_layers(gm, conventions)
    cache = info.cost_cache
    key = (id(gm.graph), len(gm.graph.nodes), conventions)
    if key not in cache:
        cache.clear()
        cache[key] = cost_layers(gm, conventions)
    return cache[key]


def model_cost(gm: torch.fx.GraphModule, metric: str = "bitops", *,
               conventions: CostConventions = FRACBITS, detach: bool = False) -> Tensor:
    """Current cost from λ: GBitOPs (``metric="bitops"``) or MB (``"size"``), float64 scalar."""
    w_map, a_map = lambda_maps(gm, detach=detach)
    layers = fracbits_cost_layers(gm, conventions)
    if metric == "bitops":  # + the act x act products (not searched: a constant)
        return (model_bitops(layers, w_map, a_map, conventions).to(torch.float64)
                + products_bitops(gm, conventions)) / 1e9
    if metric == "size":
        return model_size_bits(layers, w_map, conventions).to(torch.float64) / 8e6
    raise NumericsError(f"unknown cost metric {metric!r}; valid: 'bitops', 'size'")


def penalty(gm: torch.fx.GraphModule, target_bitops: float | None = None,
            target_size: float | None = None, kappa: float = 1.0, *,
            conventions: CostConventions = FRACBITS) -> Tensor:
    """FracBits Eq. 6-7: ``kappa * |cost(λ) - target|`` (differentiable in every λ).

    Give exactly one of ``target_bitops`` (GBitOPs, 1e9 BitOPs; use with quantized weights and
    activations) or ``target_size`` (MB, 1e6 bytes: weights at λ bits plus fp32 biases; for
    weight-only runs). ``kappa``: paper 0.1 (BitOPs) / 1 (size); official code 1.0. On a small
    model the cost is tiny in these units, so scale kappa accordingly (e.g. ``c / target``).
    """
    if (target_bitops is None) == (target_size is None):
        raise NumericsError("penalty: give exactly one of target_bitops (GBitOPs) or "
                            "target_size (MB)")
    target = target_bitops if target_bitops is not None else target_size
    if not isinstance(target, (int, float)) or isinstance(target, bool) or \
            not math.isfinite(target) or target <= 0:
        raise NumericsError(f"penalty: the target must be a positive finite number, got "
                            f"{target!r}")
    if not math.isfinite(kappa) or kappa < 0:
        raise NumericsError(f"penalty: kappa must be >= 0, got {kappa}")
    cost = model_cost(gm, "bitops" if target_bitops is not None else "size",
                      conventions=conventions)
    return kappa * (cost - float(target)).abs()


register_lambda_source(fracbits_lambdas)
