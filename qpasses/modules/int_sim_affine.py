"""Per-channel affine ops of the integer simulation: :class:`IntAffine` (eval-mode BatchNorm not
after a conv, ``x * param``, ``x + param``, ``x - c``, ``x / c`` on integer codes or
accumulators) as one signed-multiplier requantization (docs/int-sim.md, "Per-channel affine ops";
arithmetic in :mod:`qpasses.numerics.int_affine`), and :class:`IntConstant` (a constant operand
quantized at lowering)."""
from __future__ import annotations

import torch
from torch import Tensor

from qpasses.numerics.fixed_point import channel_view
from qpasses.numerics.int_affine import AffineConstants
from qpasses.modules.tensor_keys import tensor_versions
from qpasses.modules.int_sim import IntSimModule, Requantize

__all__ = ["IntAffine", "IntConstant"]

_I64 = torch.int64


class IntAffine(IntSimModule):
    """``clamp(z_y + contract(((σ·(q − z_in)) << k + B)·M/2^k))`` per channel along ``axis``
    (``axis`` None: one channel). ``rq`` is the requantization (positive multipliers
    ``M/2^k``, output grid, contract); ``bias_f`` is the float-rne bias in input units."""

    sign: Tensor
    bias_q: Tensor

    def __init__(self, c: AffineConstants, *, in_zero_point: int, out_zero_point: int,
                 qmin: int, qmax: int, rounding: str, multiplier_bits: int,
                 axis: int | None, what: str = "") -> None:
        super().__init__()
        self.register_buffer("sign", c.sign.to(_I64).reshape(-1))
        self.register_buffer("bias_q", c.bias_q.to(_I64).reshape(-1))
        self.register_buffer("bias_f", None if c.bias_f is None
                             else c.bias_f.to(torch.float32).reshape(-1))
        self.frac_bits, self.in_zero_point, self.axis = int(c.frac_bits), int(in_zero_point), axis
        self.qmin, self.qmax, self.what = int(qmin), int(qmax), what
        self.acc_max = int(c.acc_max)
        b_max = int(c.bias_q.abs().max()) if c.bias_q.numel() else 0
        self.in_max_abs = (self.acc_max - b_max) >> self.frac_bits
        # constant facts, so the hot path has no data-dependent checks
        self.all_positive = bool((c.sign == 1).all())
        self.has_bias = bool((c.bias_q != 0).any())
        self.rq = Requantize(c.real, in_zero_point=0, out_zero_point=out_zero_point, qmin=qmin,
                             qmax=qmax, rounding=rounding, multiplier_bits=multiplier_bits,
                             axis=axis if c.real.numel() > 1 else None, scale_f32=c.scale_f32)
        self.rq.prove(self.acc_max)

    def set_backend(self, backend: str) -> bool:
        changed = super().set_backend(backend)
        return self.rq.set_backend(backend) or changed

    def refresh(self) -> None:
        """Re-derive the facts that depend on ``bias_q`` after it was edited in place."""
        self.has_bias = bool((self.bias_q != 0).any())
        self.acc_max = (self.in_max_abs << self.frac_bits) + int(self.bias_q.abs().max())
        self.rq.prove(self.acc_max)
        self.__dict__.pop("_cache", None)

    def accumulate_with_bias(self, q: Tensor) -> Tensor:
        """:meth:`accumulate`, adding ``bias_q`` even where :meth:`refresh` has not run."""
        has = self.has_bias
        self.has_bias = True
        try:
            return self.accumulate(q)
        finally:
            self.has_bias = has

    def accumulate(self, q: Tensor) -> Tensor:
        """``A = (σ·(q − z_in))·2^k + B`` in int64 (exact: ``|A| <= acc_max`` < 2^31)."""
        x = q.to(_I64)
        if self.in_zero_point:
            x = x - self.in_zero_point
        if not self.all_positive:
            x = x * channel_view(self.sign, x, self.axis, "sign")
        if self.frac_bits:
            x = x * (1 << self.frac_bits)
        if self.has_bias:
            x = x + channel_view(self.bias_q, x, self.axis, "bias")
        return x

    def forward(self, q: Tensor) -> Tensor:
        acc = self.accumulate(q)
        if self.fast:
            return self.rq(acc, self.bias_f, owned=True)
        return self.rq.reference(acc, self.bias_f).to(self.out_dtype)

    def extra_repr(self) -> str:
        neg = int((self.sign < 0).sum())
        return (f"{self.what or 'affine'}, channels={self.sign.numel()} (axis {self.axis}), "
                f"negative={neg}, k={self.frac_bits}, z_in={self.in_zero_point}, "
                f"range=[{self.qmin}, {self.qmax}]")


class IntConstant(IntSimModule):
    """Integer codes computed at lowering from parameters/buffers (a class token, a position
    embedding): returns them (no input)."""

    codes: Tensor

    def __init__(self, codes: Tensor, qmin: int, qmax: int, what: str = "") -> None:
        super().__init__()
        self.register_buffer("codes", codes.to(_I64))
        self.qmin, self.qmax, self.what = int(qmin), int(qmax), what

    def forward(self) -> Tensor:
        if self.fast:
            return self._cached("codes", tensor_versions(self.codes) + (self.out_dtype,),
                                lambda: self.codes.to(self.out_dtype))
        return self.codes.clone()

    def extra_repr(self) -> str:
        return f"{self.what}, shape={tuple(self.codes.shape)}, range=[{self.qmin}, {self.qmax}]"
