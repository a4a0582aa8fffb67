"""Integer LayerNorm over the trailing ``N`` values of integer codes (docs/int-sim.md,
"Transformer kernels"). Pure tensor math, no graph code.

Input codes ``q`` (grid ``(s, z)``, centred ``x = q − z``, ``|x| <= X``), ``k`` fractional bits of
the mean, ``E = rne(eps·4^k / s²)`` (eps in code units), per-position integer gain ``g_j`` and
bias ``b_j`` with ``R`` fractional bits (:func:`layer_norm_constants`):

    μ   = rhu(Σ x · 2^k / N)                      mean with k fractional bits
    c_i = x_i·2^k − μ                             |c_i| <= D·2^k (D = span of the codes)
    T   = Σ c_i² + N·E                            (T >= 1 enforced), T < 2^62
    u   = (62 − bitlen(T)) div 2                  so that 2^60 <= T·4^u < 2^62
    r   = isqrt(T·4^u)                            exact integer square root, in [2^30, 2^31)
    inv = rhu(2^61 / r)                           fixed-point reciprocal, <= 2^31
    n_i = rhu(c_i·2^u·inv / 2^31)                 ≈ 2^30·c_i/√T, |n_i| <= 2^30 + 1
    y_i = clamp(z_y + rnd((n_i·g_j + b_j) / 2^R), qmin, qmax)

with ``g_j = rne(γ_j·√N·2^(R−30) / s_y)``, ``b_j = rne(β_j·2^R / s_y)`` (``(x−μ)/σ = c·√N/√T``)
and ``rnd`` the rounding of the contract: half away from zero (gemmlowp), half up (single), half
to even (hawq, float-rne). int64 safety: ``|Σ x·2^(k+1)| <= N·X·2^(k+1)``, ``T < 2^62`` is how
``k`` is chosen, ``|c_i·2^u| <= r < 2^31`` and ``inv <= 2^31`` keep the product below 2^62, and
``R`` is chosen so that ``(2^30 + 1)·max|g| + max|b| + 2^R < 2^62``.

``center=False`` is the L2 normalization ``x / max(‖x‖₂, eps)`` (``F.normalize``) with the same
steps: no mean (``c_i = x_i·2^k``), ``E = rne(eps²·4^k / s²)`` and ``T = max(Σ c_i², E)`` (the
``max`` of the squared norms), ``g = rne(2^(R−30) / s_y)``, ``b = 0``. Bound:
``Σ c_i² <= N·X²·4^k < 2^62`` is how ``k`` is chosen, and ``c_i² <= T`` still gives
``|c_i·2^u| <= r``.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.fixed_point import round_shift

__all__ = ["CONTRACT_ROUND", "LayerNormConstants", "int_layer_norm_fast",
           "int_layer_norm_reference", "isqrt", "layer_norm_constants", "normalized_fast",
           "normalized_reference", "round_shift_fast"]

_I64 = torch.int64
NORM_BITS = 30                       # fractional bits of n_i
_T_LIMIT = 2 ** 62

# rounding of the final (n·g + b)/2^R by contract
CONTRACT_ROUND = {"gemmlowp": "rha", "single": "rhu", "hawq": "rne", "float-rne": "rne"}


class LayerNormConstants:
    """The integer constants of one LayerNorm (see the module docstring)."""

    def __init__(self, n: int, frac_bits: int, eps_codes: int, gain: Tensor, bias: Tensor,
                 out_frac_bits: int, center: bool = True) -> None:
        self.n, self.frac_bits, self.eps_codes = int(n), int(frac_bits), int(eps_codes)
        self.gain, self.bias = gain.to(_I64), bias.to(_I64)
        self.out_frac_bits = int(out_frac_bits)
        self.center = bool(center)


def layer_norm_constants(n: int, span: int, max_abs: int, in_scale: float, eps: float,
                         gamma: Tensor | None, beta: Tensor | None, out_scale: float,
                         max_frac_bits: int = 16, center: bool = True) -> LayerNormConstants:
    """Choose ``k`` (the largest <= ``max_frac_bits`` with ``T < 2^62`` for every input), ``E``,
    ``R``, ``g`` and ``b``; NumericsError when even ``k = 0`` or ``R = 0`` cannot be proven safe.
    ``center=False``: the L2 normalization (no mean, ``eps`` bounds the norm, no affine)."""
    if n < 1:
        raise NumericsError("int layer norm: empty normalized shape")
    if not (in_scale > 0 and out_scale > 0):
        raise NumericsError("int layer norm: scales must be > 0")
    if not center and (gamma is not None or beta is not None):
        raise NumericsError("int l2 normalize: has no affine parameters")
    k_found = None
    for k in range(max_frac_bits, -1, -1):
        if not center:                      # T = max(Σc², E) with |c| <= X·2^k
            e_codes = round(eps * eps * 4.0 ** k / (in_scale * in_scale))
            if n * (max_abs << k) ** 2 < _T_LIMIT and e_codes < _T_LIMIT:
                k_found, e_found = k, int(e_codes)
                break
            continue
        e_codes = round(eps * 4.0 ** k / (in_scale * in_scale))
        if n * max_abs * 2 ** (k + 2) >= 2 ** 62:
            continue
        if n * ((span << k) ** 2 + e_codes) < _T_LIMIT:
            k_found, e_found = k, int(e_codes)
            break
    if k_found is None:
        raise NumericsError(f"int layer norm: {n} values spanning {span} codes with eps/s² = "
                            f"{eps / in_scale ** 2:.3g} leave int64")
    g_real = (torch.ones(n, dtype=torch.float64) if gamma is None
              else gamma.detach().double().reshape(-1)) * (math.sqrt(n) if center else 1.0) \
        / out_scale
    b_real = (torch.zeros(n, dtype=torch.float64) if beta is None
              else beta.detach().double().reshape(-1)) / out_scale
    if g_real.numel() != n or b_real.numel() != n or not bool(torch.isfinite(g_real).all()) \
            or not bool(torch.isfinite(b_real).all()):
        raise NumericsError(f"int layer norm: affine parameters must be {n} finite values")
    g_max, b_max = float(g_real.abs().max()), float(b_real.abs().max())
    for r in range(62, -1, -1):
        # float pre-check (no int64 overflow in the casts below), then the exact integer one
        if (2.0 ** NORM_BITS + 1) * g_max * 2.0 ** (r - NORM_BITS) + b_max * 2.0 ** r + \
                2.0 ** r >= 2.0 ** 61:
            continue
        g = torch.round(torch.ldexp(g_real, torch.tensor(r - NORM_BITS))).to(_I64)
        b = torch.round(torch.ldexp(b_real, torch.tensor(r))).to(_I64)
        if (2 ** NORM_BITS + 1) * int(g.abs().max()) + int(b.abs().max()) + 2 ** r < 2 ** 62:
            return LayerNormConstants(n, k_found, e_found, g, b, r, center)
    raise NumericsError("int layer norm: gain or bias too large for int64")


def isqrt(x: Tensor) -> Tensor:
    """Exact ``floor(√x)`` of non-negative int64 values below 2^62 (float64 estimate, then
    integer corrections)."""
    r = torch.sqrt(x.to(torch.float64)).floor().to(_I64)
    for _ in range(2):
        r = torch.where(r * r > x, r - 1, r)
        r = torch.where((r + 1) * (r + 1) <= x, r + 1, r)
    return r


def _bit_length(t: Tensor) -> Tensor:
    """Exact bit length of positive int64 values (float64 exponent, corrected downwards)."""
    b = torch.frexp(t.to(torch.float64)).exponent.to(_I64)
    return torch.where((t >> (b - 1)) == 0, b - 1, b)


def _flatten_last(x: Tensor, n_dims: int) -> Tensor:
    return x.reshape(*x.shape[:x.dim() - n_dims], -1)


def normalized_fast(x: Tensor, c: LayerNormConstants) -> Tensor:
    """``n_i`` of centred codes ``x`` (int64, last dim = the N normalized values)."""
    n, k = c.n, c.frac_bits
    if c.center:
        mu = torch.div((x.sum(-1, keepdim=True) << (k + 1)) + n, 2 * n, rounding_mode="floor")
        cx = (x << k) - mu
        t = (cx * cx).sum(-1, keepdim=True) + n * c.eps_codes
        t = t.clamp_(min=1)
    else:
        cx = x << k
        t = (cx * cx).sum(-1, keepdim=True).clamp_(min=max(c.eps_codes, 1))
    u = (62 - _bit_length(t)) >> 1
    r = isqrt(t << (2 * u))
    inv = torch.div((1 << 62) + r, 2 * r, rounding_mode="floor")
    return ((cx << u) * inv + (1 << 30)) >> 31


def int_layer_norm_fast(q: Tensor, n_dims: int, in_zero_point: int, c: LayerNormConstants,
                        out_zero_point: int, qmin: int, qmax: int, rounding: str) -> Tensor:
    """Integer LayerNorm of codes ``q`` over the last ``n_dims`` dims (int64 result)."""
    shape = q.shape
    x = _flatten_last(q.to(_I64), n_dims)
    if in_zero_point:
        x = x - in_zero_point
    nv = normalized_fast(x, c)
    acc = nv * c.gain.to(q.device) + c.bias.to(q.device)
    y = round_shift_fast(acc, c.out_frac_bits, CONTRACT_ROUND[rounding])
    return (y + out_zero_point).clamp_(qmin, qmax).reshape(shape)


def round_shift_fast(acc: Tensor, r: int, mode: str) -> Tensor:
    """``rnd(acc / 2^r)`` as one floor shift: ``floor((acc + 2^(r−1) − 1 + adj) / 2^r)`` with
    ``adj`` = 1 (half up), ``[acc >= 0]`` (half away from zero) or the quotient's parity (half
    to even): the tie goes up exactly when ``adj`` is 1."""
    if r == 0:
        return acc
    if mode == "rhu":
        return (acc + (1 << (r - 1))) >> r
    if mode == "rha":
        adj = (acc >= 0).to(_I64)
    else:
        adj = (acc >> r) & 1
    return (acc + adj + ((1 << (r - 1)) - 1)) >> r


def int_layer_norm_reference(q: Tensor, n_dims: int, in_zero_point: int, c: LayerNormConstants,
                             out_zero_point: int, qmin: int, qmax: int, rounding: str) -> Tensor:
    """The same contract in int64 (:func:`normalized_reference`), the final rounding by
    :func:`~qpasses.numerics.fixed_point.round_shift`."""
    if q.dtype.is_floating_point:
        raise NumericsError(f"int layer norm: codes must be integers, got {q.dtype}")
    x = _flatten_last(q.to(_I64), n_dims) - int(in_zero_point)
    nv = normalized_reference(x, c)
    acc = nv * c.gain.to(q.device) + c.bias.to(q.device)
    y = round_shift(acc, c.out_frac_bits, CONTRACT_ROUND[rounding])
    return torch.clamp(y + int(out_zero_point), qmin, qmax).reshape(q.shape)


def normalized_reference(x: Tensor, c: LayerNormConstants) -> Tensor:
    """:func:`normalized_fast` step by step with every bound checked, the square root by bisection
    on integers (independent of the float estimate of :func:`isqrt`)."""
    n, k = c.n, c.frac_bits
    if x.shape[-1] != n:
        raise NumericsError(f"int layer norm: normalizing {x.shape[-1]} values, built for {n}")
    total = x.sum(-1, keepdim=True)
    if c.center:
        if total.numel() and int(total.abs().max()) * 2 ** (k + 2) >= 2 ** 62:
            raise NumericsError("int layer norm: the sum leaves int64")
        mu = (total * 2 ** (k + 1) + n) // (2 * n)
        cx = x * 2 ** k - mu
        t = (cx * cx).sum(-1, keepdim=True) + n * c.eps_codes
    else:                                                  # L2: T = max(Σc², E)
        cx = x * 2 ** k
        if cx.numel() and int(cx.abs().max()) >= 2 ** 31:
            raise NumericsError("int l2 normalize: scaled code beyond 2^31")
        t = torch.maximum((cx * cx).sum(-1, keepdim=True),
                          torch.full_like(total, c.eps_codes))
    if t.numel() and int(t.max()) >= _T_LIMIT:
        raise NumericsError("int layer norm: Σc² + N·E reached 2^62")
    t = torch.maximum(t, torch.ones_like(t))
    bl = torch.zeros_like(t)
    for i in range(63):                                    # bit length by comparison
        bl += (t >= (1 << i)).to(_I64)
    u = (62 - bl) // 2
    big = t * torch.pow(torch.full_like(u, 4), u)
    lo, hi = torch.full_like(big, 1 << 30), torch.full_like(big, 1 << 31)
    for _ in range(32):                                    # largest r with r² <= big
        mid = (lo + hi) // 2
        ok = mid * mid <= big
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    r = lo
    if r.numel() and (int(r.min()) < 2 ** 30 or int(r.max()) >= 2 ** 31):
        raise NumericsError("int layer norm: square root outside [2^30, 2^31)")
    inv = (2 ** 62 + r) // (2 * r)
    nv = (cx * torch.pow(torch.full_like(u, 2), u) * inv + 2 ** 30) // 2 ** 31
    if nv.numel() and int(nv.abs().max()) > 2 ** 30 + 1:
        raise NumericsError("int layer norm: normalized value beyond 2^30 + 1")
    return nv

