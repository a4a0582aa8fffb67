"""GMPQ (Wang et al., ICCV 2021) supernet modules: the EdMIPS composite-convolution mixers and the
Grad-CAM feature tap, and access to them by layer.

Spec: docs/algorithms.md, "GMPQ". The graph surgery lives in the passes
(:mod:`qpasses.passes.insert_gmpq_supernet`, ``select_gmpq_policy``); the losses, Grad-CAM and
the teacher are in :mod:`qpasses.algorithms.gmpq`.

- :class:`GMPQWeightMixer`: the ``weight_fake_quant`` of a composite layer. ``Σ_i π_w,i Q_i(W)``
  with HAQ-style linear branches ``Q_i(W) = rne(clamp(W, -T, T)/Δ_i)·Δ_i``,
  ``Δ_i = T/(2^{b_i-1} - 1)``, ``T = max|W|`` fixed on the first forward; plain STE (the gradient
  reaches W unmasked), ``π_w = softmax(logits)``.
- :class:`GMPQActMixer`: ``Σ_j π_a,j Q_j(x)`` with one PACT branch per candidate (own clip α_j,
  init 6.0, PACT's α gradient). Both mixers quantize every candidate at once with
  :func:`qpasses.numerics.fast_fake_quant.fast_fake_quant` (one scale per stacked branch). A layer
  computing ``conv(Σ_j π_a,j Q_j(x), Σ_i π_w,i Q_i(W))`` equals
  ``Σ_i Σ_j π_w,i π_a,j conv(Q_j(x), Q_i(W))`` by bilinearity (Eq. 5 evaluated with one
  convolution).
- :class:`FeatureTap`: the identity node whose input is the feature map Grad-CAM reads.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from passes_registry import get_record

from qpasses.errors import AnnotationError, NumericsError
from qpasses.ir.records import GMPQ_META, SELECTED_META, GmpqSupernetRecord
from qpasses.numerics.fast_fake_quant import fast_fake_quant
from qpasses.numerics.quantizers import DEFAULT_EPS

__all__ = [
    "GMPQ_META", "SELECTED_META", "ACT_CONTAINER", "TAP_NAME", "GMPQWeightMixer", "GMPQActMixer",
    "FeatureTap", "has_supernet", "supernet_modules", "supernet_record", "arch_parameters",
]

ACT_CONTAINER = "gmpq_act"                 # ModuleDict holding the activation mixers
TAP_NAME = "gmpq_feature_tap"


def _bits_buffer(candidates: Any, min_bits: int, what: str, name: str) -> Tensor:
    cs = tuple(candidates)
    if not cs:
        raise NumericsError(f"GMPQ {what} mixer '{name}': give at least one candidate bit-width")
    if any(isinstance(b, bool) or not isinstance(b, int) or not min_bits <= b <= 32 for b in cs):
        raise NumericsError(f"GMPQ {what} mixer '{name}': candidates must be ints in "
                            f"{min_bits}..32, got {list(cs)}")
    if len(set(cs)) != len(cs):
        raise NumericsError(f"GMPQ {what} mixer '{name}': {list(cs)} lists a bit-width twice")
    return torch.tensor(cs, dtype=torch.int64)


def _branch_view(t: Tensor, ndim: int) -> Tensor:
    """A per-candidate vector shaped to broadcast over stacked branches ``(B, *tensor)``."""
    return t.view(-1, *([1] * ndim))


class GMPQWeightMixer(nn.Module):
    """``Σ_i π_w,i Q_i(W)``: softmax-weighted HAQ linear weight branches (docs/algorithms.md, "GMPQ").

    ``threshold`` T is ``max|W|`` of the first forward, then frozen (a buffer, not re-estimated:
    the official code's behaviour). The branches are exact grid values; W gets an identity
    gradient (plain STE, unmasked), the logits get ``∂π/∂logits · Q_i(W)``."""

    is_weight_quantizer = True

    def __init__(self, candidates: Any, *, logit_init: float = 0.01, name: str = "") -> None:
        super().__init__()
        self.qname = name
        bits = _bits_buffer(candidates, 2, "weight", name)  # Δ = T/(2^{b-1}-1) needs b >= 2
        self.candidates = tuple(int(b) for b in bits)
        self._top = 2 ** (max(self.candidates) - 1) - 1    # widest code range, a python int
        self.register_buffer("bits", bits)
        self.logits = nn.Parameter(torch.full((len(self.candidates),), float(logit_init)))
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))
        self._init = False   # python copy of `initialized`: no device sync per forward
        self.register_load_state_dict_post_hook(_refresh_init)

    def probs(self) -> Tensor:
        return torch.softmax(self.logits, dim=0)

    def expected_bits(self) -> Tensor:
        """``E[b_w] = Σ_i π_i b_i`` (differentiable in the logits)."""
        return (self.probs() * self.bits.to(self.logits.dtype)).sum()

    @torch.no_grad()
    def branches(self, w: Tensor) -> Tensor:
        """The quantized weights of every candidate, stacked ``(B, *w.shape)`` (no gradient)."""
        if not self._init:
            self.threshold.copy_(w.detach().abs().max())
            self.initialized.fill_(1)
            self._init = True
        levels = (2 ** (self.bits - 1) - 1).to(w.dtype)                 # (B,)
        t = self.threshold.to(w.dtype).clamp(min=DEFAULT_EPS)
        # rne(clamp(W, -T, T)/Δ_b)·Δ_b: after the clamp no code exceeds its own L_b = T/Δ_b, so
        # one bound (the widest) serves every branch
        wc = torch.clamp(w.detach(), -t, t).unsqueeze(0).expand(len(self.candidates), *w.shape)
        return fast_fake_quant(wc, t / levels, None, -self._top, self._top, axis=0)

    def forward(self, w: Tensor) -> Tensor:
        mixed = torch.tensordot(self.probs().to(w.dtype), self.branches(w), dims=1)
        return mixed + (w - w.detach())    # + exact 0 carrying the identity gradient to W

    def extra_repr(self) -> str:
        pi = ", ".join(f"{b}:{p:.3f}" for b, p in zip(self.candidates, self.probs().tolist()))
        return f"pi_w={{{pi}}}, T={float(self.threshold):.4g}"


class GMPQActMixer(nn.Module):
    """``Σ_j π_a,j Q_j(x)``: one PACT branch per candidate, each with its own clip α_j
    (``Q = rne(clamp(x, 0, α)/Δ)·Δ``, Δ = α/(2^b - 1) detached, PACT's α
    gradient), the quantizer ``insert-fake-quant{act-scheme=pact}`` uses for finetuning.
    ``signed`` inputs use its double-sided PACT, ``clamp(x, -α, α)`` on the narrow signed grid
    (a library extension: GMPQ's inputs are all post-ReLU)."""

    def __init__(self, candidates: Any, *, signed: bool = False, alpha_init: float = 6.0,
                 logit_init: float = 0.01, name: str = "", consumer: str = "") -> None:
        super().__init__()
        if not alpha_init > 0:
            raise NumericsError(f"GMPQ activation mixer '{name}': alpha_init must be > 0")
        self.qname = name
        self.consumer = consumer
        self.signed = signed
        # the narrow signed grid has 2^b - 1 levels: b = 1 would be the constant 0
        bits = _bits_buffer(candidates, 2 if signed else 1, "signed activation" if signed
                            else "activation", name)
        self.candidates = tuple(int(b) for b in bits)
        # widest code range (a python int): y/Δ_j never exceeds its own L_j, one bound serves all
        self._top = 2 ** (max(self.candidates) - (1 if signed else 0)) - 1
        self.register_buffer("bits", bits)
        n = len(self.candidates)
        self.logits = nn.Parameter(torch.full((n,), float(logit_init)))
        self.alpha = nn.Parameter(torch.full((n,), float(alpha_init)))

    def probs(self) -> Tensor:
        return torch.softmax(self.logits, dim=0)

    def expected_bits(self) -> Tensor:
        return (self.probs() * self.bits.to(self.logits.dtype)).sum()

    def branches(self, x: Tensor) -> Tensor:
        """Every candidate's quantized input, stacked ``(B, *x.shape)``, with PACT gradients:
        x gets 1 inside ``[0, α_j]`` (``[-α_j, α_j]`` signed), α_j gets 1 (−1) where clipped."""
        a = _branch_view(self.alpha.abs().to(x.dtype), x.dim())
        if self.signed:   # the grids of insert-fake-quant's PACT: narrow signed / unsigned
            y = torch.clamp(x.unsqueeze(0), -a, a)
            levels = 2 ** (self.bits - 1) - 1
        else:
            y = torch.minimum(torch.relu(x).unsqueeze(0), a)
            levels = 2 ** self.bits - 1
        return fast_fake_quant(y, a.detach().flatten() / levels.to(x.dtype), None,
                               -self._top if self.signed else 0, self._top, axis=0)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tensordot(self.probs().to(x.dtype), self.branches(x), dims=1)

    def extra_repr(self) -> str:
        pi = ", ".join(f"{b}:{p:.3f}" for b, p in zip(self.candidates, self.probs().tolist()))
        return f"pi_a={{{pi}}}" + (", signed" if self.signed else "")


def _refresh_init(module: nn.Module, incompatible: Any) -> None:
    module._init = bool(int(module.initialized))


class FeatureTap(nn.Module):
    """Identity on the Grad-CAM feature map A. While ``armed`` it keeps the tensor that passes;
    a tensor without gradient (frozen teacher) is replaced by a leaf that requires one, so
    ``∂f/∂A`` exists without recording the teacher's backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.feature: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.armed:
            return x
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        self.feature = x
        return x


# ---------------------------------------------------------------------------------------------
# Access by layer


def supernet_record(gm: torch.fx.GraphModule) -> GmpqSupernetRecord | None:
    """The graph's GMPQ supernet record (written by insert-gmpq-supernet), None when it has
    none (a teacher from :func:`make_teacher` carries a GmpqTeacherRecord instead)."""
    rec = get_record(gm, GMPQ_META)
    return rec if isinstance(rec, GmpqSupernetRecord) else None


def has_supernet(gm: torch.fx.GraphModule) -> bool:
    info = supernet_record(gm)
    return info is not None and bool(info.layers)


def supernet_modules(gm: torch.fx.GraphModule
                     ) -> dict[str, tuple[GMPQWeightMixer, GMPQActMixer | None]]:
    """``{layer name: (weight mixer, activation mixer or None)}`` in graph order."""
    if not has_supernet(gm):
        raise AnnotationError("the graph has no GMPQ supernet: run insert-gmpq-supernet first "
                              "(after annotate-bitwidths)")
    out = {}
    for name, rec in supernet_record(gm).layers.items():
        wm = gm.get_submodule(rec.module).weight_fake_quant
        am = gm.get_submodule(rec.act) if rec.act else None
        out[name] = (wm, am)
    return out


def arch_parameters(gm: torch.fx.GraphModule) -> list[nn.Parameter]:
    """The architecture logits (EdMIPS/GMPQ: their own optimizer, lr 0.01, wd 1e-4)."""
    ps = []
    for wm, am in supernet_modules(gm).values():
        ps.append(wm.logits)
        if am is not None:
            ps.append(am.logits)
    return ps
