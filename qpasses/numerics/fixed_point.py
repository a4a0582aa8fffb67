"""Fixed-point requantization: multiplier/shift decomposition and named rounding contracts.

Pure tensor math (no torch.fx). Specification: docs/int-sim.md, "Integer arithmetic".

Conventions
-----------
* A positive real scale ``M`` is represented by an integer ``multiplier`` with ``multiplier_bits``
  fractional bits and a signed ``shift`` (TFLite convention, **positive = left shift**)::

      M ~= multiplier * 2**(shift - multiplier_bits)

  With the default 31 bits this is TFLite's ``QuantizeMultiplier`` (``multiplier`` in
  ``[2**30, 2**31)``); for ``M < 1`` the shift is ``<= 0`` and ``-shift`` is the right shift.
  HAWQ-V3's dyadic form ``M ~= b / 2**c`` (:func:`dyadic_multiplier`) maps to it with
  ``shift = multiplier_bits - c``.
* Every integer result is an ``int64`` tensor; the integer contracts never touch floating point.
  Accumulators must lie in the int32 range (checked): that bound is what keeps every int64
  intermediate below 2**63.
* Per-channel parameters are 1-D tensors of length ``acc.shape[axis]``; ``axis`` must be given for
  them (no silent broadcasting along the wrong dimension).

Rounding contracts (:data:`ROUNDING_CONTRACTS`)
-----------------------------------------------
``gemmlowp``   SaturatingRoundingDoublingHighMul (rhu), then RoundingDivideByPOT (rha): two
               roundings (TFLite's default).
``single``     ``rhu(acc * multiplier / 2**(bits - shift))``: TFLite's single-rounding variant.
``float-rne``  ``rne(float32(acc) * float32 scale)``: fbgemm / ONNX Runtime
               (:func:`requantize_float`).
``hawq``       ``rne(acc * multiplier / 2**(bits - shift))``: HAWQ-V3 dyadic, computed exactly in
               integers (HAWQ evaluates it in float64, which equals this while ``|acc*m| < 2**53``).
"""
from __future__ import annotations

import difflib
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.quant_utils import is_compiling

__all__ = [
    "INT32_MAX", "INT32_MIN", "INTEGER_CONTRACTS", "MAX_SHIFT", "MIN_SHIFT", "ROUNDING_CONTRACTS",
    "ROUND_SHIFT_MODES", "channel_view", "check_rounding_contract", "dyadic_multiplier",
    "fbgemm_scale",
    "fixed_point_reciprocal", "multiply_by_quantized_multiplier",
    "quantize_multiplier", "requantize", "requantize_float", "requantize_from_scale", "round_shift",
    "rounding_divide_by_pot", "saturating_rounding_doubling_high_mul",
]

INT32_MIN = -(2 ** 31)
INT32_MAX = 2 ** 31 - 1

ROUNDING_CONTRACTS: tuple[str, ...] = ("gemmlowp", "single", "float-rne", "hawq")
INTEGER_CONTRACTS: tuple[str, ...] = ("gemmlowp", "single", "hawq")
ROUND_SHIFT_MODES: tuple[str, ...] = ("rne", "rha", "rhu", "floor", "trunc")

# Shifts accepted by requantize. With |acc| <= 2**31 and multiplier <= 2**bits, the largest
# intermediate is |acc * multiplier * 2**(shift - bits)| <= 2**(31 + shift) <= 2**62 for
# shift <= 31, and a right shift of at most bits + 31 <= 62 keeps 2**(t-1) representable.
# quantize_multiplier never returns a shift below -31 (TFLite's flush to zero).
MIN_SHIFT = -31
MAX_SHIFT = 31

ScaleLike = float | Sequence[float] | Tensor
IntLike = int | Sequence[int] | Tensor


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------

