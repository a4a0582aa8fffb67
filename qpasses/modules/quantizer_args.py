"""Validation of fake-quant module arguments, shared by the quantizer modules: bit-widths
(:func:`check_bits`) and how messages name a quantizer (:func:`quantizer_where`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.quantizers import MAX_BITS

__all__ = ["check_bits", "quantizer_where"]


def quantizer_where(name: str) -> str:
    """How messages name a quantizer: by its name, else generically."""
    return f"quantizer '{name}'" if name else "fake-quant module"


def check_bits(bits: Any, *, name: str = "", num_channels: int | None = None,
               min_bits: int = 0, option: str = "bits") -> Tensor:
    """Validate a bit-width (int, integral float, sequence or integer tensor) as an int64 tensor.

    Raises :class:`NumericsError` naming the quantizer and the option for a bool, a fractional
    value, a value outside ``min_bits..32`` or a per-kernel vector of the wrong length.
    """
    where = quantizer_where(name)
    if isinstance(bits, bool) or (isinstance(bits, Tensor) and bits.dtype == torch.bool):
        raise NumericsError(f"{where}: {option} must be an integer bit-width, got a bool")
    if isinstance(bits, Tensor):
        t = bits.detach().cpu()
    else:
        try:
            t = torch.as_tensor(bits)
        except (TypeError, ValueError, RuntimeError):
            raise NumericsError(f"{where}: {option} must be an int or a list of ints, got "
                                f"{type(bits).__name__} {bits!r}") from None
    if t.dtype.is_complex:
        raise NumericsError(f"{where}: {option} must be real integers, got {bits!r}")
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(t).all()) or not bool((t == torch.round(t)).all()):
            bad = t[~(torch.isfinite(t) & (t == torch.round(t)))].flatten()[0].item()
            raise NumericsError(
                f"{where}: {option}={bad} is fractional; fake-quant modules need integer "
                "bit-widths (fractional bit-widths belong to FracBits: insert-fracbits)")
        t = t.to(torch.int64)
    t = t.to(torch.int64)
    if t.dim() > 1 or t.numel() == 0:
        raise NumericsError(f"{where}: {option} must be one int or a 1-D list of per-kernel ints, "
                            f"got shape {tuple(t.shape)}")
    lo, hi = int(t.min()), int(t.max())
    if lo < min_bits or hi > MAX_BITS:
        bad = lo if lo < min_bits else hi
        raise NumericsError(f"{where}: {option}={bad} is outside the valid range "
                            f"{min_bits}..{MAX_BITS}"
                            + (" (0 bits, i.e. pruned, is for weights only)" if min_bits > 0 and
                               bad == 0 else ""))
    if num_channels is not None and t.dim() == 1 and t.numel() not in (1, num_channels):
        raise NumericsError(f"{where}: {option} has {t.numel()} per-kernel entries but the layer "
                            f"has {num_channels} output channels; give one entry per channel")
    return t
