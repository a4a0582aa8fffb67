"""Cache keys that name a tensor: the same live tensor object and its version.

A key of ``(id(t), t._version)`` is not one: a new tensor allocated at a freed one's address
has the same ``id``, usually with the same version 0, and such a key serves it the old tensor's
derived values (stale weight scales, prepared weights, epilogue plans). :class:`TensorIdentity`
holds the tensor by weak reference and equals only an identity of the same live tensor. Keys
holding it cannot be pickled: their owners drop them in ``__getstate__``.
"""
from __future__ import annotations

import weakref

from torch import Tensor

__all__ = ["TensorIdentity", "tensor_versions"]


class TensorIdentity:
    """Equal only to a TensorIdentity of the same live tensor, held weakly: a new tensor at a
    freed one's address (same ``id``, often the same version 0) is another tensor, so a cache
    keyed by it never serves the old tensor's derived values."""

    __slots__ = ("ref",)

    def __init__(self, t: Tensor) -> None:
        self.ref = weakref.ref(t)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TensorIdentity):
            return NotImplemented
        t = self.ref()
        return t is not None and t is other.ref()

    def __hash__(self) -> int:
        return id(self.ref())


def tensor_versions(*ts: Tensor | None) -> tuple:
    """Identity (:class:`TensorIdentity`) and version of tensors a cached derived value depends
    on (in-place edits of a buffer, e.g. by a test or a user, invalidate the cache, and so does
    a new tensor in its place)."""
    return tuple((TensorIdentity(t), t._version) if t is not None else None for t in ts)
