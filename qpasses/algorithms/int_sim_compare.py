"""Code comparisons of verify-int-sim, vectorized: code statistics between two integer code
tensors, the codes of a fake-quant value, and equality of integer arrays (docs/int-sim.md,
"Verifying it fast")."""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["code_diff", "fake_quant_codes", "int_equal"]


def code_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[tuple[int, int], int]:
    """``((codes off by one, codes off by more), max |a − b|)`` of two integer code tensors of
    one shape (codes are at most 16-bit), in numpy (its comparisons and counts of narrow
    integers are vectorized; torch's are several times slower): one comparison pass; where
    codes differ, the absolute differences in a narrow type, their max and a count."""
    a, b = (t.to(torch.int64) if t.dtype.is_floating_point or t.dtype == torch.bool else t
            for t in (a, b))                       # (a float value: its codes, truncated)
    x, y = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    nz = int(np.count_nonzero(np.not_equal(x, y)))
    if not nz:
        return (0, 0), 0
    d = np.subtract(x, y, dtype=np.int16 if x.itemsize == y.itemsize == 1 else np.int32)
    np.abs(d, out=d)
    more = int(np.count_nonzero(d > 1))
    return (nz - more, more), int(d.max())


def fake_quant_codes(fv: torch.Tensor, scale: float, zp: int,
                     like: torch.Tensor | None) -> torch.Tensor:
    """The codes ``round(v / s) + z`` of a fake-quant value ``v = (q − z)·s``: in ``like``'s dtype
    and memory layout (the integer graph's value at that point: compared, and substituted by the
    local replay, in it) where they fit, else int32. In float32 while ``|q − z| <= 2^16``: ``v``
    and the quotient each carry a relative error below 2^-23, so the quotient is within
    ``2^16·2^-22 = 2^-6`` of the integer ``q − z`` and rounds to it; beyond that in float64."""
    t = fv.div(scale) if fv.dtype == torch.float32 else fv.to(torch.float64).div_(scale)
    t.round_()
    lo, hi = _min_max(t) if t.numel() else (0, 0)
    if t.dtype == torch.float32 and max(-lo, hi) > 2 ** 16:
        t = fv.to(torch.float64).div_(scale).round_()
        lo, hi = _min_max(t)
    t.add_(zp)
    if like is not None and like.shape == t.shape and not like.dtype.is_floating_point and \
            like.dtype != torch.bool:
        info = torch.iinfo(like.dtype)
        if info.min <= lo + zp and hi + zp <= info.max:
            return torch.empty_like(like).copy_(t)
    return t.to(torch.int32)


def int_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """``np.array_equal`` of two integer arrays of one shape; two dense arrays of one narrow
    dtype compare as 8-byte words (the same bytes, a fraction of the element comparisons)."""
    if a.dtype == b.dtype and a.itemsize < 8 and a.flags.c_contiguous and \
            b.flags.c_contiguous and a.nbytes % 8 == 0:
        return np.array_equal(a.reshape(-1).view(np.int64), b.reshape(-1).view(np.int64))
    return np.array_equal(a, b)


def _min_max(t: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty tensor (torch's ``aminmax`` on int8 is ~100x slower)."""
    return int(t.min()), int(t.max())
