"""Small helpers on fake-quant graph nodes used by the lowering rules."""
from __future__ import annotations


import torch
import torch.fx
from torch import Tensor

__all__ = ["fake_quant_code", "f32"]

Node = torch.fx.Node


def f32(v: float) -> Tensor:
    """``v`` as a float32 scalar tensor."""
    return torch.tensor(float(v), dtype=torch.float32)


def fake_quant_code(v: float, s: float, z: int) -> int:
    """rne(v·float32(1/s)) + z in float32, the fake quantizer's arithmetic for one value."""
    return int(torch.round(f32(v) * (1.0 / f32(s)))) + z
