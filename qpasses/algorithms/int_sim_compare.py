"""Code comparisons of verify-int-sim, vectorized: code statistics between two integer code
tensors, the codes of a fake-quant value, and equality of integer arrays (docs/int-sim.md,
"Verifying it fast")."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from qpasses.numerics.layout import (axes_in_memory_order, in_memory_order, is_dense,
                                     memory_order_dims)

__all__ = ["Scratch", "code_diff", "fake_quant_codes", "int_equal", "min_max"]


class Scratch:
    """Work buffers reused across the values of one run (each grows to the largest request). A
    fresh multi-megabyte allocation costs its page faults: dividing a 6 MB float32 tensor into a
    new one takes about twice as long as into a reused one."""

    def __init__(self) -> None:
        self._torch: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._np: dict[tuple[str, np.dtype], np.ndarray] = {}

    def tensor_like(self, t: torch.Tensor, dtype: torch.dtype, key: str) -> torch.Tensor | None:
        """Uninitialized, ``t``'s shape and (dense) memory layout in ``dtype``; None if ``t`` is
        not dense."""
        if not is_dense(t.shape, t.stride()):
            return None
        buf = self._torch.get((key, dtype))
        if buf is None or buf.numel() < t.numel():
            buf = self._torch[(key, dtype)] = torch.empty(t.numel(), dtype=dtype)
        return buf.as_strided(t.shape, t.stride())

    def array(self, shape: tuple[int, ...], dtype: Any, key: str) -> np.ndarray:
        """Uninitialized, C-contiguous."""
        n = math.prod(shape)
        dt = np.dtype(dtype)
        buf = self._np.get((key, dt))
        if buf is None or buf.size < n:
            buf = self._np[(key, dt)] = np.empty(n, dtype=dt)
        return buf[:n].reshape(shape)


def code_diff(a: torch.Tensor, b: torch.Tensor,
              scratch: Scratch | None = None) -> tuple[tuple[int, int], int]:
    """``((codes off by one, codes off by more), max |a − b|)`` of two integer code tensors of
    one shape (codes are at most 16-bit), in numpy (its comparisons and counts of narrow
    integers are vectorized; torch's are several times slower): one comparison pass; where
    codes differ, the absolute differences in a narrow type, their max and a count."""
    a, b = (t.to(torch.int64) if t.dtype.is_floating_point or t.dtype == torch.bool else t
            for t in (a, b))                       # (a float value: its codes, truncated)
    if a.dim() > 1 and not a.is_contiguous():      # both in a's memory order: numpy then walks
        perm = memory_order_dims(a)                # a sequentially (the counts do not change)
        a, b = a.permute(perm), b.permute(perm)
    x, y = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    if x.dtype == y.dtype and x.dtype.kind in "iu" and x.itemsize <= 2 and x.shape == y.shape:
        return _narrow_diff(x, y, scratch)
    nz = int(np.count_nonzero(np.not_equal(x, y)))
    if not nz:
        return (0, 0), 0
    d = np.subtract(x, y, dtype=np.int16 if x.itemsize == y.itemsize == 1 else np.int32)
    np.abs(d, out=d)
    more = int(np.count_nonzero(d > 1))
    return (nz - more, more), int(d.max())


def _narrow_diff(x: np.ndarray, y: np.ndarray,
                 scratch: Scratch | None = None) -> tuple[tuple[int, int], int]:
    """:func:`code_diff` of two 8/16-bit integer arrays of one dtype: ``|x − y|`` is ``max − min``,
    in ``[0, 2^bits)``, so their difference in the unsigned type of that width is exact (no
    wider copy); then a count of nonzeros, the max, and (only if some differ by more than one)
    a count of those."""
    u = np.uint8 if x.itemsize == 1 else np.uint16
    if scratch is not None and x.flags.c_contiguous:
        hi, lo = scratch.array(x.shape, x.dtype, "max"), scratch.array(x.shape, x.dtype, "min")
        np.maximum(x, y, out=hi)
        np.minimum(x, y, out=lo)
        ad = np.subtract(hi.view(u), lo.view(u), out=hi.view(u))
    else:
        ad = np.subtract(np.maximum(x, y).view(u), np.minimum(x, y).view(u))
    nz = int(np.count_nonzero(ad))
    if not nz:
        return (0, 0), 0
    mx = int(ad.max())
    more = int(np.count_nonzero(ad > 1)) if mx > 1 else 0
    return (nz - more, more), mx


def fake_quant_codes(fv: torch.Tensor, scale: float, zp: int, like: torch.Tensor | None,
                     scratch: Scratch | None = None) -> torch.Tensor:
    """The codes ``round(v / s) + z`` of a fake-quant value ``v = (q − z)·s``: in ``like``'s dtype
    and memory layout (the integer graph's value at that point: compared, and substituted by the
    local replay, in it) where they fit, else int32. In float32 while ``|q − z| <= 2^16``: ``v``
    and the quotient each carry a relative error below 2^-23, so the quotient is within
    ``2^16·2^-22 = 2^-6`` of the integer ``q − z`` and rounds to it; beyond that in float64."""
    t = None
    if fv.dtype == torch.float32 and scratch is not None:
        t = scratch.tensor_like(fv, torch.float32, "quotient")     # (never returned)
        if t is not None:
            torch.div(fv, scale, out=t)
    if t is None:
        t = fv.div(scale) if fv.dtype == torch.float32 else fv.to(torch.float64).div_(scale)
    t.round_()
    lo, hi = min_max(t) if t.numel() else (0, 0)
    if t.dtype == torch.float32 and max(-lo, hi) > 2 ** 16:
        t = fv.to(torch.float64).div_(scale).round_()
        lo, hi = min_max(t)
    t.add_(zp)
    if like is not None and like.shape == t.shape and not like.dtype.is_floating_point and \
            like.dtype != torch.bool:
        info = torch.iinfo(like.dtype)
        if info.min <= lo + zp and hi + zp <= info.max:
            return torch.empty_like(like).copy_(t)
    return t.to(torch.int32)


def int_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal`` of two integer arrays of one shape; two dense arrays of one narrow
    dtype compare as 8-byte words (the same bytes, a fraction of the element comparisons). A
    strided ``a`` (a channels-last or permuted graph value) has both arrays' axes put in its
    memory order first (the same relabelling of both: equality is unchanged; numpy then walks
    ``a`` sequentially, about twice as fast)."""
    if a.ndim > 1 and a.shape == b.shape and not a.flags.c_contiguous:
        order = axes_in_memory_order(a.strides)
        a, b = a.transpose(order), b.transpose(order)
    if a.dtype == b.dtype and a.itemsize < 8 and a.flags.c_contiguous and \
            b.flags.c_contiguous and a.nbytes % 8 == 0:
        return np.array_equal(a.reshape(-1).view(np.int64), b.reshape(-1).view(np.int64))
    return np.array_equal(a, b)


def min_max(t: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty tensor, reduced in memory order (:func:`~qpasses.numerics.
    layout.in_memory_order`); integers by two reductions (torch's ``aminmax`` on int8 is ~100x
    slower than ``min`` and ``max``)."""
    t = in_memory_order(t)
    if t.is_floating_point():                   # one pass (aminmax is fast on float)
        lo, hi = torch.aminmax(t)
        return int(lo), int(hi)
    return int(t.min()), int(t.max())
