"""Constant padding of integer codes (``IntPad``): the real value 0 is the zero-point code."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qpasses.modules.int_sim import IntSimModule

__all__ = ["IntPad"]


class IntPad(IntSimModule):
    """``F.pad(q, pad, value=code)`` on codes: ``code`` is the grid's zero point, so the padded
    entries dequantize to exactly 0.0 (zero padding of the float value). ``pad`` is F.pad's tuple
    (last dim first); the declared range is the input's, widened to hold ``code``."""

    def __init__(self, pad: tuple[int, ...], code: int, qmin: int, qmax: int) -> None:
        super().__init__()
        self.pad = tuple(int(p) for p in pad)
        self.code = int(code)
        self.qmin, self.qmax = min(int(qmin), self.code), max(int(qmax), self.code)

    def forward(self, q: Tensor) -> Tensor:
        if not self.fast:
            q = q.to(torch.int64)
        return F.pad(q, self.pad, mode="constant", value=self.code).to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, code={self.code}"
