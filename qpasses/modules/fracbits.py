"""FracBits (Yang & Jin, AAAI 2021) training-time modules and the helpers a training loop uses.

Spec: docs/algorithms.md, "FracBits". The graph surgery lives in the passes
(:mod:`qpasses.passes.insert_fracbits`): this module holds what a user's training loop
touches.

- :class:`FracBitsWeightQuant`: DoReFa weights with a learnable fractional bit-width λ_w (scalar
  per layer or one per output kernel), Eq. 1 interpolation / Eq. 2 gradient through
  :func:`qpasses.numerics.quantizers.fracbits_interp`. λ = 0 gives the 0-bit candidate (Eq. 8):
  the kernel is exactly zero.
- :class:`FracBitsActQuant`: PACT on a layer's input with a learnable clip α (FracBits' α
  gradient) and a learnable λ_a (one per layer).
- :func:`clamp_lambdas`: clamp every λ parameter into its candidate range (call after
  ``optimizer.step()``; the forward clamps too, with zero gradient outside the range).

The resource penalty of Eq. 6-7 and the model cost as a function of λ are in
:mod:`qpasses.algorithms.fracbits` (``penalty``, ``model_cost``, ``lambda_maps``).

Deliberate deviation from the official code: ``hi = min(floor(λ) + 1, max(B))`` instead of
``ceil(λ)``, so the task loss still has a λ-gradient at integer λ.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from passes_registry import get_record

from qpasses.errors import AnnotationError, NumericsError
from qpasses.ir.records import FRACBITS_META, FROZEN_META, FracBitsRecord
from qpasses.numerics.quantizers import dorefa_weight, pact

__all__ = ["FracBitsWeightQuant", "FracBitsActQuant", "FRACBITS_META", "FROZEN_META",
           "ACT_CONTAINER", "clamp_lambdas", "fracbits_modules", "fracbits_record", "has_fracbits",
           "lambda_parameters"]

ACT_CONTAINER = "fracbits_act"         # ModuleDict holding the activation quantizers


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


def fracbits_record(gm: torch.fx.GraphModule) -> FracBitsRecord | None:
    """The graph's FracBits record (written by insert-fracbits), None when it has none."""
    return get_record(gm, FRACBITS_META)


def has_fracbits(gm: torch.fx.GraphModule) -> bool:
    info = fracbits_record(gm)
    return info is not None and bool(info.layers)


def fracbits_modules(gm: torch.fx.GraphModule
                     ) -> dict[str, tuple[FracBitsWeightQuant, FracBitsActQuant | None]]:
    """``{layer name: (weight quantizer, activation quantizer or None)}`` in graph order."""
    info = fracbits_record(gm)
    if info is None or not info.layers:
        raise AnnotationError("the graph has no FracBits quantizers: run insert-fracbits first "
                              "(after annotate-bitwidths)")
    out = {}
    for name, rec in info.layers.items():
        layer = gm.get_submodule(rec.module)
        wq = layer.weight_fake_quant
        aq = gm.get_submodule(rec.act) if rec.act else None
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
    """Clamp every λ into its candidate range (call after each optimizer step: the clamp in the
    forward has zero gradient outside the range, so an overshooting λ would never come back)."""
    for wq, aq in fracbits_modules(gm).values():
        wq.clamp_()
        if aq is not None:
            aq.clamp_()
