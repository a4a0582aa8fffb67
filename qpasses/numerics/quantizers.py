"""Uniform quantizers: integer ranges, rounding, affine (fake-)quantization, STE/LSQ, DoReFa, PACT and
FracBits fractional bit-widths.

Conventions (docs/algorithms.md, "Conventions"): ``q = clamp(rnd(x / s) + z, qmin, qmax)`` and
``x_hat = s * (q - z)`` (PyTorch convention; Distiller's multiplier is ``1 / s`` and its zero point
``-z``). ``x / s`` is evaluated as ``x * (1 / s)`` in the scale's precision, exactly as torch's
fake_quantize kernels do, so codes agree with torch.ao bit for bit. One consequence: the float32 scale
of [-1, 1] at 8 bits is not exactly 1/127.5, so -1 maps to -127 (as in torch), whereas Distiller's
exact multiplier 127.5 gives -128. "Per-channel" means along ``axis`` (default 0, the output channel
of a conv/linear weight).

Bit-widths are an ``int`` or a 1-D integer tensor with one entry per channel along ``axis``
("per-kernel" bits); a per-kernel tensor is handled by one broadcast op, never a loop over channels.
A bit-width of 0 means "pruned": such a channel quantizes to exactly 0 whatever its scale.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.quant_utils import (Bits, MAX_BITS, ROUNDING_MODES, Rounding, SCHEMES,
                                          Scheme, along_axis, check_bits, check_rounding,
                                          check_scheme, is_compiling, normalize_axis, reduce_to,
                                          straight_through)

__all__ = [
    "ROUNDING_MODES", "SCHEMES", "MAX_BITS", "DEFAULT_EPS",
    "round_tensor", "qrange", "scheme_qrange", "calc_qparams", "minmax_qparams",
    "quantize", "dequantize", "quantize_dequantize", "fake_quantize", "lsq_fake_quant",
    "unit_quantize", "fracbits_interp", "dorefa_normalize", "dorefa_weight", "pact",
]

_SIGNED_SCHEMES = {"symmetric": True, "asymmetric": False, "asymmetric_signed": True, "unsigned": False}
# Same floor as torch.ao observers: keeps scales strictly positive for zero-range / all-zero inputs.
DEFAULT_EPS: float = float(torch.finfo(torch.float32).eps)


# --------------------------------------------------------------------------------------------------
# rounding and integer ranges
# --------------------------------------------------------------------------------------------------

def round_tensor(x: Tensor, mode: Rounding = "rne") -> Tensor:
    """Round to an integer-valued tensor with an explicit tie rule (docs/algorithms.md,
    "Conventions").

    ``rne`` half to even, ``rha`` half away from zero, ``rhu`` half up (toward +inf), ``trunc``
    toward zero, ``floor`` toward -inf. ``rha``/``rhu`` compare the exact fractional part with 0.5
    instead of computing ``floor(x + 0.5)``, which misrounds 0.49999997 (x + 0.5 rounds up to 1).
    """
    check_rounding(mode)
    if not x.dtype.is_floating_point:
        return x
    if mode == "rne":
        return torch.round(x)
    if mode == "trunc":
        return torch.trunc(x)
    if mode == "floor":
        return torch.floor(x)
    if mode == "rhu":
        f = torch.floor(x)
        # x - floor(x) is exact for |x| >= 1 (Sterbenz) and rounding-monotone below, so the tie
        # test is exact.
        return f + (x - f >= 0.5).to(x.dtype)
    t = torch.trunc(x)
    return t + torch.sign(x) * ((x - t).abs() >= 0.5).to(x.dtype)


def qrange(bits: Bits, signed: bool, narrow: bool = False) -> tuple[Bits, Bits]:
    """Integer range of a ``bits``-wide code: signed ``[-2^(b-1), 2^(b-1)-1]`` (narrow drops the most
    negative code), unsigned ``[0, 2^b-1]``; 0 bits gives ``(0, 0)``. Ints in, ints out; a per-kernel
    bits tensor gives int64 tensors of the same shape."""
    bits = check_bits(bits)
    if narrow and not signed:
        raise NumericsError("narrow=True is defined only for signed ranges (it drops -2^(b-1)); "
                            "use narrow=False for unsigned ranges")
    if isinstance(bits, int):
        if bits == 0:
            return 0, 0
        if signed:
            half = 1 << (bits - 1)
            return (-half + 1 if narrow else -half), half - 1
        return 0, (1 << bits) - 1
    zero = torch.zeros_like(bits)
    if signed:
        half = torch.where(bits > 0, torch.ones_like(bits) << (bits - 1).clamp(min=0), zero)
        qmax = torch.where(bits > 0, half - 1, zero)
        qmin = torch.where(bits > 0, -half + 1 if narrow else -half, zero)
        return qmin, qmax
    qmax = torch.where(bits > 0, (torch.ones_like(bits) << bits) - 1, zero)
    return zero, qmax


def scheme_qrange(bits: Bits, scheme: Scheme = "symmetric", narrow: bool = False) -> tuple[Bits, Bits]:
    """``qrange`` for a named scheme (signed for symmetric / asymmetric_signed)."""
    check_scheme(scheme)
    return qrange(bits, _SIGNED_SCHEMES[scheme], narrow)


# --------------------------------------------------------------------------------------------------
# quantization parameters
# --------------------------------------------------------------------------------------------------

def calc_qparams(min_val: Tensor | float, max_val: Tensor | float, bits: Bits,
                 scheme: Scheme = "symmetric", *, narrow: bool = False,
                 eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """Scale and zero point mapping ``[min_val, max_val]`` onto the ``bits``-wide integer range.

    - symmetric: ``s = max(|min|, |max|) / ((qmax - qmin) / 2)``, ``z = 0`` (Distiller SYMMETRIC for
      the full range: ``+max`` lands on 127.5 and clamps to 127; SYMMETRIC_RESTRICTED when narrow).
    - asymmetric / asymmetric_signed: the range is first extended to contain 0, then
      ``s = (hi - lo) / (qmax - qmin)`` and ``z = qmin - rne(lo / s)`` clamped to the range, so z is
      integral and 0 is exactly representable.
    - unsigned: ``s = max(max, 0) / qmax``, ``z = 0``.

    Shapes broadcast (per-tensor 0-D, per-channel 1-D, per-kernel bits). The scale is floored at
    ``eps`` so zero-range / all-zero inputs never give 0 or NaN; 0-bit channels get ``s = 1, z = 0``.
    Returns ``(scale, zero_point)`` as (float, int64) tensors.
    """
    check_scheme(scheme)
    bits = check_bits(bits)
    if narrow and scheme == "unsigned":
        raise NumericsError("narrow=True is not defined for scheme 'unsigned' (z = 0 would fall "
                            "outside the range); use 'symmetric' or 'asymmetric_signed'")
    if narrow and scheme == "asymmetric":
        raise NumericsError("narrow=True is defined only for signed schemes ('symmetric', "
                            "'asymmetric_signed'); scheme 'asymmetric' uses the unsigned range")
    if not eps > 0:
        raise NumericsError(f"eps must be > 0, got {eps}")
    mn = torch.as_tensor(min_val)
    mx = torch.as_tensor(max_val, device=mn.device)
    dtype = mn.dtype if mn.dtype.is_floating_point else torch.get_default_dtype()
    mn, mx = mn.to(dtype), mx.to(dtype)
    if not is_compiling():
        if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(mx).all())):
            raise NumericsError("min_val / max_val must be finite (was the observer ever run?)")
        if bool((mn > mx).any()):
            raise NumericsError("min_val must be <= max_val elementwise")
    qmin, qmax = scheme_qrange(bits, scheme, narrow)
    qmin_t = torch.as_tensor(qmin, device=mn.device)
    qmax_t = torch.as_tensor(qmax, device=mn.device)
    levels = (qmax_t - qmin_t).to(dtype)
    safe_levels = torch.where(levels > 0, levels, torch.ones_like(levels))
    if scheme == "symmetric":
        amax = torch.maximum(mn.abs(), mx.abs())
        scale = amax / (safe_levels / 2)
        zp = torch.zeros_like(scale)
    elif scheme == "unsigned":
        scale = mx.clamp(min=0) / safe_levels
        zp = torch.zeros_like(scale)
    else:
        lo, hi = mn.clamp(max=0), mx.clamp(min=0)
        scale = (hi - lo) / safe_levels
        scale = scale.clamp(min=eps)
        zp = qmin_t.to(dtype) - torch.round(lo / scale)
        zp = torch.maximum(torch.minimum(zp, qmax_t.to(dtype)), qmin_t.to(dtype))
    scale = scale.clamp(min=eps)
    # Broadcast so per-tensor ranges with per-kernel bits give per-kernel qparams.
    scale, zp, levels = torch.broadcast_tensors(scale, zp, levels)
    scale = torch.where(levels > 0, scale, torch.ones_like(scale))
    zp = torch.where(levels > 0, zp, torch.zeros_like(zp))
    return scale.contiguous(), zp.to(torch.int64).contiguous()


def minmax_qparams(x: Tensor, bits: Bits, scheme: Scheme = "symmetric", *, axis: int | None = None,
                   narrow: bool = False, eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """``calc_qparams`` from the min/max of ``x``: per-tensor (``axis=None``) or per-channel."""
    if x.numel() == 0:
        raise NumericsError("cannot compute min/max qparams of an empty tensor")
    xd = x.detach()
    if axis is None:
        mn, mx = torch.aminmax(xd)
    else:
        ax = normalize_axis(axis, x.dim())
        flat = xd.movedim(ax, 0).reshape(x.shape[ax], -1)
        mn, mx = torch.aminmax(flat, dim=1)
    return calc_qparams(mn, mx, bits, scheme, narrow=narrow, eps=eps)


# --------------------------------------------------------------------------------------------------
# affine quantization
# --------------------------------------------------------------------------------------------------

def _check_scale(scale: Tensor, levels: Tensor) -> None:
    if is_compiling():
        return
    scale, levels = torch.broadcast_tensors(scale, levels)
    bad = ~(torch.isfinite(scale) & (scale > 0)) & (levels > 0)
    if bool(bad.any()):
        raise NumericsError("scale must be finite and > 0 for every channel with bits > 0 "
                            "(only 0-bit channels may have an arbitrary scale)")


def _max_abs_code(qmin: Bits, qmax: Bits) -> int:
    def mag(v: Bits) -> int:
        return abs(int(v)) if not isinstance(v, Tensor) else int(v.abs().max())
    return max(mag(qmin), mag(qmax))


def _work_dtype(dtype: torch.dtype, qmin: Bits, qmax: Bits) -> torch.dtype:
    """float64 when the integer codes are not all exactly representable in ``dtype`` (e.g. 32-bit
    codes in float32), otherwise ``dtype`` itself."""
    # eps = 2^-mantissa_bits, so integers up to 2 / eps are exact.
    exact = round(2.0 / torch.finfo(dtype).eps)
    return torch.float64 if _max_abs_code(qmin, qmax) > exact else dtype


def _affine_codes(x: Tensor, scale: Tensor | float, zero_point: Tensor | int, qmin: Bits, qmax: Bits,
                  axis: int, rounding: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared core: broadcast qparams; return (codes q, scale, zero point, unclamped codes,
    single-level mask), all in the working dtype."""
    check_rounding(rounding)
    if not x.dtype.is_floating_point:
        raise NumericsError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() > 0:
        normalize_axis(axis, x.dim())
    dt = _work_dtype(x.dtype, qmin, qmax)
    s = along_axis(scale, x, axis, "scale").detach().to(dt)
    z = along_axis(zero_point, x, axis, "zero_point").detach().to(dt)
    lo = along_axis(qmin, x, axis, "qmin").to(dt)
    hi = along_axis(qmax, x, axis, "qmax").to(dt)
    if not is_compiling() and bool((lo > hi).any()):
        raise NumericsError("qmin must be <= qmax")
    single = hi == lo
    _check_scale(s, hi - lo)
    # A single-level range (0 bits) may carry any scale, even 0 or NaN: divide by 1 there instead.
    s_safe = torch.where(single, torch.ones_like(s), s)
    # Multiply by the reciprocal like torch's fake_quantize/quantize kernels, so codes match torch.ao
    # bit for bit (x / s differs in rare last-ulp ties).
    raw = round_tensor(x.detach().to(dt) * (1.0 / s_safe), rounding) + z
    q = torch.clamp(raw, lo, hi)
    return q, s_safe, z, raw, single


