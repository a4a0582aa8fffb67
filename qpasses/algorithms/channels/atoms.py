"""Channel atoms and their union-find into channel classes."""
from __future__ import annotations

from typing import Any

import numpy as np

from qpasses.algorithms.channels.state import TensorState

__all__ = ["ChannelAtoms"]


class ChannelAtoms:
    """The atoms of one walk: who created each, which are unprunable and why, and the union-find
    that merges atoms which must be removed together into one channel class.

    ``owner[a]`` is ``(kind, node, index)``: the kind of node that created atom ``a`` (``producer``
    for a layer's output channel, ``input``, ``opaque``), its name and the channel index there.
    ``bad[a]`` is ``(order marked, reason)`` for an atom that can never be pruned.
    """

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.owner: list[tuple[str, str, int]] = []
        self.bad: dict[int, tuple[int, str]] = {}

    def __len__(self) -> int:
        return len(self.parent)

    def new(self, n: int, kind: str, node: str) -> np.ndarray:
        """``n`` fresh atoms created by ``node``, as an int64 array."""
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.owner.extend((kind, node, i) for i in range(n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        """The root of atom ``a`` (the smallest atom of its set), compressing the path."""
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if ra < rb:
                self.parent[rb] = ra
            else:
                self.parent[ra] = rb

    def union_arrays(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union two atom arrays position by position."""
        for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist()):
            self.union(x, y)

    def mark(self, atoms: Any, reason: str) -> None:
        """Mark atoms (an array or a TensorState) unprunable; the first reason sticks."""
        if isinstance(atoms, TensorState):
            atoms = atoms.atoms
        seq = len(self.bad)
        for a in np.asarray(atoms).reshape(-1).tolist():
            if a not in self.bad:
                self.bad[a] = (seq, reason)
