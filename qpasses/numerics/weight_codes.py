"""Integer weight codes of a fake-quantized weight, checked to lie on the grid, with the per-kernel
L1 norms the accumulator bound needs — in one pass over the weight and with temporaries of a few
bytes per weight (never a float64 copy of the whole tensor).

Pure tensor math. The definition (:func:`weight_codes_reference`, float64 throughout) is
``code = rne(w_hat / s) + z`` and the check ``float32((code − z)·s) == w_hat`` (or, with a
tolerance, ``|float32((code − z)·s) − w_hat| <= tol``). :func:`weight_codes` computes the same codes
in float32 and falls back to the definition whenever its shortcut does not provably apply:

- ``float32((code − z)·s)`` equals the float32 product ``(code − z) ⊗ s`` when ``s`` is a float32
  value and ``|code − z| < 2^24``: both are the correctly rounded exact product (a 24-bit integer
  times a 24-bit mantissa is exact in float64);
- when that check passes for the float32 quotient's codes ``c``, ``w_hat = c·s·(1 + δ)`` with
  ``|δ| <= 2^-24`` (or ``|w_hat − c·s| <= tol`` with ``tol/s`` far below 1/2), so the float64
  quotient rounds to the same ``c`` for ``|c| <= 2^20``: the codes are those of the definition;
- when it fails (or a code is larger, or ``s`` is not a float32 value) the definition decides,
  codes, count of off-grid weights and all.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from qpasses.numerics.int_ops import narrowest_int_dtype

__all__ = ["WeightCodes", "row_l1", "weight_codes", "weight_codes_reference"]

_F32_CODE_LIMIT = 2.0 ** 20     # |code − z| up to which the float32 shortcut is proven
_ROW_CHUNK = 1 << 22            # elements per chunk of row_l1's temporaries
_F32_EXACT = 2.0 ** 24           # integers below this add exactly in float32


class WeightCodes(NamedTuple):
    """``codes``: the weight's shape, int64 from :func:`weight_codes_reference`, from
    :func:`weight_codes` a signed dtype that holds every code and zero point (int8 for 8-bit codes
    with small zero points; the same integers) (None when ``num_off`` > 0); ``num_off``: weights not
    on the grid; ``l1``: int64 (C,) per-kernel ``Σ|code − z|``; ``lo``/``hi``: min/max of
    ``code − z`` (0, 0 for an empty weight)."""
    codes: Tensor | None
    num_off: int
    l1: Tensor
    lo: int
    hi: int


def row_l1(centered: Tensor, absmax: float | None = None) -> Tensor:
    """Per-row (dim 0) ``Σ|v|`` of an integer-valued tensor, exact, as int64 (C,); temporaries are
    bounded by chunks of rows. Float inputs are summed in float32 when ``absmax`` (a bound on
    ``|v|``) proves every partial sum an integer below 2^24, else in float64 (exact below 2^53)."""
    c = centered.shape[0]
    if not centered.numel():
        return torch.zeros(c, dtype=torch.int64)
    flat = centered.reshape(c, -1)
    k = flat.shape[1]
    if not flat.dtype.is_floating_point:
        acc = torch.int64
    elif absmax is not None and k * absmax < _F32_EXACT:
        acc = torch.float32
    else:
        acc = torch.float64
    step = max(1, _ROW_CHUNK // max(k, 1))
    parts = [flat[i:i + step].abs().sum(1, dtype=acc) for i in range(0, c, step)]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.int64)


def _shape(w: Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (w.dim() - 1)


def weight_codes_reference(w_hat: Tensor, scale: Tensor, zero_point: Tensor,
                           tol: float | None = None) -> WeightCodes:
    """The definition, in float64: per-output-channel ``scale`` (float64, (C,)) and
    ``zero_point`` (int64, (C,)); ``tol`` None = exact grid check."""
    shape = _shape(w_hat)
    s, z = scale.reshape(shape), zero_point.reshape(shape)
    centered = torch.round(w_hat.double() / s).to(torch.int64)
    back = (centered.to(torch.float64) * s).to(torch.float32)
    w32 = w_hat.to(torch.float32)
    off = (back - w32).abs() > tol if tol is not None else back != w32
    del back
    num_off = int(off.sum())
    del off
    lo, hi = (int(centered.min()), int(centered.max())) if centered.numel() else (0, 0)
    l1 = row_l1(centered)
    return WeightCodes(centered + z if not num_off else None, num_off, l1, lo, hi)


def weight_codes(w_hat: Tensor, scale: Tensor, zero_point: Tensor,
                 tol: float | None = None) -> WeightCodes:
    """:func:`weight_codes_reference`'s result, computed in float32 where that is provably the same
    (module docstring); peak: the float32 quotient and a float32 check, then the quotient and the
    codes (int8 for 8-bit codes: 9 bytes per weight with ``w_hat``, at most 16)."""
    s32 = scale.to(torch.float32)
    fast = (w_hat.dtype == torch.float32 and bool(torch.isfinite(s32).all())
            and bool((s32 >= torch.finfo(torch.float32).tiny).all())   # normal: no FTZ doubt
            and bool((s32.to(scale.dtype) == scale).all()))
    if not fast:
        return weight_codes_reference(w_hat, scale, zero_point, tol)
    shape = _shape(w_hat)
    s = s32.reshape(shape)
    q = torch.div(w_hat, s)
    q.round_()
    if q.numel():
        lo, hi = q.aminmax()
        lo_i, hi_i = float(lo), float(hi)
        if not (abs(lo_i) <= _F32_CODE_LIMIT and abs(hi_i) <= _F32_CODE_LIMIT):
            del q               # NaN (aminmax propagates it) or a wide code: the definition
            return weight_codes_reference(w_hat, scale, zero_point, tol)
    else:
        lo_i = hi_i = 0.0
    back = torch.mul(q, s)
    if tol is not None:
        off = float(back.sub_(w_hat).abs_().amax()) > tol if back.numel() else False
    else:
        # bit patterns equal (stricter than ==: -0.0 vs 0.0 falls back to the definition);
        # an integer aminmax is far faster than a bool mask's any() on CPU
        diff = back.view(torch.int32).bitwise_xor_(w_hat.view(torch.int32))
        lo_d, hi_d = diff.aminmax() if diff.numel() else (torch.tensor(0), torch.tensor(0))
        off = bool(lo_d != 0) or bool(hi_d != 0)
    del back
    if off:
        del q
        return weight_codes_reference(w_hat, scale, zero_point, tol)
    # codes in a dtype holding every centred code, zero point and code (int8 for 8-bit codes
    # with small zero points): no int64 copy of the weight
    zmin, zmax = (int(zero_point.min()), int(zero_point.max())) if zero_point.numel() else (0, 0)
    lo_c, hi_c = int(lo_i), int(hi_i)
    codes = q.to(narrowest_int_dtype(min(lo_c, lo_c + zmin, zmin), max(hi_c, hi_c + zmax, zmax)))
    absmax = max(abs(lo_i), abs(hi_i))
    if q.numel():
        flat = q.reshape(q.shape[0], -1)
        # Σ|q| per kernel on q itself (no temporary): float32 where every partial sum is an
        # integer below 2^24, else float64
        acc = torch.float32 if flat.shape[1] * absmax < _F32_EXACT else torch.float64
        l1 = flat.abs_().sum(1, dtype=acc).to(torch.int64)
        del flat
    else:
        l1 = torch.zeros(q.shape[0], dtype=torch.int64)
    del q
    if bool((zero_point != 0).any()):
        codes.add_(zero_point.to(codes.dtype).reshape(shape))
    return WeightCodes(codes, 0, l1, int(lo_i), int(hi_i))