def fake_quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | int, qmin: Bits, qmax: Bits,
                  rounding: Rounding = "rne", axis: int = 0) -> Tensor:
    """Straight-through fake quantization ``s * (clamp(rnd(x/s) + z, qmin, qmax) - z)``.

    ``scale``/``zero_point``/``qmin``/``qmax`` are scalars or per-channel 1-D tensors along ``axis``.
    The gradient wrt ``x`` is 1 where the unclamped code lies in ``[qmin, qmax]`` and 0 outside (as
    torch's fake_quantize); ``scale`` and ``zero_point`` get no gradient (see ``lsq_fake_quant``). A
    channel whose range has a single level (0 bits, ``qmin == qmax``) outputs exactly 0 and passes
    no gradient.
    """
    q, s, z, raw, single = _affine_codes(x, scale, zero_point, qmin, qmax, axis, rounding)
    value = torch.where(single, torch.zeros_like(q), (q - z) * s).to(x.dtype)
    # Inside the range iff the unclamped code was not clamped; a pruned (single-level) channel is a
    # constant 0 and passes no gradient.
    mask = (raw == q) & ~single
    return straight_through(x, value, mask)


def quantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | int, bits: Bits,
             scheme: Scheme = "symmetric", *, narrow: bool = False, axis: int = 0,
             rounding: Rounding = "rne") -> Tensor:
    """Integer codes ``clamp(rnd(x/s) + z, qmin, qmax)`` as int64 (exact for every bits <= 32)."""
    qmin, qmax = scheme_qrange(bits, scheme, narrow)
    q, *_ = _affine_codes(x, scale, zero_point, qmin, qmax, axis, rounding)
    return q.to(torch.int64)


