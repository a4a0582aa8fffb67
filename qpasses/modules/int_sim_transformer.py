"""Transformer modules of the integer simulation: :class:`IntMatMul` (product of two integer
activations), :class:`IntSoftmax` and :class:`IntLayerNorm` (docs/int-sim.md, "Transformer
kernels"; the arithmetic is in :mod:`qpasses.numerics.int_attention` and
:mod:`qpasses.numerics.int_norm`). Like the other integer-simulation modules they run the
``reference`` (int64, checked) or the ``fast`` kernels (exact float GEMMs, narrow dtypes), which
agree bit for bit under the bounds proven at lowering.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.modules.int_sim import IntSimModule, Requantize
from qpasses.numerics.int_attention import (SOFTMAX_FRAC_BITS, broadcast_batch, int_matmul_fast,
                                            int_matmul_reference, int_softmax_fast,
                                            int_softmax_reference, matmul_bound, matmul_kernel)
from qpasses.numerics.int_norm import (LayerNormConstants, int_layer_norm_fast,
                                       int_layer_norm_reference)

__all__ = ["IntL2Normalize", "IntLayerNorm", "IntMatMul", "IntSoftmax", "TRANSFORMER_MODULES", "matmul_kernel_table"]

_I64 = torch.int64


class IntMatMul(IntSimModule):
    """``acc = (a − z_a) @ (b − z_b)`` (``torch.matmul`` shapes), then the fused
    :class:`Requantize` onto the next quantizer's grid (multiplier ``s_a·s_b/s_y``), or the exact
    accumulator (scale ``s_a·s_b``, zero point 0) when ``requant`` is None.

    ``k`` is the contracted size the bound was proven for; a larger one at run time raises
    :class:`NumericsError` (lower the graph again for that input size).
    """

    def __init__(self, a: tuple[float, int, int], b: tuple[float, int, int], k: int,
                 requant: Requantize | None) -> None:
        super().__init__()
        (self.a_scale, self.a_zero_point, self.a_max_abs) = (float(a[0]), int(a[1]), int(a[2]))
        (self.b_scale, self.b_zero_point, self.b_max_abs) = (float(b[0]), int(b[1]), int(b[2]))
        self.k = int(k)
        self.acc_max = matmul_bound(self.k, self.a_max_abs, self.b_max_abs)
        self.fast_kernel = matmul_kernel(self.acc_max)
        self.requant = requant
        if requant is not None:
            self.qmin, self.qmax = requant.qmin, requant.qmax
        else:
            self.qmin, self.qmax = -self.acc_max, self.acc_max

    @property
    def kernel(self) -> str:
        """The kernel that runs on the current backend."""
        return self.fast_kernel if self.backend == "fast" else "reference"

    @property
    def acc_bits(self) -> int:
        """The declared accumulator width: the proven bound's bits plus the sign."""
        return self.acc_max.bit_length() + 1

    def kernel_row(self, name: str) -> dict[str, Any]:
        """This matmul's row of ``kernel_table`` (x / w bits: signed widths of the centred
        operands ``a − z_a`` and ``b − z_b``)."""
        limit = {"float32": "< 2^24", "float64": "< 2^53"}.get(self.fast_kernel, ">= 2^53")
        return {"layer": name, "kernel": self.kernel, "fast_kernel": self.fast_kernel,
                "cpu_engine": self.kernel, "acc_bound": self.acc_max, "acc_bits": self.acc_bits,
                "x_bits": self.a_max_abs.bit_length() + 1,
                "w_bits": self.b_max_abs.bit_length() + 1, "acc_shift": 0,
                "reason": f"matmul K={self.k}: |acc| <= {self.acc_max} {limit}"}

    def accumulate(self, a: Tensor, b: Tensor, kernel: str | None = None) -> Tensor:
        """The exact accumulator (``kernel``: ``reference`` or this module's fast kernel)."""
        k = broadcast_batch(a.shape, b.shape)
        if k > self.k:
            raise NumericsError(f"int matmul: contracted size {k} exceeds the {self.k} its "
                                "accumulator bound was proven for; lower the graph again with "
                                "example inputs of this size")
        kernel = kernel or ("reference" if not self.fast else self.fast_kernel)
        if kernel == "reference":
            return int_matmul_reference(a, b, self.a_zero_point, self.b_zero_point)
        dt = torch.int32 if self.acc_max <= 2 ** 31 - 1 else _I64
        return int_matmul_fast(a, b, self.a_zero_point, self.b_zero_point, kernel, dt)

    def fuse(self, rq: Requantize) -> bool:
        """Take over ``rq`` (a per-tensor requantization of this module's accumulator, proven
        for its bound) as the fused epilogue; False (nothing changed) when it does not qualify."""
        if self.requant is not None or rq.in_zero_point != 0 or rq.real.numel() != 1 or \
                not rq.proven or rq.in_max_abs is None or rq.in_max_abs < self.acc_max:
            return False
        self.requant = rq
        self.qmin, self.qmax = rq.qmin, rq.qmax
        return True

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        acc = self.accumulate(a, b)
        if self.requant is None:
            return acc.to(self.out_dtype)
        return self.requant(acc, owned=True)

    def extra_repr(self) -> str:
        return (f"a=({self.a_scale:.6g}, {self.a_zero_point}), b=({self.b_scale:.6g}, "
                f"{self.b_zero_point}), k={self.k}, |acc| <= {self.acc_max}, "
                f"fast_kernel={self.fast_kernel}, requant={self.requant is not None}")