def check_rounding_contract(rounding: str) -> str:
    """Return ``rounding`` if it names a contract; else raise NumericsError listing valid names."""
    if rounding in ROUNDING_CONTRACTS:
        return rounding
    close = difflib.get_close_matches(str(rounding), ROUNDING_CONTRACTS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise NumericsError(f"unknown rounding contract {rounding!r}{hint}; "
                        f"valid names: {', '.join(ROUNDING_CONTRACTS)}")


def _check_bits(multiplier_bits: int) -> int:
    if isinstance(multiplier_bits, bool) or not isinstance(multiplier_bits, numbers.Integral) \
            or not 2 <= multiplier_bits <= 31:
        raise NumericsError(f"multiplier_bits must be an int in 2..31, got {multiplier_bits!r}")
    return int(multiplier_bits)


def _as_scale(scale: ScaleLike, name: str = "scale") -> Tensor:
    """float64 tensor of finite, strictly positive scales."""
    # Python floats must become float64 directly: torch's default dtype (float32) would round them.
    t = scale if isinstance(scale, Tensor) else torch.as_tensor(scale, dtype=torch.float64)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise NumericsError(f"{name} must be real numbers, got dtype {t.dtype}")
    t = t.to(torch.float64)
    bad = ~(torch.isfinite(t) & (t > 0))
    if _traced_check(bad, f"{name} must be finite and > 0"):
        return t
    if bool(bad.any()):
        raise NumericsError(f"{name} must be finite and > 0; got {t[bad].flatten()[:4].tolist()}")
    return t


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _as_int64(x: IntLike, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dtype not in _INT_DTYPES:
        raise NumericsError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    return t.to(torch.int64)


def _traced_check(bad: Tensor, message: str) -> bool:
    """While tracing (torch.export / torch.compile): assert ``not bad.any()`` at run time in the
    traced program (no data-dependent Python branch) and return True; in eager mode return False
    (the caller raises its detailed NumericsError). docs/export.md, "torch.export"."""
    if not is_compiling():
        return False
    torch._assert_async(~bad.any(), message)
    return True


def _check_range(t: Tensor, lo: int, hi: int, name: str, why: str) -> None:
    bad = (t < lo) | (t > hi)
    if _traced_check(bad, f"{name} must lie in [{lo}, {hi}] ({why})"):
        return
    if bool(bad.any()):
        raise NumericsError(f"{name} must lie in [{lo}, {hi}] ({why}); "
                            f"got {t[bad].flatten()[:4].tolist()}")


def _as_acc(acc: IntLike) -> Tensor:
    t = _as_int64(acc, "acc")
    _check_range(t, INT32_MIN, INT32_MAX, "acc", "int32 accumulator")
    return t


def channel_view(param: Tensor, acc: Tensor, axis: int | None, name: str = "parameter") -> Tensor:
    """Place a per-channel 1-D parameter along ``axis`` of ``acc`` so that it broadcasts (a
    1-element parameter becomes a scalar; NumericsError for a missing axis or a size mismatch)."""
    if param.numel() == 1:
        return param.reshape(())
    if param.dim() == 1:
        if axis is None:
            raise NumericsError(f"{name} has {param.numel()} per-channel values; pass axis= to say "
                                f"which dimension of acc (shape {tuple(acc.shape)}) they index")
        if not -acc.dim() <= axis < acc.dim():
            raise NumericsError(f"axis={axis} is out of range for acc of shape {tuple(acc.shape)}")
        ax = axis % acc.dim()
        if acc.shape[ax] != param.numel():
            raise NumericsError(f"{name} has {param.numel()} values but acc.shape[{axis}] is "
                                f"{acc.shape[ax]}")
        shape = [1] * acc.dim()
        shape[ax] = param.numel()
        return param.reshape(shape)
    try:
        torch.broadcast_shapes(param.shape, acc.shape)
    except RuntimeError:
        raise NumericsError(f"{name} of shape {tuple(param.shape)} does not broadcast to acc "
                            f"of shape {tuple(acc.shape)}") from None
    return param


def _pow2(n: Tensor) -> Tensor:
    """2**n for an int64 tensor 0 <= n <= 62."""
    return torch.bitwise_left_shift(torch.ones_like(n), n)


# --------------------------------------------------------------------------------------------
# multiplier decomposition
# --------------------------------------------------------------------------------------------

def _round_half_up_nonneg(v: Tensor) -> Tensor:
    """rhu (== rha for v >= 0) of a float64 tensor, exactly: floor(v + 0.5) could round the sum."""
    fl = torch.floor(v)
    return (fl + (v - fl >= 0.5).to(v.dtype)).to(torch.int64)


def quantize_multiplier(scale: ScaleLike, multiplier_bits: int = 31) -> tuple[Tensor, Tensor]:
    """Decompose positive real scale(s) into ``(multiplier, shift)`` int64 tensors (TFLite).

    ``scale ~= multiplier * 2**(shift - multiplier_bits)``, shift positive = left shift.
    ``(f, e) = frexp(scale)``, ``multiplier = rha(f * 2**bits)``; if that rounds up to ``2**bits``
    it becomes ``2**(bits-1)`` with ``e + 1``. A shift below -31 (scale < 2**-32, where every int32
    accumulator requantizes to 0 anyway) flushes to ``(0, 0)`` as in TFLite. The relative error is
    at most ``2**-bits``. Scales must be finite and > 0 (NumericsError otherwise).
    """
    bits = _check_bits(multiplier_bits)
    s = _as_scale(scale)
    f, e = torch.frexp(s)                       # f in [0.5, 1); f * 2**bits is exact in float64
    m = _round_half_up_nonneg(f * float(2 ** bits))
    e = e.to(torch.int64)
    carry = m == 2 ** bits
    m = torch.where(carry, m >> 1, m)
    e = torch.where(carry, e + 1, e)
    flush = e < MIN_SHIFT
    zero = torch.zeros_like(m)
    return torch.where(flush, zero, m), torch.where(flush, zero, e)


def dyadic_multiplier(scale: ScaleLike, multiplier_bits: int = 31) -> tuple[Tensor, Tensor]:
    """HAWQ-V3's ``batch_frexp``: ``(b, c)`` int64 with ``scale ~= b / 2**c``.

    ``(f, e) = frexp(scale)``, ``b = rhu(f * 2**bits)``, ``c = bits - e``. Like HAWQ there is no
    renormalization (``b`` may equal ``2**bits``) and no flush of tiny scales. Use it with
    :func:`requantize` as ``multiplier=b, shift=bits - c``.
    """
    bits = _check_bits(multiplier_bits)
    f, e = torch.frexp(_as_scale(scale))
    return _round_half_up_nonneg(f * float(2 ** bits)), bits - e.to(torch.int64)


def fixed_point_reciprocal(n: IntLike, multiplier_bits: int = 31) -> tuple[Tensor, Tensor]:
    """``quantize_multiplier(1/n)`` computed exactly from the integer ``n`` (1 <= n < 2**31).

    Used for average pooling (divide a window sum by its size). Exact rational rounding of
    ``2**(bits+k-1) / n``, so it never suffers the double rounding of going through float64 ``1/n``.
    """
    bits = _check_bits(multiplier_bits)
    nt = _as_int64(n, "n")
    _check_range(nt, 1, INT32_MAX, "n", "a positive element count")
    # k = ceil(log2 n) = bit_length(n - 1); frexp of an exact float64 integer gives its bit length.
    k = torch.frexp((nt - 1).to(torch.float64)).exponent.to(torch.int64)
    # 1/n = f * 2**(1-k) with f = 2**(k-1)/n in (0.5, 1]; rha(f * 2**bits) = floor((2*A + n) / 2n)
    # with A = 2**(bits+k-1); 2**(bits+k) <= 2**62 fits int64.
    m = torch.div(_pow2(bits + k) + nt, 2 * nt, rounding_mode="floor")
    e = 1 - k
    carry = m == 2 ** bits
    return torch.where(carry, m >> 1, m), torch.where(carry, e + 1, e)


def fbgemm_scale(input_scale: ScaleLike, weight_scale: ScaleLike,
                 output_scale: ScaleLike) -> Tensor:
    """fbgemm's float32 requantization multiplier ``float32(float32(s_x*s_w) / float32(s_y))``.

    The operation order and float32 precision matter for bit-exactness with PyTorch.
    """
    sx = _as_scale(input_scale, "input_scale").to(torch.float32)
    sw = _as_scale(weight_scale, "weight_scale").to(torch.float32)
    sy = _as_scale(output_scale, "output_scale").to(torch.float32)
    return (sx * sw) / sy


# --------------------------------------------------------------------------------------------
# exact integer primitives
# --------------------------------------------------------------------------------------------

def round_shift(x: IntLike, shift: IntLike, mode: str = "rne") -> Tensor:
    """Round ``x / 2**shift`` exactly to an int64; a negative shift is an exact left shift.

    ``mode``: ``rne`` half to even, ``rha`` half away from zero, ``rhu`` half up (toward +inf),
    ``floor``, ``trunc``. ``|shift| <= 62``; a left shift that overflows int64 raises NumericsError.
    """
    if mode not in ROUND_SHIFT_MODES:
        raise NumericsError(f"unknown rounding mode {mode!r}; "
                            f"valid: {', '.join(ROUND_SHIFT_MODES)}")
    xt = _as_int64(x, "x")
    st = _as_int64(shift, "shift")
    _check_range(st, -62, 62, "shift", "int64 shift amount")
    rs = st.clamp(min=0)
    ls = (-st).clamp(min=0)
    xl = torch.bitwise_left_shift(xt, ls)
    over = torch.bitwise_right_shift(xl, ls) != xt
    if not _traced_check(over, "round_shift: x * 2**(-shift) overflows int64") and \
            bool(over.any()):
        raise NumericsError("round_shift: x * 2**(-shift) overflows int64")
    fl = torch.bitwise_right_shift(xl, rs)            # arithmetic shift = floor division
    rem = xl - torch.bitwise_left_shift(fl, rs)       # in [0, 2**rs)
    half = _pow2(rs) >> 1                             # 0 when rs == 0, so no rounding happens
    above = rem > half
    tie = (rem == half) & (rs > 0)
    if mode == "floor":
        up = torch.zeros_like(above)
    elif mode == "trunc":
        up = (rem > 0) & (xl < 0)
    elif mode == "rhu":
        up = above | tie
    elif mode == "rha":
        up = above | (tie & (xl >= 0))
    else:  # rne
        up = above | (tie & (fl % 2 != 0))
    return fl + up.to(torch.int64)


def saturating_rounding_doubling_high_mul(a: IntLike, b: IntLike) -> Tensor:
    """gemmlowp SRDHM on int32 values: ``floor((a*b + 2**30) / 2**31)``; ``(-2**31)**2 -> 2**31-1``.

    Computed in int64 (``|a*b| <= 2**62``). Equivalent to gemmlowp's nudge-and-truncate C form.
    """
    at = _as_int64(a, "a")
    bt = _as_int64(b, "b")
    _check_range(at, INT32_MIN, INT32_MAX, "a", "int32 operand")
    _check_range(bt, INT32_MIN, INT32_MAX, "b", "int32 operand")
    high = torch.bitwise_right_shift(at * bt + 2 ** 30, 31)
    # The only product whose rounded high half leaves int32 is INT32_MIN * INT32_MIN.
    overflow = (at == INT32_MIN) & (bt == INT32_MIN)
    return torch.where(overflow, torch.full_like(high, INT32_MAX), high)


def rounding_divide_by_pot(x: IntLike, exponent: IntLike) -> Tensor:
    """gemmlowp RoundingDivideByPOT: ``rha(x / 2**exponent)``, int32 ``x``, exponent in 0..31."""
    xt = _as_int64(x, "x")
    et = _as_int64(exponent, "exponent")
    _check_range(xt, INT32_MIN, INT32_MAX, "x", "int32 operand")
    _check_range(et, 0, 31, "exponent", "gemmlowp RoundingDivideByPOT")
    return round_shift(xt, et, "rha")


def multiply_by_quantized_multiplier(acc: IntLike, multiplier: IntLike, shift: IntLike,
                                     rounding: str = "gemmlowp", *, axis: int | None = None,
                                     multiplier_bits: int = 31) -> Tensor:
    """``acc * multiplier * 2**(shift - bits)`` rounded under an integer contract (no zp/clamp).

    ``gemmlowp``: ``RDBPOT(SRDHM(acc * 2**max(shift,0), m31), max(-shift,0))`` where ``m31`` is the
    multiplier widened to Q31 (exact for bits < 31); the left-shifted acc must fit int32 (checked,
    TFLite leaves it undefined). ``single``: one rhu. ``hawq``: one rne. Per-channel ``multiplier``
    / ``shift`` vectors lie along ``axis``. The multiplier must be in ``[0, 2**bits)`` for gemmlowp
    and ``[0, 2**bits]`` otherwise (HAWQ's ``b`` may equal ``2**bits``); shift in ``[-31, 31]``.
    """
    check_rounding_contract(rounding)
    if rounding == "float-rne":
        raise NumericsError("rounding 'float-rne' is defined by a float32 real scale, not an "
                            "integer multiplier; call requantize_float(acc, scale, ...) or "
                            "requantize_from_scale(..., rounding='float-rne')")
    bits = _check_bits(multiplier_bits)
    x = _as_acc(acc)
    m = _as_int64(multiplier, "multiplier")
    s = _as_int64(shift, "shift")
    m_hi = 2 ** bits - 1 if rounding == "gemmlowp" else 2 ** bits
    _check_range(m, 0, m_hi, "multiplier",
                 f"{bits}-bit fixed-point multiplier, contract {rounding!r}")
    _check_range(s, MIN_SHIFT, MAX_SHIFT, "shift", "keeps int64 intermediates exact")
    m = channel_view(m, x, axis, "multiplier")
    s = channel_view(s, x, axis, "shift")
    if rounding == "gemmlowp":
        left = s.clamp(min=0)
        xl = torch.bitwise_left_shift(x, left)
        over = (xl < INT32_MIN) | (xl > INT32_MAX)
        if not _traced_check(over, "gemmlowp: acc * 2**shift overflows int32") and \
                bool(over.any()):
            raise NumericsError("gemmlowp: acc * 2**shift overflows int32 for a left shift "
                                f"(max shift {int(left.max())}); use rounding='single' or "
                                "'hawq', or a smaller output scale ratio")
        high = saturating_rounding_doubling_high_mul(xl, m << (31 - bits))
        return round_shift(high, (-s).clamp(min=0), "rha")
    mode = "rhu" if rounding == "single" else "rne"
    return round_shift(x * m, bits - s, mode)


# --------------------------------------------------------------------------------------------
# requantization entry points
# --------------------------------------------------------------------------------------------

def _finish(y: Tensor, zero_point: IntLike, qmin: int, qmax: int, axis: int | None) -> Tensor:
    """Add the output zero point and clamp (a fused ReLU/ReLU6 is just a tighter [qmin, qmax])."""
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if isinstance(v, bool) or not isinstance(v, int) or not INT32_MIN <= v <= INT32_MAX:
            raise NumericsError(f"{name} must be an int in the int32 range, got {v!r}")
    if qmin > qmax:
        raise NumericsError(f"qmin ({qmin}) must be <= qmax ({qmax})")
    z = _as_int64(zero_point, "zero_point")
    _check_range(z, INT32_MIN, INT32_MAX, "zero_point", "int32 zero point")
    return (y + channel_view(z, y, axis, "zero_point")).clamp(qmin, qmax)


def requantize(acc: IntLike, multiplier: IntLike, shift: IntLike, zero_point: IntLike = 0,
               qmin: int = -128, qmax: int = 127, rounding: str = "gemmlowp", *,
               axis: int | None = None, multiplier_bits: int = 31) -> Tensor:
    """``clamp(contract(acc, multiplier, shift) + zero_point, qmin, qmax)`` as int64.

    Integer contracts only (``gemmlowp``, ``single``, ``hawq``); see
    :func:`multiply_by_quantized_multiplier`. ``float-rne`` needs the real scale: use
    :func:`requantize_float` or :func:`requantize_from_scale`.
    """
    y = multiply_by_quantized_multiplier(acc, multiplier, shift, rounding, axis=axis,
                                         multiplier_bits=multiplier_bits)
    return _finish(y, zero_point, qmin, qmax, axis)


def requantize_float(acc: IntLike, scale: ScaleLike, zero_point: IntLike = 0, qmin: int = -128,
                     qmax: int = 127, *, axis: int | None = None,
                     bias: Tensor | None = None) -> Tensor:
    """fbgemm ``float-rne``: ``clamp(rne(float32(acc) [+ bias] * scale) + zero_point, qmin, qmax)``.

    Everything is float32, as in fbgemm's ``ReQuantizeOutput``: the accumulator is converted to
    float32 (precision is lost above 2**24, deliberately), the scale is rounded to float32 (use
    :func:`fbgemm_scale` to build it in fbgemm's order) and ``torch.round`` is half-to-even like
    ``lrintf``. Computing in float64 would *not* match fbgemm. ``bias`` is fbgemm's float bias in
    accumulator units (``b / (s_x * s_w)`` computed in float32), per channel along ``axis``.
    """
    x = _as_acc(acc)
    sc = channel_view(_as_scale(scale).to(torch.float32), x, axis, "scale")
    xf = x.to(torch.float32)
    if bias is not None:
        b = torch.as_tensor(bias)
        if not b.is_floating_point():
            raise NumericsError(f"bias must be a float tensor, got dtype {b.dtype}")
        xf = xf + channel_view(b.to(torch.float32), x, axis, "bias")
    y = torch.round(xf * sc)
    # Clip before the int64 cast (huge scales); 2**40 is far outside any int32 qmin/qmax + zp range.
    y = y.clamp(-2.0 ** 40, 2.0 ** 40).to(torch.int64)
    return _finish(y, zero_point, qmin, qmax, axis)


def requantize_from_scale(acc: IntLike, scale: ScaleLike, zero_point: IntLike = 0,
                          qmin: int = -128, qmax: int = 127, rounding: str = "gemmlowp", *,
                          axis: int | None = None, multiplier_bits: int = 31) -> Tensor:
    """Requantize with a real scale under any contract in :data:`ROUNDING_CONTRACTS`.

    Integer contracts decompose the scale with :func:`quantize_multiplier` first (its flush of tiny
    scales changes no result: ``|acc * scale| < 1/2`` then); ``float-rne`` uses the float32 scale.
    """
    check_rounding_contract(rounding)
    if rounding == "float-rne":
        return requantize_float(acc, scale, zero_point, qmin, qmax, axis=axis)
    m, s = quantize_multiplier(scale, multiplier_bits)
    return requantize(acc, m, s, zero_point, qmin, qmax, rounding, axis=axis,
                      multiplier_bits=multiplier_bits)
