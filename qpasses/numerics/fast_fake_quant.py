"""The fast path of fake quantization: a vectorized composite, bit-identical to torch's kernels.

Pure tensor math used by the fake-quant modules (:mod:`qpasses.modules.fake_quant`) and the GMPQ
supernet's branches.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["FAST_DTYPES", "FAST_MAX_BITS", "fast_fake_quant"]

# Widest codes the fast path handles (float32 represents every code and zero point exactly).
FAST_MAX_BITS = 16
FAST_DTYPES = (torch.float32,)

#
# torch's fused fake-quant kernels (torch.fake_quantize_per_*_affine) round with a scalar
# std::nearbyint per element; on CPU they are 4-10x slower than the same arithmetic written as a
# handful of vectorized ATen ops, and their backward (grad * mask.to(float)) adds a conversion
# pass. The composite below computes exactly what the kernels compute -- ``q = clamp(rne(x * (1/s))
# + z, qmin, qmax)``, ``out = (q - z) * s`` with the float32 reciprocal, the mask ``qmin <= rne(x/s) +
# z <= qmax`` -- so values and gradients are bit-identical to torch.ao's fake quantization and to
# ``numerics.quantize_dequantize`` (tests check both), in 5-6 vectorized passes.


def _fq_composite(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                  need_mask: bool) -> tuple[Tensor, Tensor | None]:
    """``x``: (N, K) or any shape with per-tensor ``scale`` (1,); per-channel callers pass x as
    (C, K) and ``scale``/``zero_point`` as (C, 1). ``zero_point`` None means 0."""
    r = torch.mul(x, 1.0 / scale).round_()
    if zero_point is not None:
        r.add_(zero_point)
    if need_mask:
        q = r.clamp(qmin, qmax)
        mask: Tensor | None = q == r
    else:
        q, mask = r.clamp_(qmin, qmax), None
    if zero_point is not None:
        q.sub_(zero_point)
    return q.mul_(scale), mask


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int,  # type: ignore[override]
                qmax: int, shape: Any) -> Tensor:
        out, mask = _fq_composite(x, scale, zero_point, qmin, qmax, True)
        ctx.save_for_backward(mask)
        return out if shape is None else out.view(shape)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Any:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad.reshape(mask.shape) * mask, None, None, None, None, None


def fast_fake_quant(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int,
                    axis: int | None = None) -> Tensor:
    """Straight-through fake quantization, bit-identical to ``torch.fake_quantize_per_tensor_affine``
    (``axis=None``, ``scale`` with one element) or ``torch.fake_quantize_per_channel_affine`` along
    ``axis`` (``scale``/``zero_point`` with one entry per channel). ``zero_point=None`` is 0. The
    gradient wrt ``x`` is 1 where the code was not clamped, else 0; the qparams get none."""
    shape = None
    if axis is not None:
        if axis != 0:
            x = x.movedim(axis, 0)
        c = x.shape[0]
        shape = x.shape if axis == 0 else None
        x2 = x.reshape(c, -1)
        scale = scale.reshape(c, 1)
        zero_point = zero_point.reshape(c, 1) if zero_point is not None else None
    else:
        x2 = x
        scale = scale.reshape(())
        zero_point = zero_point.reshape(()) if zero_point is not None else None
    scale = scale.detach().to(x.dtype)
    if zero_point is not None:
        zero_point = zero_point.detach().to(x.dtype)
    if torch.is_grad_enabled() and x2.requires_grad:
        out = _FakeQuantSTE.apply(x2, scale, zero_point, qmin, qmax, shape)
    else:
        out, _ = _fq_composite(x2, scale, zero_point, qmin, qmax, False)
        if shape is not None:
            out = out.view(shape)
    if axis is not None and axis != 0:
        out = out.reshape(x.shape).movedim(0, axis)
    return out