def dequantize(q: Tensor, scale: Tensor | float, zero_point: Tensor | int, *, axis: int = 0,
               dtype: torch.dtype = torch.float32) -> Tensor:
    """``s * (q - z)`` in ``dtype``; per-channel qparams along ``axis``."""
    if q.dtype.is_floating_point and not bool((q == torch.round(q)).all()):
        raise NumericsError("dequantize expects integer codes; q has non-integral entries")
    s = along_axis(scale, q, axis, "scale").to(dtype)
    z = along_axis(zero_point, q, axis, "zero_point").to(dtype)
    return (q.to(dtype) - z) * s


def quantize_dequantize(x: Tensor, scale: Tensor | float, zero_point: Tensor | int, bits: Bits,
                        scheme: Scheme = "symmetric", *, narrow: bool = False, axis: int = 0,
                        rounding: Rounding = "rne") -> Tensor:
    """Fake-quantize ``x`` at ``bits`` (int or per-kernel tensor along ``axis``) with STE gradients.

    Equals ``dequantize(quantize(x, ...), ...)`` in value; 0-bit channels are exactly 0.
    """
    qmin, qmax = scheme_qrange(bits, scheme, narrow)
    return fake_quantize(x, scale, zero_point, qmin, qmax, rounding, axis)


class _LSQ(torch.autograd.Function):
    """LSQ (Esser et al. 2020): ``round(clamp(x/s, qmin, qmax)) * s`` with the LSQ step gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, qmin: Tensor,  # type: ignore[override]
                qmax: Tensor, g: Tensor, rounding: str) -> Tensor:
        v = x * (1.0 / s)
        vc = torch.minimum(torch.maximum(v, qmin), qmax)
        r = round_tensor(vc, rounding)
        ctx.save_for_backward(v, r, qmin, qmax, g)
        ctx.s_shape = s.shape
        return r * s

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        v, r, qmin, qmax, g = ctx.saved_tensors
        below, above = v < qmin, v > qmax
        inside = ~(below | above)
        grad_x = torch.where(inside, grad, torch.zeros_like(grad))
        # d(out)/ds: round(v) - v inside, qmin below, qmax above (LSQ Eq. 3), scaled by g.
        ds = torch.where(below, qmin.expand_as(v), torch.where(above, qmax.expand_as(v), r - v))
        grad_s = reduce_to(grad * ds * g, ctx.s_shape)
        return grad_x, grad_s, None, None, None, None


def lsq_fake_quant(x: Tensor, step: Tensor, qmin: Bits, qmax: Bits,
                   grad_scale: float | Tensor | None = None, *, axis: int = 0,
                   rounding: Rounding = "rne") -> Tensor:
    """LSQ fake quantization with a learnable ``step`` (scalar or per-channel along ``axis``).

    Forward ``round(clamp(x/step, qmin, qmax)) * step``. Gradients: ``x`` gets 1 inside the range and 0
    outside; ``step`` gets ``(round(x/s) - x/s)`` inside, ``qmin``/``qmax`` outside, times
    ``grad_scale`` (default LSQ's ``1/sqrt(N * qmax)``, N = elements per step).
    """
    check_rounding(rounding)
    if not isinstance(step, Tensor):
        raise NumericsError("step must be a tensor (a learnable parameter)")
    s = along_axis(step, x, axis, "step").to(x.dtype)
    lo = along_axis(qmin, x, axis, "qmin").to(x.dtype)
    hi = along_axis(qmax, x, axis, "qmax").to(x.dtype)
    if not is_compiling():
        if not bool((step.detach() > 0).all()):
            raise NumericsError("step must be > 0 everywhere")
        if bool((lo >= hi).any()):
            raise NumericsError("lsq_fake_quant needs qmin < qmax (bits >= 1)")
    if grad_scale is None:
        n = x.numel() / max(step.numel(), 1)
        pos = max(float(hi.detach().max()), 1.0)
        grad_scale = 1.0 / math.sqrt(n * pos)
    g = torch.as_tensor(grad_scale, dtype=x.dtype, device=x.device)
    return _LSQ.apply(x, s, lo, hi, g, rounding)


# --------------------------------------------------------------------------------------------------
# FracBits: unit quantizer, fractional bits, DoReFa weights and PACT activations
# --------------------------------------------------------------------------------------------------

def unit_quantize(u: Tensor, bits: Bits, *, axis: int = 0, rounding: Rounding = "rne") -> Tensor:
    """FracBits Eq. 3/8 on ``u`` in [0, 1]: ``rnd((2^k-1) u) / (2^k-1)`` for k >= 1 and 0.5 for
    k = 0, with a straight-through gradient (``dq/du := 1``). ``bits`` per kernel along ``axis``."""
    check_rounding(rounding)
    bits = check_bits(bits)
    k = along_axis(bits, u, axis, "bits").to(u.dtype)
    a = torch.pow(2.0, k) - 1
    a_safe = torch.where(a > 0, a, torch.ones_like(a))
    value = torch.where(a > 0, round_tensor(u.detach() * a_safe, rounding) / a_safe,
                        torch.full_like(a, 0.5))
    return straight_through(u, value)


def _check_lambda(lam: Tensor, name: str) -> None:
    if not lam.dtype.is_floating_point:
        raise NumericsError(f"{name} must be a floating-point tensor (a fractional bit-width)")
    if lam.dim() > 1:
        raise NumericsError(f"{name} must be 0-D or 1-D (one per kernel), got shape {tuple(lam.shape)}")
    if not is_compiling():
        d = lam.detach()
        if not bool(torch.isfinite(d).all()) or bool((d < 0).any()) or bool((d > MAX_BITS).any()):
            raise NumericsError(f"{name} must be finite and within 0..{MAX_BITS}")


def fracbits_interp(u: Tensor, lam: Tensor | float, *, min_bits: int | None = None,
                    max_bits: int | None = None, axis: int = 0, rounding: Rounding = "rne") -> Tensor:
    """FracBits Eq. 1: ``(1-f) q_lo(u) + f q_hi(u)`` with ``lo = floor(lam)``, ``f = lam - lo``.

    ``hi = lo + 1``, capped at ``max_bits`` when given (deliberate deviation from the official
    ``ceil``, docs/algorithms.md, "FracBits": at an integer lambda the forward is ``q_lam`` but the lambda-gradient
    ``q_hi - q_lo`` (Eq. 2) stays non-zero). ``lam`` is clamped to ``[min_bits, max_bits]`` first
    (zero gradient outside). ``lam`` may be a per-kernel vector along ``axis``; lo = 0 uses the 0-bit
    candidate ``q_0 = 0.5`` (Eq. 8). ``u`` gets a straight-through gradient.
    """
    lam_t = lam if isinstance(lam, Tensor) else torch.tensor(float(lam), device=u.device)
    if min_bits is not None or max_bits is not None:
        lam_t = torch.clamp(lam_t, min=min_bits, max=max_bits)
    _check_lambda(lam_t, "lam")
    lo = torch.floor(lam_t.detach())
    hi = lo + 1
    if max_bits is not None:
        hi = torch.clamp(hi, max=max_bits)
    lo_i, hi_i = lo.to(torch.int64), hi.to(torch.int64)
    if lo_i.dim() == 0:
        lo_arg, hi_arg = int(lo_i), int(hi_i)
    else:
        lo_arg, hi_arg = lo_i, hi_i
    q_lo = unit_quantize(u, lo_arg, axis=axis, rounding=rounding)
    q_hi = unit_quantize(u, hi_arg, axis=axis, rounding=rounding)
    f = along_axis(lam_t - lo, u, axis, "lam").to(u.dtype)
    return q_lo + f * (q_hi - q_lo)


def _is_fractional(bits: Bits | float) -> bool:
    return isinstance(bits, float) or (isinstance(bits, Tensor) and bits.dtype.is_floating_point)


def _unit_q(u: Tensor, bits: Bits | float | Tensor, max_bits: int | None, axis: int,
            rounding: Rounding) -> Tensor:
    if _is_fractional(bits):
        return fracbits_interp(u, bits, max_bits=max_bits, axis=axis,  # type: ignore[arg-type]
                               rounding=rounding)
    return unit_quantize(u, bits, axis=axis, rounding=rounding)  # type: ignore[arg-type]


def dorefa_normalize(w: Tensor) -> Tensor:
    """DoReFa map to [0, 1]: ``tanh(w) / (2 max|tanh(w)|) + 1/2``, max over the whole tensor
    (also in kernel-wise mode, as FracBits). An all-zero ``w`` maps to 0.5, not NaN."""
    t = torch.tanh(w)
    m = t.abs().max().clamp(min=torch.finfo(t.dtype).tiny)
    return t / (2 * m) + 0.5


def dorefa_weight(w: Tensor, bits: Bits | float | Tensor, *, max_bits: int | None = None,
                  axis: int = 0, rounding: Rounding = "rne") -> Tensor:
    """DoReFa/FracBits weights ``2 Q(dorefa_normalize(w)) - 1`` in [-1, 1].

    ``bits``: int, per-kernel integer tensor along ``axis``, or a floating-point lambda (scalar or
    per kernel) which uses ``fracbits_interp`` (``max_bits`` caps ``hi``). 0-bit kernels are exactly
    0. Gradients: straight-through for the quantizer, autograd through tanh/max.
    """
    return 2 * _unit_q(dorefa_normalize(w), bits, max_bits, axis, rounding) - 1


def pact(x: Tensor, alpha: Tensor, bits: Bits | float | Tensor, *, double_sided: bool = False,
         alpha_grad: Literal["pact", "fracbits"] = "pact", max_bits: int | None = None,
         axis: int = 0, rounding: Rounding = "rne") -> Tensor:
    """PACT activation quantization with a learnable clip ``alpha`` (``|alpha|`` is used).

    One-sided: ``u = min(relu(x), a) / a``, ``x_hat = a Q(u)``; double-sided:
    ``u = (clip(x, -a, a) / a + 1) / 2``, ``x_hat = a (2 Q(u) - 1)``. ``bits`` >= 1: int, or a
    floating lambda (``fracbits_interp``; ``axis``/``max_bits`` as there).

    ``alpha_grad="pact"`` (Choi et al. 2018): ``d x_hat / d alpha = sign(alpha)`` for clipped inputs
    (``-sign(alpha)`` below ``-a`` when double-sided) and 0 inside. ``"fracbits"``: autograd through the
    divisions as in the official FracBits code, ``sign(alpha) (Q(u) - u)`` inside (double-sided:
    ``sign(alpha) (2Q(u) - 1 - (2u - 1))``) and ``sign(alpha)`` / ``-sign(alpha)`` when clipped — use
    this one to reproduce FracBits. ``x`` gets 1 inside, 0 when clipped.
    """
    if alpha_grad not in ("pact", "fracbits"):
        raise NumericsError(f"alpha_grad={alpha_grad!r} is invalid; valid: 'pact', 'fracbits'")
    if not isinstance(alpha, Tensor):
        raise NumericsError("alpha must be a tensor (a learnable parameter)")
    if _is_fractional(bits):
        lam = bits if isinstance(bits, Tensor) else torch.tensor(float(bits))
        if not is_compiling() and bool((lam.detach() < 1).any()):
            raise NumericsError("PACT activations need a bit-width lambda >= 1 (0 bits is weights only)")
    else:
        b = check_bits(bits)  # type: ignore[arg-type]
        if (b < 1) if isinstance(b, int) else bool((b < 1).any()):
            raise NumericsError("PACT activations need bits >= 1 (0 bits is for weights only)")
    a = alpha.abs()
    if not is_compiling() and not bool((a.detach() > 0).all()):
        raise NumericsError("alpha must be non-zero")
    if double_sided:
        y = torch.maximum(torch.minimum(x, a), -a)
    else:
        y = torch.minimum(torch.relu(x), a)
    if alpha_grad == "fracbits":
        u = y / a
        if double_sided:
            return a * (2 * _unit_q((u + 1) / 2, bits, max_bits, axis, rounding) - 1)
        return a * _unit_q(u, bits, max_bits, axis, rounding)
    # Original PACT: the clipped value y carries both gradients (x inside, alpha when clipped); the
    # quantization residual is straight-through and only a fractional lambda's gradient is kept.
    a_d = a.detach()
    u_d = y.detach() / a_d
    if double_sided:
        qv = a_d * (2 * _unit_q((u_d + 1) / 2, bits, max_bits, axis, rounding) - 1)
    else:
        qv = a_d * _unit_q(u_d, bits, max_bits, axis, rounding)
    out = straight_through(y, qv)
    if qv.requires_grad:  # fractional lambda: add an exact zero that carries d/d lambda
        out = out + (qv - qv.detach())
    return out