class IntSoftmax(IntSimModule):
    """Softmax of integer codes along ``dim``: exponent table over code differences, int64 sum,
    rounded integer division to ``p`` in Q30, then :class:`Requantize` (multiplier
    ``2^−30/s_y``) onto the output grid."""

    table: Tensor

    def __init__(self, dim: int, table: Tensor, in_scale: float, in_zero_point: int,
                 requant: Requantize, out_scale: float) -> None:
        super().__init__()
        self.dim = int(dim)
        self.register_buffer("table", table.to(_I64))
        self.in_scale, self.in_zero_point = float(in_scale), int(in_zero_point)
        self.frac_bits = SOFTMAX_FRAC_BITS
        self.out_scale = float(out_scale)
        self.requant = requant
        self.qmin, self.qmax = requant.qmin, requant.qmax

    def probabilities(self, q: Tensor) -> Tensor:
        """``p`` in Q30 (int64)."""
        if self.fast:
            return int_softmax_fast(q, self.dim, self.table, self.frac_bits)
        return int_softmax_reference(q, self.dim, self.table, self.frac_bits)

    def forward(self, q: Tensor) -> Tensor:
        return self.requant(self.probabilities(q), owned=True)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, in=({self.in_scale:.6g}, {self.in_zero_point}), "
                f"entries={self.table.numel()}, out_scale={self.out_scale:.6g}, "
                f"range=[{self.qmin}, {self.qmax}]")


class IntLayerNorm(IntSimModule):
    """LayerNorm of integer codes over the last ``n_dims`` dims with the gain and bias folded
    into a per-position fixed-point requantization onto the output grid (constants from
    :func:`qpasses.numerics.int_norm.layer_norm_constants`)."""

    gain: Tensor
    bias: Tensor

    def __init__(self, n_dims: int, consts: LayerNormConstants, *, in_scale: float,
                 in_zero_point: int, out_scale: float, out_zero_point: int, qmin: int,
                 qmax: int, rounding: str, eps: float) -> None:
        super().__init__()
        self.n_dims, self.n = int(n_dims), consts.n
        self.frac_bits, self.eps_codes = consts.frac_bits, consts.eps_codes
        self.out_frac_bits = consts.out_frac_bits
        self.register_buffer("gain", consts.gain)
        self.register_buffer("bias", consts.bias)
        self.in_scale, self.in_zero_point = float(in_scale), int(in_zero_point)
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.qmin, self.qmax, self.rounding, self.eps = int(qmin), int(qmax), rounding, float(eps)

    def constants(self) -> LayerNormConstants:
        return LayerNormConstants(self.n, self.frac_bits, self.eps_codes, self.gain, self.bias,
                                  self.out_frac_bits)

    def forward(self, q: Tensor) -> Tensor:
        fn = int_layer_norm_fast if self.fast else int_layer_norm_reference
        y = fn(q, self.n_dims, self.in_zero_point, self.constants(), self.out_zero_point,
               self.qmin, self.qmax, self.rounding)
        return y.to(self.out_dtype)

    def extra_repr(self) -> str:
        return (f"N={self.n}, k={self.frac_bits}, E={self.eps_codes}, R={self.out_frac_bits}, "
                f"in=({self.in_scale:.6g}, {self.in_zero_point}), out=({self.out_scale:.6g}, "
                f"{self.out_zero_point}), range=[{self.qmin}, {self.qmax}], "
                f"rounding={self.rounding}")


class IntL2Normalize(IntLayerNorm):
    """``F.normalize(x, p=2, dim)`` of integer codes: :class:`IntLayerNorm`'s arithmetic without
    the mean and the affine (``consts.center`` False: ``T = max(Σc², E)``, ``E`` from eps²),
    over ``dim`` (moved last and back), requantized onto the output grid."""

    def __init__(self, dim: int, consts: LayerNormConstants, *, in_scale: float,
                 in_zero_point: int, out_scale: float, out_zero_point: int, qmin: int,
                 qmax: int, rounding: str, eps: float) -> None:
        if consts.center:
            raise NumericsError("int l2 normalize: constants built for LayerNorm (center=True)")
        super().__init__(1, consts, in_scale=in_scale, in_zero_point=in_zero_point,
                         out_scale=out_scale, out_zero_point=out_zero_point, qmin=qmin,
                         qmax=qmax, rounding=rounding, eps=eps)
        self.dim = int(dim)

    def constants(self) -> LayerNormConstants:
        return LayerNormConstants(self.n, self.frac_bits, self.eps_codes, self.gain, self.bias,
                                  self.out_frac_bits, center=False)

    def forward(self, q: Tensor) -> Tensor:
        return super().forward(q.movedim(self.dim, -1)).movedim(-1, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, " + super().extra_repr()


TRANSFORMER_MODULES: tuple[Any, ...] = (IntMatMul, IntSoftmax, IntLayerNorm, IntL2Normalize)


def matmul_kernel_table(gm: torch.nn.Module) -> list[dict[str, Any]]:
    """One row per :class:`IntMatMul` of a lowered graph, in the format of
    :func:`qpasses.modules.int_sim_layers.kernel_table`."""
    return [m.kernel_row(name) for name, m in gm.named_modules() if isinstance(m, IntMatMul)]
