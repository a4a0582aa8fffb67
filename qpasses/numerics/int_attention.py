"""Integer kernels of attention: the product of two integer activations (Q·Kᵀ, attention·V) and
softmax over integer codes (docs/int-sim.md, "Transformer kernels").

Pure tensor math, no graph code. Every function comes in two forms that give the same integers:
``*_reference`` (int64, every bound checked) and ``*_fast`` (exact float GEMMs, narrow dtypes,
no checks; exact only under the bound the caller proved at lowering).

**Matmul.** ``acc = (a − z_a) @ (b − z_b)`` with ``torch.matmul`` broadcasting; the bound on
every partial sum is ``K·max|a − z_a|·max|b − z_b|`` (:func:`matmul_bound`). The fast kernel
multiplies float32 (bound < 2^24) or float64 (< 2^53) copies of the centred operands: every
partial sum is an integer below the mantissa's reach, so any summation order is exact (TF32 is
turned off on CUDA).

**Softmax.** Input codes ``q`` on a grid of scale ``s`` whose codes span ``D = qmax − qmin``
(``D <= 2^16``):

    e_i = E[max_j q_j − q_i],   E[d] = rne(exp(−s·d)·2^F)  (d = 0..D, built once, E[0] = 2^F)
    S   = Σ_i e_i                                           (int64)
    p_i = floor((e_i·2^(F+1) + S) / (2S)) = rhu(e_i·2^F / S) (Q-format probability, 0..2^F)

``F = 30`` (:data:`SOFTMAX_FRAC_BITS`); the caller requantizes ``p`` onto the output grid with
multiplier ``2^−F / s_y`` under its rounding contract. Bounds: ``e_i·2^(F+1) <= 2^61`` and
``S <= N·2^F`` (N < 2^32 softmax length), within int64.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.int_conv_fast import exact_float_matmul

__all__ = ["SOFTMAX_FRAC_BITS", "broadcast_batch", "matmul_bound", "matmul_kernel", "int_matmul_fast",
           "int_matmul_reference", "int_softmax_fast", "int_softmax_reference",
           "softmax_exp_table"]

SOFTMAX_FRAC_BITS = 30
_I64 = torch.int64
INT32_MAX = 2 ** 31 - 1


def matmul_bound(k: int, a_max_abs: int, b_max_abs: int) -> int:
    """Bound on every partial sum of ``Σ_{i<k} (a − z_a)(b − z_b)`` (and on the result)."""
    return int(k) * int(a_max_abs) * int(b_max_abs)


def matmul_kernel(bound: int) -> str:
    """The fastest kernel the bound proves exact: ``float32`` (< 2^24), ``float64`` (< 2^53) or
    ``reference`` (int64)."""
    if bound < 2 ** 24:
        return "float32"
    if bound < 2 ** 53:
        return "float64"
    return "reference"


def _check_int(t: Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise NumericsError(f"int matmul: {name} must be an integer tensor, got {t.dtype}")


def int_matmul_reference(a: Tensor, b: Tensor, a_zero_point: int, b_zero_point: int) -> Tensor:
    """``(a − z_a) @ (b − z_b)`` in int64, exactly (``torch.matmul`` shapes and broadcasting;
    int64 GEMMs run on the CPU, the result goes back to ``a``'s device)."""
    _check_int(a, "a")
    _check_int(b, "b")
    dev = a.device
    xa = a.to("cpu", _I64) - int(a_zero_point)
    xb = b.to("cpu", _I64) - int(b_zero_point)
    return torch.matmul(xa, xb).to(dev)


def int_matmul_fast(a: Tensor, b: Tensor, a_zero_point: int, b_zero_point: int, kernel: str,
                    out_dtype: torch.dtype = torch.int32) -> Tensor:
    """The same integers as :func:`int_matmul_reference` by an exact float GEMM (``kernel`` from
    :func:`matmul_kernel` on the proven bound), in ``out_dtype``."""
    if kernel == "reference":
        return int_matmul_reference(a, b, a_zero_point, b_zero_point).to(out_dtype)
    dt = torch.float32 if kernel == "float32" else torch.float64
    xa = a.to(dt)
    if a_zero_point:
        xa -= a_zero_point
    xb = b.to(dt)
    if b_zero_point:
        xb -= b_zero_point
    with exact_float_matmul(xa):
        acc = torch.matmul(xa, xb)
    return acc.to(out_dtype)


# ------------------------------------------------------------------------------------------------
# softmax


def softmax_exp_table(scale: float, span: int, frac_bits: int = SOFTMAX_FRAC_BITS) -> Tensor:
    """``E[d] = rne(exp(−scale·d)·2^frac_bits)`` for ``d = 0..span`` (int64, non-increasing;
    ``E[0] = 2^frac_bits``)."""
    if not (scale > 0 and math.isfinite(scale)):
        raise NumericsError(f"softmax table: the input scale must be finite and > 0, got {scale}")
    if not 0 <= span <= 2 ** 16:
        raise NumericsError(f"softmax table: the input codes span {span} > 2^16 values")
    if not 1 <= frac_bits <= 30:
        raise NumericsError(f"softmax table: frac_bits must be in 1..30, got {frac_bits}")
    d = torch.arange(span + 1, dtype=torch.float64)
    return torch.round(torch.exp(-float(scale) * d) * float(2 ** frac_bits)).to(_I64)


def _softmax_divide(e: Tensor, dim: int, frac_bits: int) -> Tensor:
    s = e.sum(dim, keepdim=True)
    return torch.div((e << (frac_bits + 1)) + s, 2 * s, rounding_mode="floor")


def int_softmax_reference(q: Tensor, dim: int, table: Tensor,
                          frac_bits: int = SOFTMAX_FRAC_BITS) -> Tensor:
    """``p`` (int64, ``0..2^frac_bits``) of integer codes ``q`` along ``dim`` (module docstring),
    checking that every code difference is inside the table."""
    _check_int(q, "q")
    x = q.to(_I64)
    if x.numel() == 0:
        return x.clone()
    d = x.amax(dim, keepdim=True) - x
    if int(d.max()) >= table.numel():
        raise NumericsError(f"int softmax: codes differ by {int(d.max())}, beyond the "
                            f"{table.numel()}-entry exponent table")
    e = table.to(x.device)[d]
    if int(table.max()) > 2 ** frac_bits or int(table.min()) < 0:
        raise NumericsError("int softmax: exponent table outside [0, 2^frac_bits]")
    if x.shape[dim] >= 2 ** 32:
        raise NumericsError("int softmax: more than 2^32 values along the softmax dim")
    return _softmax_divide(e, dim, frac_bits)


def int_softmax_fast(q: Tensor, dim: int, table: Tensor,
                     frac_bits: int = SOFTMAX_FRAC_BITS) -> Tensor:
    """:func:`int_softmax_reference` without the checks, on codes of any narrow dtype (the
    maximum and the table index in int32)."""
    if q.numel() == 0:
        return q.to(_I64)
    x = q.to(torch.int32)
    d = x.amax(dim, keepdim=True) - x
    e = torch.index_select(table, 0, d.reshape(-1)).view(d.shape)
    return _softmax_divide(e, dim, frac_bits)


def broadcast_batch(a_shape: Sequence[int], b_shape: Sequence[int]) -> int:
    """The contracted size ``K`` of ``torch.matmul(a, b)`` (NumericsError when they differ)."""
    ka = a_shape[-1]
    kb = b_shape[0] if len(b_shape) == 1 else b_shape[-2]
    if ka != kb:
        raise NumericsError(f"int matmul: shapes {tuple(a_shape)} and {tuple(b_shape)} do not "
                            "contract")
    return int(ka)
