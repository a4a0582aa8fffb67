"""What the quantizers share: scheme and rounding names, argument checks, broadcasting along a
channel axis, and the straight-through estimator.

Pure tensor code used by :mod:`qpasses.numerics.quantizers` and :mod:`qpasses.numerics.observers`.
"""
from __future__ import annotations

import numbers
from typing import Literal, Union

import torch
from torch import Tensor

from qpasses.errors import NumericsError

__all__ = ["Bits", "MAX_BITS", "ROUNDING_MODES", "Rounding", "SCHEMES", "Scheme", "along_axis",
           "check_bits", "check_rounding", "check_scheme", "is_compiling", "normalize_axis",
           "reduce_to", "scalar_or_tensor", "straight_through"]

Rounding = Literal["rne", "rha", "rhu", "trunc", "floor"]
Scheme = Literal["symmetric", "asymmetric", "asymmetric_signed", "unsigned"]
Bits = Union[int, Tensor]

ROUNDING_MODES: tuple[str, ...] = ("rne", "rha", "rhu", "trunc", "floor")
# symmetric: signed range, z = 0. asymmetric: unsigned range [0, 2^b-1] with an integral zero point
# (PyTorch quint8 / Distiller ASYMMETRIC_UNSIGNED). asymmetric_signed: signed range with a zero point
# (Distiller ASYMMETRIC_SIGNED). unsigned: [0, 2^b-1] with z = 0 (non-negative data, e.g. post-ReLU).
SCHEMES: tuple[str, ...] = ("symmetric", "asymmetric", "asymmetric_signed", "unsigned")
MAX_BITS = 32


# --------------------------------------------------------------------------------------------------
# validation and broadcasting
# --------------------------------------------------------------------------------------------------

def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDING_MODES:
        raise NumericsError(f"unknown rounding mode {rounding!r}; valid: {', '.join(ROUNDING_MODES)}")


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise NumericsError(f"unknown quantization scheme {scheme!r}; valid: {', '.join(SCHEMES)}")


def check_bits(bits: Bits, name: str = "bits") -> Bits:
    """Validate an int or 1-D integer tensor of bit-widths in 0..32; returns int or int64 tensor."""
    if isinstance(bits, bool):
        raise NumericsError(f"{name} must be an int or a 1-D integer tensor, got a bool")
    if isinstance(bits, numbers.Integral):  # int, numpy integers
        if not 0 <= int(bits) <= MAX_BITS:
            raise NumericsError(f"{name}={bits} is outside the valid range 0..{MAX_BITS}")
        return int(bits)
    if isinstance(bits, Tensor):
        if bits.dtype.is_floating_point or bits.dtype.is_complex or bits.dtype == torch.bool:
            raise NumericsError(
                f"{name} must be an integer tensor, got dtype {bits.dtype}; fractional bit-widths "
                "go through fracbits_interp (or pass a floating lambda to dorefa_weight/pact)")
        if bits.dim() > 1:
            raise NumericsError(f"{name} must be 0-D or 1-D (one entry per channel), got shape "
                                f"{tuple(bits.shape)}")
        if bits.numel() == 0:
            raise NumericsError(f"{name} is an empty tensor; give one bit-width per channel")
        if not is_compiling():
            lo, hi = int(bits.min()), int(bits.max())
            if lo < 0 or hi > MAX_BITS:
                raise NumericsError(f"{name} has entries outside the valid range 0..{MAX_BITS} "
                                    f"(min {lo}, max {hi})")
        return bits.to(torch.int64)
    raise NumericsError(f"{name} must be an int or a 1-D integer tensor, got {type(bits).__name__}")


def normalize_axis(axis: int, ndim: int, name: str = "axis") -> int:
    if ndim == 0:
        raise NumericsError(f"per-channel {name}={axis} needs a tensor with at least one dimension")
    if not -ndim <= axis < ndim:
        raise NumericsError(f"{name}={axis} is out of range for a {ndim}-D tensor")
    return axis % ndim


def along_axis(t: Tensor | float | int, x: Tensor, axis: int, name: str) -> Tensor:
    """Broadcast a scalar / 1-element / per-channel 1-D tensor against ``x`` along ``axis``."""
    if not isinstance(t, Tensor):
        return torch.as_tensor(t, device=x.device)
    if t.numel() == 1:
        return t.reshape(())
    if t.dim() != 1:
        raise NumericsError(f"{name} must be a scalar or a 1-D per-channel tensor, got shape "
                            f"{tuple(t.shape)}")
    ax = normalize_axis(axis, x.dim())
    if t.shape[0] != x.shape[ax]:
        raise NumericsError(f"{name} has {t.shape[0]} entries but the tensor has {x.shape[ax]} "
                            f"channels along axis {axis}; give one entry per channel")
    shape = [1] * x.dim()
    shape[ax] = t.shape[0]
    return t.reshape(shape)


def scalar_or_tensor(v: Tensor | float | int, like: Tensor) -> Tensor:
    return v if isinstance(v, Tensor) else torch.as_tensor(v, device=like.device)


# --------------------------------------------------------------------------------------------------
# straight-through autograd primitives
# --------------------------------------------------------------------------------------------------

class _MaskedStraightThrough(torch.autograd.Function):
    """Forward returns ``value`` exactly; backward passes the gradient to ``src`` where ``mask``.

    An autograd.Function instead of ``src + (value - src).detach()`` because that trick is off by an
    ulp (the output would not be exactly on the grid) and gives NaN for infinite inputs.
    """

    @staticmethod
    def forward(ctx, src: Tensor, value: Tensor,  # type: ignore[override]
                mask: Tensor | None) -> Tensor:
        ctx.save_for_backward(mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        if ctx.has_mask:
            grad = torch.where(mask, grad, torch.zeros_like(grad))
        return grad, None, None


def straight_through(src: Tensor, value: Tensor, mask: Tensor | None = None) -> Tensor:
    if value.shape != src.shape:
        value = value.expand(src.shape)
    if mask is not None and mask.shape != src.shape:
        mask = mask.expand(src.shape)
    return _MaskedStraightThrough.apply(src, value.detach(), mask)


def reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the operand it came from."""
    if grad.shape == shape:
        return grad
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for d, n in enumerate(shape):
        if n == 1 and grad.shape[d] != 1:
            grad = grad.sum(d, keepdim=True)
    return grad.reshape(shape)
