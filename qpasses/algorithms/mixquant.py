"""MixQuant (Kloberdanz & Le, "MixQuant: A Quantization Bit-width Search that Can Optimize the
Performance of your Quantization Method", 2023): per-layer weight bit-widths from round-off error.

The paper fixes a weight-only, per-layer search over int2..int8 by the round-off error of the
quantize→dequantize round trip and a quantization-error multiplier (QEM), in linear time; it does
not pin down the quantizer, the metric or the inequality, so each is a parameter here
(docs/algorithms.md, "MixQuant"):

* Quantizer used to measure error: per-tensor asymmetric min/max (``scheme="asymmetric"``,
  ``per_channel=False``), i.e. ``s_b = (max − min)/(2^b − 1)`` on the range extended to contain 0,
  ``z_b = rne(−min/s_b)``, round trip ``Ŵ_b = s_b·(clamp(rne(W/s_b) + z_b, 0, 2^b − 1) − z_b)``.
* Error metric ``QE_b(W)``: pluggable (:func:`register_qe_metric`); default ``mse`` =
  ``mean((W − Ŵ_b)²)``. Built in: ``mse``, ``mae`` (mean |error|), ``rel-l2``
  (``‖W − Ŵ_b‖ / ‖W‖``).
* Selection: ``b = min{b ∈ candidates : QE_b ≤ qem · QE_ref}`` with ``QE_ref = QE_{reference_bits}``
  (default 8): the smallest width whose round-off error is within ``qem`` times the int8 error.
  ``b = 8`` always qualifies when it is a candidate; otherwise (no candidate qualifies) the most
  accurate candidate is taken.

**Why this rule.** It is consistent with everything the paper states (weight-only, layer-wise,
candidates int2..int8, a round-off-error criterion, linear time, a multiplier on the error): one
pass over each layer's weights per candidate, no data, no gradients. MSE is the default because it
is what "round-off error" of a round trip most commonly denotes and what downstream PTQ
(BRECQ/AdaRound) minimizes. Under the uniform-noise model ``QE_b/QE_8 ≈ ((2^8−1)/(2^b−1))²``
(b=7: 4.03, 6: 16.4, 5: 67.7, 4: 289, 3: 1327, 2: 7225) for *every* layer (tested), so with MSE a
QEM in the single digits gives int7/int8 almost everywhere and mixed precision appears only where
the noise model breaks (heavy-tailed layers, whose ratio is smaller, get fewer bits); ``mae`` has
ratios ≈ ``255/(2^b−1)`` (2.0, 4.05, 8.2, 17, 36, 85), so single-digit QEMs reach int5. Another
metric is one ``metric=`` option away, with no code change.

Complexity: ``O(|candidates| · Σ_l |W_l|)`` with the vectorized error kernel
(:func:`qpasses.algorithms.sensitivity.weight_quant_errors`), a fraction of a second for ResNet-50.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qpasses.errors import NumericsError
from qpasses.numerics import quantizers
from qpasses.algorithms.sensitivity import weight_quant_errors

__all__ = ["QE_METRICS", "register_qe_metric", "qe_metric_names", "quantization_errors",
           "select_bits", "MixQuantLayer"]

# name -> (fast reductions it needs, finalize(reductions, n, sum_sq()) -> (B,)) or a generic
# fn(w, w_hat) -> float evaluated on explicit round trips.
_FAST: dict[str, tuple[tuple[str, ...], Callable[..., torch.Tensor]]] = {
    "mse": (("sse",), lambda r, n, ss: r["sse"] / n),
    "mae": (("sae",), lambda r, n, ss: r["sae"] / n),
    "rel-l2": (("sse",), lambda r, n, ss: torch.sqrt(r["sse"] / ss()) if ss() > 0
               else torch.zeros_like(r["sse"])),
}
_GENERIC: dict[str, Callable[[torch.Tensor, torch.Tensor], float]] = {}
QE_METRICS = _FAST  # the built-in metric table (read-only by convention)


def register_qe_metric(name: str, fn: Callable[[torch.Tensor, torch.Tensor], float]) -> None:
    """Add ``search-mixquant{metric=NAME}``: ``fn(w, w_hat)`` -> the round-off error (float) of
    one layer's weights ``w`` and their round trip ``w_hat`` at one candidate width."""
    if name in _FAST:
        raise NumericsError(f"metric '{name}' is built in")
    _GENERIC[name] = fn


def qe_metric_names() -> list[str]:
    return sorted(set(_FAST) | set(_GENERIC))


def quantization_errors(weight: torch.Tensor, bits: Sequence[int], metric: str = "mse", *,
                        scheme: str = "asymmetric", per_channel: bool = False) -> torch.Tensor:
    """``QE_b(W)`` for every b in ``bits`` (float64, shape ``(len(bits),)``)."""
    if metric in _FAST:
        needs, finalize = _FAST[metric]
        red = weight_quant_errors(weight, bits, scheme=scheme, per_channel=per_channel,
                                  reductions=needs)
        red = {k: v.sum(dim=0) for k, v in red.items()}

        def sum_sq() -> float:  # only rel-l2 needs it
            return float(torch.linalg.vector_norm(weight.detach().float()).double() ** 2)
        return finalize(red, weight.numel(), sum_sq)
    if metric not in _GENERIC:
        raise NumericsError(f"unknown metric '{metric}'; valid: {', '.join(qe_metric_names())}")
    fn = _GENERIC[metric]
    w = weight.detach().float()
    out = []
    for b in bits:
        s, z = quantizers.minmax_qparams(w, b, scheme, axis=0 if per_channel else None)
        w_hat = quantizers.quantize_dequantize(w, s, z, b, scheme, axis=0)
        out.append(float(fn(w, w_hat)))
    return torch.tensor(out, dtype=torch.float64)


@dataclass(frozen=True)
class MixQuantLayer:
    """One layer's decision: the errors per candidate, the reference error and the chosen width."""
    name: str
    candidates: tuple[int, ...]
    errors: tuple[float, ...]
    reference_error: float
    bits: int

    @property
    def ratios(self) -> tuple[float, ...]:
        """``QE_b / QE_ref`` per candidate (inf when QE_ref = 0 and QE_b > 0)."""
        ref = self.reference_error
        return tuple((e / ref) if ref > 0 else (0.0 if e == 0 else float("inf"))
                     for e in self.errors)


def select_bits(errors: Sequence[float], candidates: Sequence[int], reference_error: float,
                qem: float) -> int:
    """``min{b : QE_b <= qem · QE_ref}``; the most accurate candidate when none qualifies."""
    order = sorted(range(len(candidates)), key=lambda j: candidates[j])
    for j in order:
        if errors[j] <= qem * reference_error:
            return int(candidates[j])
    return int(candidates[min(order, key=lambda j: (errors[j], -candidates[j]))])
