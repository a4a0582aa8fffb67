"""Memory layout of tensors (and numpy arrays), as the fast kernels and the checker's comparisons
walk them: the dims in memory order, a view of a tensor in that order, and whether a layout is
dense (a permutation of a contiguous tensor, so one flat index walks it)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

__all__ = ["axes_in_memory_order", "in_memory_order", "is_dense", "memory_order_dims"]


def axes_in_memory_order(strides: Sequence[int]) -> list[int]:
    """Axes from outermost to innermost in memory for these strides (torch's element strides or
    numpy's byte strides alike; ties, i.e. size-1 dims, in axis order)."""
    return sorted(range(len(strides)), key=lambda d: -abs(strides[d]))


def memory_order_dims(t: Tensor) -> list[int]:
    """Dims of ``t`` from outermost to innermost in memory (:func:`axes_in_memory_order`)."""
    return axes_in_memory_order(t.stride())


def in_memory_order(t: Tensor) -> Tensor:
    """``t`` with its dims permuted into memory order (a view; contiguous when ``t`` is dense,
    e.g. channels-last): torch's reductions over a strided layout run element by element, an
    order of magnitude slower (int16 channels-last ``min``: ~3 ns per value against ~0.1)."""
    if t.dim() < 2 or t.is_contiguous():
        return t
    return t.permute(memory_order_dims(t))


def is_dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether ``strides`` (in elements) lay ``shape`` out densely: some permutation of it is
    C-contiguous (size-1 dims, whatever their stride, ignored)."""
    expect = 1
    for st, size in sorted((st, size) for st, size in zip(strides, shape) if size != 1):
        if st != expect:
            return False
        expect *= size
    return True
