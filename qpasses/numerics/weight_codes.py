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

:func:`fake_quant_codes` gives the same result straight from the float weight where the weight
quantizer's own fast path defines the codes (no fake-quantized copy, no check to make).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from qpasses.numerics.int_ops import narrowest_int_dtype

__all__ = ["WeightCodes", "fake_quant_codes", "fake_quant_codes_bytes", "row_l1", "weight_codes",
           "weight_codes_reference"]

_F32_CODE_LIMIT = 2.0 ** 20     # |code − z| up to which the float32 shortcut is proven
_ROW_CHUNK = 1 << 22            # elements per chunk of row_l1's temporaries
_F32_EXACT = 2.0 ** 24           # integers below this add exactly in float32
_BLOCK_ELEMENTS = 1 << 18       # weights per block of the blocked shortcut (1 MiB of float32)


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


def _z_range(zero_point: Tensor | None) -> tuple[int, int]:
    """``(min, max)`` of the zero points ((0, 0) for none)."""
    if zero_point is None or not zero_point.numel():
        return 0, 0
    return int(zero_point.min()), int(zero_point.max())


def _codes_dtype(lo: int, hi: int, zmin: int, zmax: int) -> torch.dtype:
    """The narrowest dtype holding every centred code in ``[lo, hi]``, every zero point in
    ``[zmin, zmax]`` and every code ``centred + z`` (int8 for 8-bit codes with small zero
    points): the codes' dtype, without an int64 copy of the weight."""
    return narrowest_int_dtype(min(lo, lo + zmin, zmin), max(hi, hi + zmax, zmax))


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
    codes (int8 for 8-bit codes: 9 bytes per weight with ``w_hat``, at most 16). A contiguous
    weight goes through :func:`_weight_codes_blocked` (the same values, blocks of kernels: the
    codes plus two 1 MiB buffers)."""
    s32 = scale.to(torch.float32)
    fast = (w_hat.dtype == torch.float32 and bool(torch.isfinite(s32).all())
            and bool((s32 >= torch.finfo(torch.float32).tiny).all())   # normal: no FTZ doubt
            and bool((s32.to(scale.dtype) == scale).all()))
    if not fast:
        return weight_codes_reference(w_hat, scale, zero_point, tol)
    if w_hat.numel() and w_hat.is_contiguous():
        return _weight_codes_blocked(w_hat, scale, zero_point, tol, s32)
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
    lo_c, hi_c = int(lo_i), int(hi_i)
    codes = q.to(_codes_dtype(lo_c, hi_c, *_z_range(zero_point)))
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


def _weight_codes_blocked(w_hat: Tensor, scale: Tensor, zero_point: Tensor, tol: float | None,
                          s32: Tensor) -> WeightCodes:
    """:func:`weight_codes`' float32 shortcut over blocks of whole kernels (rows) with two
    reused block buffers, for a contiguous non-empty ``w_hat``: no weight-sized float32
    temporary (the quotient and the check of the one-shot version are 8 fresh bytes per weight,
    page-faulted in on every call). The same elementwise operations give the same values: pass 1
    checks every block (a wide code, NaN or off-grid weight anywhere: the definition decides, as
    before) and sums ``|code − z|`` per kernel exactly (float32 where every partial sum is an
    integer below 2^24, else float64, as the one-shot version does); pass 2 recomputes each block's codes into
    the narrowest dtype, known only once every block was seen."""
    c = w_hat.shape[0]
    flat = w_hat.view(c, -1)
    k = flat.shape[1]
    s_col = s32.reshape(c, 1)
    rows = max(1, _BLOCK_ELEMENTS // max(k, 1))
    buf_q = torch.empty(min(rows, c) * k, dtype=torch.float32)
    buf_b = torch.empty_like(buf_q)
    lo_i, hi_i = float("inf"), float("-inf")
    l1_parts = []
    for i in range(0, c, rows):
        blk, sc = flat[i:i + rows], s_col[i:i + rows]
        q = buf_q[:blk.numel()].view(blk.shape)
        torch.div(blk, sc, out=q)
        q.round_()
        lo, hi = q.aminmax()
        lo_b, hi_b = float(lo), float(hi)
        if not (abs(lo_b) <= _F32_CODE_LIMIT and abs(hi_b) <= _F32_CODE_LIMIT):
            return weight_codes_reference(w_hat, scale, zero_point, tol)   # NaN or wide
        back = buf_b[:blk.numel()].view(blk.shape)
        torch.mul(q, sc, out=back)
        if tol is not None:
            off = float(back.sub_(blk).abs_().amax()) > tol
        else:   # bit patterns equal (as in weight_codes)
            diff = back.view(torch.int32).bitwise_xor_(blk.view(torch.int32))
            lo_d, hi_d = diff.aminmax()
            off = bool(lo_d != 0) or bool(hi_d != 0)
        if off:
            return weight_codes_reference(w_hat, scale, zero_point, tol)
        lo_i, hi_i = min(lo_i, lo_b), max(hi_i, hi_b)
        # float32 where every partial sum is an integer below 2^24 (no float64 copy of the
        # block, which worker threads' arenas would keep resident), else float64
        acc = torch.float32 if k * max(-lo_b, hi_b) < _F32_EXACT else torch.float64
        l1_parts.append(q.abs_().sum(1, dtype=acc).to(torch.float64))
    l1 = (l1_parts[0] if len(l1_parts) == 1 else torch.cat(l1_parts)).to(torch.int64)
    lo_c, hi_c = int(lo_i), int(hi_i)
    codes = torch.empty(w_hat.shape, dtype=_codes_dtype(lo_c, hi_c, *_z_range(zero_point)))
    codes2 = codes.view(c, k)
    for i in range(0, c, rows):
        blk, sc = flat[i:i + rows], s_col[i:i + rows]
        q = buf_q[:blk.numel()].view(blk.shape)
        torch.div(blk, sc, out=q)
        q.round_()
        codes2[i:i + rows].copy_(q)
    if bool((zero_point != 0).any()):
        codes.add_(zero_point.to(codes.dtype).reshape(_shape(w_hat)))
    return WeightCodes(codes, 0, l1, lo_c, hi_c)


def _grid_codes_dtype(qmin: int, qmax: int, zmin: int, zmax: int) -> torch.dtype:
    """:func:`_codes_dtype` of the widest centred codes of the grid (int8 for 8-bit symmetric
    codes): :func:`fake_quant_codes` writes them in it, then narrows only when the codes turn
    out narrower than their grid."""
    return _codes_dtype(qmin - zmax, qmax - zmin, zmin, zmax)


def fake_quant_codes_bytes(qmin: int, qmax: int, zero_point: Tensor | None) -> int:
    """Bytes per weight :func:`fake_quant_codes` allocates at most: the codes in their grid's dtype,
    plus a narrower copy where one can follow (its blocks and per-kernel sums aside)."""
    size = _grid_codes_dtype(qmin, qmax, *_z_range(zero_point)).itemsize
    return size + size // 2


def fake_quant_codes(w: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int,
                     qmax: int) -> WeightCodes | None:
    """The codes the fake quantizer's fast path puts ``w`` on, with :func:`weight_codes`' L1 norms
    and range, computed from ``w`` itself: no fake-quantized copy of the weight and no grid check.

    ``fast_fake_quant(w, scale, zero_point, qmin, qmax, axis=0)`` returns ``w_hat = (q − z) ⊗ s``
    (one float32 product) with ``q = clamp(rne(w ⊗ (1 ⊘ s)) + z, qmin, qmax)`` per output channel.
    That ``w_hat`` passes :func:`weight_codes`' check by construction (the check recomputes the
    same product), and its float32 quotient ``w_hat ⊘ s = (q − z)·(1 + δ)``, ``|δ| <= 2^-23``,
    rounds back to ``q − z`` for ``|q − z| <= 2^17``. So ``weight_codes(w_hat, s, z)`` returns
    these very codes (dtype included: the same narrowest dtype rule), L1 norms and range. Over
    blocks of whole kernels, like :func:`weight_codes`. None where that argument or
    :func:`weight_codes`' own shortcut does not apply (an empty or non-contiguous weight, a scale
    that is not a finite normal float32 value, a range beyond 2^16, a NaN weight): the caller
    fake-quantizes and checks the long way.
    """
    c = w.shape[0] if w.dim() else 0
    if (w.dtype != torch.float32 or not w.numel() or not w.is_contiguous() or scale.numel() != c
            or max(abs(qmin), abs(qmax)) > 2 ** 16 or qmin > qmax):
        return None
    s32 = scale.detach().to(torch.float32).reshape(c, 1)
    if not (bool(torch.isfinite(s32).all())
            and bool((s32 >= torch.finfo(torch.float32).tiny).all())
            and bool((s32.to(scale.dtype) == scale.reshape(c, 1)).all())):
        return None
    inv = 1.0 / s32                                  # fast_fake_quant's float32 reciprocal
    z = None
    if zero_point is not None and bool((zero_point != 0).any()):
        z = zero_point.detach().reshape(c, 1).to(torch.float32)
    flat = w.view(c, -1)
    k = flat.shape[1]
    zmin, zmax = _z_range(zero_point)
    # Σ|q − z| per kernel: float32 where every partial sum is an integer below 2^24
    absmax = max(abs(q - zz) for q in (qmin, qmax) for zz in (zmin, zmax))
    acc = torch.float32 if k * absmax < _F32_EXACT else torch.float64
    rows = max(1, _BLOCK_ELEMENTS // max(k, 1))
    buf = torch.empty(min(rows, c) * k, dtype=torch.float32)
    wide = torch.empty((c, k), dtype=_grid_codes_dtype(qmin, qmax, zmin, zmax))
    lo_i, hi_i = float("inf"), float("-inf")
    l1_parts = []
    for i in range(0, c, rows):
        blk = flat[i:i + rows]
        r = buf[:blk.numel()].view(blk.shape)
        torch.mul(blk, inv[i:i + rows], out=r).round_()
        if z is not None:
            r.add_(z[i:i + rows])
        r.clamp_(qmin, qmax)
        wide[i:i + rows].copy_(r)                    # a NaN's garbage code is never returned
        if z is not None:
            r.sub_(z[i:i + rows])
        lo, hi = r.aminmax()
        lo_b, hi_b = float(lo), float(hi)
        if lo_b != lo_b or hi_b != hi_b:             # NaN
            return None
        lo_i, hi_i = min(lo_i, lo_b), max(hi_i, hi_b)
        l1_parts.append(r.abs_().sum(1, dtype=acc))
    l1 = (l1_parts[0] if len(l1_parts) == 1 else torch.cat(l1_parts)).to(torch.int64)
    lo_c, hi_c = int(lo_i), int(hi_i)
    dtype = _codes_dtype(lo_c, hi_c, zmin, zmax)
    codes = wide.view(w.shape)
    return WeightCodes(codes if codes.dtype == dtype else codes.to(dtype), 0, l1, lo_c, hi_c)
