"""FracBits (Yang & Jin, AAAI 2021) training-time modules, penalty and freezing helpers.

Spec: reference/algorithms.md §1. The graph surgery lives in the passes
(:mod:`qpasses.passes.insert_fracbits`): this module holds what a user's training loop
touches.

- :class:`FracBitsWeightQuant`: DoReFa weights with a learnable fractional bit-width λ_w (scalar
  per layer or one per output kernel), Eq. 1 interpolation / Eq. 2 gradient through
  :func:`qpasses.numerics.quantizers.fracbits_interp`. λ = 0 gives the 0-bit candidate (Eq. 8):
  the kernel is exactly zero.
- :class:`FracBitsActQuant`: PACT on a layer's input with a learnable clip α (FracBits' α
  gradient) and a learnable λ_a (one per layer).
- :func:`penalty`: the L1 resource loss of Eq. 6-7, ``kappa * |cost(λ) - target|`` with cost in
  GBitOPs (``target_bitops``) or MB (``target_size``), computed by :mod:`qpasses.algorithms.cost_model`
  (the functions behind the ``bitops`` / ``model-size`` analyses) from the current λ.
- :func:`clamp_lambdas`: clamp every λ parameter into its candidate range (call after
  ``optimizer.step()``; the forward clamps too, with zero gradient outside the range).
- :func:`lambda_maps` / :func:`fracbits_lambdas`: the current λ by layer name.

Deliberate deviation from the official code (§1.3): ``hi = min(floor(λ) + 1, max(B))`` instead of
``ceil(λ)``, so the task loss still has a λ-gradient at integer λ.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from qpasses.algorithms.cost_model import (FRACBITS, CostConventions, LayerCost, annotated_bits, cost_layers,
                           model_bitops, model_size_bits)
from qpasses.errors import AnnotationError, NumericsError
from qpasses.numerics.quantizers import dorefa_weight, pact

__all__ = ["FracBitsWeightQuant", "FracBitsActQuant", "FRACBITS_META", "FROZEN_META",
           "ACT_CONTAINER", "penalty", "clamp_lambdas", "lambda_maps", "fracbits_lambdas", "fracbits_modules",
           "has_fracbits", "model_cost", "lambda_parameters"]

FRACBITS_META = "qpasses.fracbits"     # gm.meta key: {"layers": {...}, options}
ACT_CONTAINER = "fracbits_act"         # ModuleDict holding the activation quantizers
FROZEN_META = "qpasses.fracbits.frozen"  # gm.meta key written by freeze-fracbits: learned λ, α


class FracBitsWeightQuant(nn.Module):
    """DoReFa weight quantizer with learnable fractional bits λ_w in ``[min_bits, max_bits]``.

    ``per_kernel``: λ_w has one entry per output kernel (dim 0), else it is a scalar. ``pinned``
    layers keep a fixed integer width (λ not trainable, ``min_bits = max_bits``)."""

    is_weight_quantizer = True

    def __init__(self, num_channels: int, init_bits: float, min_bits: int, max_bits: int, *,
                 per_kernel: bool = False, pinned: bool = False, name: str = "") -> None:
        super().__init__()
        if not 0 <= min_bits <= max_bits:
            raise NumericsError(f"FracBits weight quantizer '{name}': need 0 <= min_bits <= "
                                f"max_bits, got {min_bits}, {max_bits}")
        self.qname = name
        self.num_channels = num_channels
        self.min_bits, self.max_bits = int(min_bits), int(max_bits)
        self.per_kernel = per_kernel
        self.pinned = pinned
        init = min(max(float(init_bits), self.min_bits), self.max_bits)
        shape = (num_channels,) if per_kernel else ()
        self.lam = nn.Parameter(torch.full(shape, init), requires_grad=not pinned)

    def bits(self) -> Tensor:
        """λ_w clamped to the candidate range (zero gradient outside)."""
        return torch.clamp(self.lam, self.min_bits, self.max_bits)

    def forward(self, w: Tensor) -> Tensor:
        return dorefa_weight(w, self.bits().to(w.dtype), max_bits=self.max_bits, axis=0)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.lam.clamp_(self.min_bits, self.max_bits)

    def prune_channels(self, keep: Tensor) -> None:
        if self.per_kernel:
            self.lam = nn.Parameter(self.lam.detach()[keep].clone(),
                                    requires_grad=self.lam.requires_grad)
        self.num_channels = int(keep.numel())

    def extra_repr(self) -> str:
        lam = self.lam.detach()
        shown = f"{float(lam):.3f}" if lam.dim() == 0 else \
            f"mean {float(lam.mean()):.3f} ({lam.numel()} kernels)"
        return (f"lambda={shown}, range=[{self.min_bits}, {self.max_bits}]"
                + (", pinned" if self.pinned else ""))


class FracBitsActQuant(nn.Module):
    """PACT activation quantizer (FracBits' α gradient) with a learnable λ_a (one per layer).
    ``signed`` inputs use the double-sided variant."""

    def __init__(self, init_bits: float, min_bits: int, max_bits: int, *, signed: bool = False,
                 alpha_init: float = 8.0, name: str = "", consumer: str = "") -> None:
        super().__init__()
        if not 1 <= min_bits <= max_bits:
            raise NumericsError(f"FracBits activation quantizer '{name}': need 1 <= min_bits <= "
                                f"max_bits (0 bits is for weights only), got {min_bits}, "
                                f"{max_bits}")
        self.qname = name
        self.consumer = consumer
        self.min_bits, self.max_bits = int(min_bits), int(max_bits)
        self.signed = signed
        init = min(max(float(init_bits), self.min_bits), self.max_bits)
        self.lam = nn.Parameter(torch.tensor(init))
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

    def bits(self) -> Tensor:
        return torch.clamp(self.lam, self.min_bits, self.max_bits)

    def forward(self, x: Tensor) -> Tensor:
        return pact(x, self.alpha, self.bits().to(x.dtype), double_sided=self.signed,
                    alpha_grad="fracbits", max_bits=self.max_bits)

    @torch.no_grad()
    def clamp_(self) -> None:
        self.lam.clamp_(self.min_bits, self.max_bits)

    def extra_repr(self) -> str:
        return (f"lambda={float(self.lam.detach()):.3f}, alpha={float(self.alpha.detach()):.3f}, "
                f"range=[{self.min_bits}, {self.max_bits}]" + (", signed" if self.signed else ""))


# ---------------------------------------------------------------------------------------------
# Access by layer


def has_fracbits(gm: torch.fx.GraphModule) -> bool:
    return bool(getattr(gm, "meta", {}).get(FRACBITS_META, {}).get("layers"))


def fracbits_modules(gm: torch.fx.GraphModule
                     ) -> dict[str, tuple[FracBitsWeightQuant, FracBitsActQuant | None]]:
    """``{layer name: (weight quantizer, activation quantizer or None)}`` in graph order."""
    info = getattr(gm, "meta", {}).get(FRACBITS_META)
    if not info or not info.get("layers"):
        raise AnnotationError("the graph has no FracBits quantizers: run insert-fracbits first "
                              "(after annotate-bitwidths)")
    out = {}
    for name, rec in info["layers"].items():
        layer = gm.get_submodule(rec["module"])
        wq = layer.weight_fake_quant
        aq = gm.get_submodule(rec["act"]) if rec.get("act") else None
        out[name] = (wq, aq)
    return out


def lambda_parameters(gm: torch.fx.GraphModule) -> list[nn.Parameter]:
    """The trainable λ parameters (put them in a param group without weight decay)."""
    ps = []
    for wq, aq in fracbits_modules(gm).values():
        if wq.lam.requires_grad:
            ps.append(wq.lam)
        if aq is not None:
            ps.append(aq.lam)
    return ps


@torch.no_grad()
def clamp_lambdas(gm: torch.fx.GraphModule) -> None:
    """Clamp every λ into its candidate range (call after each optimizer step, §1.3)."""
    for wq, aq in fracbits_modules(gm).values():
        wq.clamp_()
        if aq is not None:
            aq.clamp_()


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


def _cost_layers(gm: torch.fx.GraphModule, conventions: CostConventions
                 ) -> tuple[LayerCost, ...]:
    cache = gm.meta.setdefault(FRACBITS_META, {}).setdefault("_cost_layers", {})
    key = (id(gm.graph), len(gm.graph.nodes), conventions)
    if key not in cache:
        cache.clear()
        cache[key] = cost_layers(gm, conventions)
    return cache[key]


def model_cost(gm: torch.fx.GraphModule, metric: str = "bitops", *,
               conventions: CostConventions = FRACBITS, detach: bool = False) -> Tensor:
    """Current cost from λ: GBitOPs (``metric="bitops"``) or MB (``"size"``), float64 scalar."""
    w_map, a_map = lambda_maps(gm, detach=detach)
    layers = _cost_layers(gm, conventions)
    if metric == "bitops":
        return model_bitops(layers, w_map, a_map, conventions).to(torch.float64) / 1e9
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


def _register_lambda_source() -> None:
    from qpasses.algorithms.sensitivity import register_lambda_source
    register_lambda_source(fracbits_lambdas)


_register_lambda_source()
