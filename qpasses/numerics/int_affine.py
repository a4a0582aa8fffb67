"""Integer per-channel affine maps ``y = g·x + b`` (eval-mode BatchNorm, ``x * param``,
``x + param``, ...) on integer codes, in one requantization with a signed multiplier.

Pure tensor math (no torch.fx). Specification: docs/int-sim.md, "Per-channel affine ops".

With the input ``x = s_c·(q − z_in)`` (``s_c`` per channel or per tensor) and the output grid
``(s_y, z_y)``, the output code is ``z_y + g_c·s_c/s_y·(q − z_in) + b_c/s_y``. Writing
``M_c = |g_c|·s_c/s_y`` and ``σ_c = sign(g_c)``:

* integer contracts (gemmlowp, single, hawq)::

      A = (σ_c·(q − z_in))·2^k + B_c,   B_c = rne(b_c·2^k / (s_y·M_c))
      y = clamp(z_y + contract(A · M_c/2^k), qmin, qmax)

  The sign is applied exactly to the integer input before the (positive) fixed-point multiplier,
  so every contract rounds the true signed product; ``k`` fractional bits keep the bias rounding
  below 2^-6 output LSB (``k = ceil(log2 max M) + 5`` where positive, as for conv biases), capped
  so that ``|A|`` stays in int32.
* ``float-rne`` (fbgemm order): ``y = clamp(z_y + rne((float32(σ_c·(q − z_in)) + β_c)·m_c))``
  with ``m_c = float32(M_c)`` and ``β_c = float32(b_c/(s_y·M_c))`` (``k = 0``).

A channel with ``g_c = 0`` has ``σ_c = 0`` and the nominal multiplier ``M_c = s_c/s_y`` (any
positive value works: its input term is 0), so it outputs its bias alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.fixed_point import INT32_MAX, check_rounding_contract

__all__ = ["AffineConstants", "affine_constants", "affine_error_bound"]


@dataclass(frozen=True)
class AffineConstants:
    """The integer form of ``y = g·x + b`` (see the module docstring): per-channel ``sign``
    (int64, −1/0/1), ``bias_q`` (int64, in units of 2^-k input steps), ``frac_bits`` ``k``,
    ``real`` (float64, the positive multiplier per unit of ``A``: ``M/2^k``), ``scale_f32`` /
    ``bias_f`` (float32, float-rne only), ``acc_max`` (bound of ``|A|``)."""
    sign: Tensor
    bias_q: Tensor
    frac_bits: int
    real: Tensor
    scale_f32: Tensor
    bias_f: Tensor | None
    acc_max: int


def _vec(v: Tensor | float | int, n: int, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise NumericsError(f"affine {name} has {t.numel()} values, expected 1 or {n}")
    if not bool(torch.isfinite(t).all()):
        raise NumericsError(f"affine {name} is not finite")
    return t.clone()


def affine_constants(gain: Tensor, bias: Tensor, in_scale: Tensor | float, out_scale: float,
                     in_max_abs: int, rounding: str, multiplier_bits: int = 31,
                     frac_bits: int | None = None,
                     k_channels: Tensor | None = None) -> AffineConstants:
    """The integer constants of ``y = gain·x + bias`` from an input grid with scale(s)
    ``in_scale`` and ``|q − z_in| <= in_max_abs`` onto an output grid of scale ``out_scale``.
    ``frac_bits``: the bias's fractional bits (None = auto, from the largest multiplier of the
    channels ``k_channels`` selects: leaving out constant channels keeps ``k`` when
    prune-zero-bit-channels removes them). NumericsError when ``|A|`` cannot stay
    in int32 (a bias far outside the output range, or an input too wide)."""
    check_rounding_contract(rounding)
    n = max(torch.as_tensor(gain).numel(), torch.as_tensor(bias).numel(),
            torch.as_tensor(in_scale).numel())
    g, b = _vec(gain, n, "gain"), _vec(bias, n, "bias")
    s = _vec(in_scale, n, "input scale")
    if not (out_scale > 0 and math.isfinite(out_scale)) or not bool((s > 0).all()):
        raise NumericsError("affine scales must be finite and > 0")
    sign = torch.sign(g).to(torch.int64)
    m = torch.where(g == 0, s, g.abs() * s) / out_scale          # positive everywhere
    in_max_abs = int(in_max_abs)
    if rounding == "float-rne":
        scale_f32 = m.to(torch.float32)
        bias_f = (b / (out_scale * m)).to(torch.float32)
        if in_max_abs > INT32_MAX:
            raise NumericsError("affine input wider than int32")
        return AffineConstants(sign, torch.zeros(n, dtype=torch.int64), 0, m, scale_f32,
                               bias_f if bool((b != 0).any()) else None, in_max_abs)
    sel = m if k_channels is None or not bool(k_channels.any()) else m[k_channels]
    k = frac_bits if frac_bits is not None else max(0, math.ceil(math.log2(float(sel.max()))) + 5)
    while True:
        bq = torch.round(b * 2.0 ** k / (out_scale * m))
        if bool(torch.isfinite(bq).all()):
            acc_max = (in_max_abs << k) + int(bq.abs().max())
            if acc_max <= INT32_MAX:
                break
        if k == 0:
            raise NumericsError(f"affine accumulator (input ±{in_max_abs}, bias up to "
                                f"{float(bq.abs().max()):.3g} steps) does not fit int32")
        k -= 1
    real = m / 2.0 ** k
    return AffineConstants(sign, bq.to(torch.int64), k, real, real.to(torch.float32), None,
                           acc_max)


def affine_error_bound(real: Tensor, frac_bits: int, multiplier_bits: int, out_max_abs: int,
                       rounding: str) -> float:
    """Bound of ``|y − exact|`` in output LSB before the final clamp, integer contracts: the
    final rounding (1/2), the bias rounding (``M/2^(k+1)``, with ``real = M/2^k``: ``real/2``)
    and the multiplier's relative error ``2^-bits`` on an output of up to ``out_max_abs``;
    float-rne: 1/2 plus float32 rounding of the product and the bias sum (``2^-22`` relative)."""
    if rounding == "float-rne":
        return 0.5 + out_max_abs * 2.0 ** -22 + 2.0 ** -22
    return 0.5 + float(real.max()) / 2 + out_max_abs * 2.0 ** -multiplier_bits
