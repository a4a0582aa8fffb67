"""What the channel walker knows about each fx value, and the fx-reading helpers it uses.

Every output channel of a conv/linear layer (and every channel the walker cannot explain) is an
*atom*, an int. A tensor's channel state is the array of atoms at the positions of its channel
dim(s); tuples and size-derived ints have their own state types.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx
from torch import nn

__all__ = ["TensorState", "TupleState", "IntState", "tuple_shapes", "flat_nodes",
           "has_node", "normalize_dim", "module_forward_is", "target_name",
           "reshape_mapping"]


@dataclass
class TensorState:
    """Channel state of a tensor: ``atoms`` over the block of channel dims starting at ``dim``.

    ``atoms`` has one axis per channel dim (one, or several after a view split the channel dim);
    ``rank`` is the tensor's rank. For pure index-mapping nodes (cat, split, reshape, permute...)
    ``sources``/``gather`` say where each position comes from: position ``p`` holds position
    ``gather[p]`` of the concatenated sources' channels.
    """
    dim: int
    atoms: np.ndarray
    rank: int
    sources: tuple[str, ...] = ()
    gather: np.ndarray | None = None

    @property
    def m(self) -> int:
        """Number of channel dims."""
        return self.atoms.ndim

    @property
    def size(self) -> int:
        """Number of channel positions."""
        return int(self.atoms.size)


@dataclass
class TupleState:
    """Channel state of a tuple-valued node (split/chunk): one entry per item (``None`` for an
    item without channels). For a split along the channel dim, ``split_src`` is the input node
    and ``offsets`` each item's first position in it."""
    items: list[TensorState | None]
    split_src: str | None = None
    offsets: list[int] | None = None


@dataclass
class IntState:
    """An int (or tuple of ints) derived from the sizes of the tensors named in ``sources``."""
    sources: frozenset[str]


def tuple_shapes(node: torch.fx.Node) -> list[tuple[int, ...] | None] | None:
    """The recorded shapes of a tuple-valued node's items (None: not a tuple)."""
    tm = node.meta.get("tensor_meta")
    if isinstance(tm, (list, tuple)) and not hasattr(tm, "shape"):
        return [tuple(int(s) for s in t.shape) if hasattr(t, "shape") else None for t in tm]
    return None


def flat_nodes(a: Any) -> list[torch.fx.Node]:
    """Every fx node inside a (nested) argument structure."""
    out: list[torch.fx.Node] = []
    torch.fx.node.map_arg(a, lambda n: out.append(n) or n)
    return out


def has_node(a: Any) -> bool:
    return bool(flat_nodes(a))


def normalize_dim(d: Any, rank: int) -> int | None:
    """A constant dim index in ``0..rank-1`` (None: not a constant int, or out of range)."""
    if not isinstance(d, int) or isinstance(d, bool) or rank == 0:
        return None
    if -rank <= d < rank:
        return d % rank
    return None


def module_forward_is(mod: nn.Module, bases: tuple[type, ...]) -> bool:
    """``mod`` is an instance of one of ``bases`` and keeps that base's forward."""
    for base in bases:
        if isinstance(mod, base):
            return type(mod).forward is base.forward
    return False


def target_name(t: Any) -> str:
    """A readable name of a call target (a method name, or a function's ``__name__``)."""
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def reshape_mapping(in_shape: tuple[int, ...], dim: int, block: tuple[int, ...],
                    out_shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], np.ndarray] | None:
    """Row-major mapping of a channel block through a reshape.

    Returns ``(new_dim, new_block, gather)``: the output's channel block starts at ``new_dim``
    with sizes ``new_block`` and its flat position ``o`` holds input block position
    ``gather[o]``. ``None`` when the channels do not stay a block of whole dims (e.g. merged with
    the batch dim).
    """
    m = len(block)
    prefix = math.prod(in_shape[:dim])
    inner_s = math.prod(in_shape[dim + m:])
    n = math.prod(block)
    cands = [k for k in range(len(out_shape) + 1) if math.prod(out_shape[:k]) == prefix]
    if not cands or inner_s == 0 or n == 0:
        return None
    d2 = max(k for k in cands if k < len(out_shape)) if any(k < len(out_shape) for k in cands) \
        else None
    if d2 is None:
        return None
    for m2 in range(1, len(out_shape) - d2 + 1):
        inner_t = math.prod(out_shape[d2 + m2:])
        if inner_t and inner_s % inner_t == 0:
            break
    else:
        return None
    new_block = tuple(out_shape[d2:d2 + m2])
    n_out = math.prod(new_block)
    if n_out * inner_t != n * inner_s:
        return None
    gather = (np.arange(n_out, dtype=np.int64) * inner_t) // inner_s
    if gather.size and gather.max() >= n:
        return None
    return d2, new_block, gather
