"""Per-layer cost formulas: MACs, BitOPs, model size and accumulator widths.

Pure arithmetic on plain numbers and tensors; no graph code. A layer is described by
``c_in, c_out, groups, kernel (tuple), out_spatial (tuple)`` (a linear layer is a conv with
``kernel=()`` and ``out_spatial=()``). Conventions: docs/algorithms.md, "Cost accounting":

* MACs: ``C_in/groups · C_out · prod(kernel) · prod(out_spatial)``; depthwise is the
  ``groups == C_in`` case.
* BitOPs (FracBits Eq. 4-5): ``Σ_k MACs_k · b_w,k · b_a`` summed over output kernels k;
  a 0-bit kernel is pruned and costs 0. Bits may be integers or real-valued torch tensors λ
  (differentiable); per-kernel bit vectors have one entry per output channel.
* Size (FracBits): ``Σ_k params_k · b_w,k + bias_count · bias_bits`` bits (fp32 biases by
  default, BN excluded); bytes = bits / 8, MB = 1e6 bytes.
* Accumulator width: the minimal signed two's-complement width holding every value the
  accumulator ``Σ (w_q − z_w)(x_q − z_x) + bias`` can take, worst case from the operand ranges or
  data-aware from the actual integer weights.

Model-level conventions (FracBits' first conv counted at 8×8 bits, the last FC at 8 × searched
activation bits) are the caller's business: these functions cost one layer with the bits given.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch

from qpasses.errors import NumericsError

__all__ = [
    "BitsLike", "kernel_params", "kernel_macs", "layer_macs", "kernel_macs_pruned",
    "layer_macs_pruned", "layer_bitops", "layer_size_bits", "bits_to_bytes", "bits_to_mb",
    "to_giga", "int_range", "signed_width", "acc_range_worst_case", "acc_bits_worst_case",
    "acc_bits_distiller", "acc_range_data", "acc_bits_data", "product_macs", "product_bitops",
]

#: A bit-width: a Python number, or a torch tensor (scalar or one entry per output kernel).
BitsLike = Union[int, float, torch.Tensor]

_INT64_SAFE = 2 ** 62  # keep every intermediate of the accumulator math exact in int64


# --------------------------------------------------------------------------------------------
# MACs and parameter counts
# --------------------------------------------------------------------------------------------

def _check_shape(c_in: int, c_out: int, groups: int, kernel: Sequence[int],
                 out_spatial: Sequence[int]) -> None:
    if c_in < 0 or c_out < 0 or groups < 1:
        raise NumericsError(f"bad layer shape: c_in={c_in}, c_out={c_out}, groups={groups}")
    if c_in % groups or c_out % groups:
        raise NumericsError(f"c_in={c_in} and c_out={c_out} must be divisible by groups={groups}")
    if any(k < 1 for k in kernel) or any(s < 0 for s in out_spatial):
        raise NumericsError(f"bad kernel {tuple(kernel)} or output size {tuple(out_spatial)}")


def kernel_params(c_in: int, groups: int = 1, kernel: Sequence[int] = ()) -> int:
    """Weights in one output kernel: ``C_in/groups · prod(kernel)``."""
    _check_shape(c_in, groups, groups, kernel, ())
    return c_in // groups * math.prod(kernel)


def kernel_macs(c_in: int, groups: int = 1, kernel: Sequence[int] = (),
                out_spatial: Sequence[int] = ()) -> int:
    """MACs of one output channel: ``C_in/groups · prod(kernel) · prod(out_spatial)``."""
    _check_shape(c_in, groups, groups, kernel, out_spatial)
    return c_in // groups * math.prod(kernel) * math.prod(out_spatial)


def layer_macs(c_in: int, c_out: int, groups: int = 1, kernel: Sequence[int] = (),
               out_spatial: Sequence[int] = ()) -> int:
    """MACs of a conv (``C_in/g · C_out · kh·kw · H·W``) or linear layer (``C_in · C_out``).

    For a linear layer applied to extra leading dims (e.g. tokens), pass them as ``out_spatial``.
    """
    _check_shape(c_in, c_out, groups, kernel, out_spatial)
    return c_out * kernel_macs(c_in, groups, kernel, out_spatial)


def _as_mask(alive: int | Sequence[bool] | torch.Tensor, n: int, what: str) -> torch.Tensor:
    mask = torch.as_tensor(alive, dtype=torch.bool).flatten()
    if mask.numel() != n:
        raise NumericsError(f"{what} mask has {mask.numel()} entries, expected {n}")
    return mask


def kernel_macs_pruned(in_alive: Sequence[bool] | torch.Tensor, c_out: int, groups: int = 1,
                       kernel: Sequence[int] = (), out_spatial: Sequence[int] = ()) -> torch.Tensor:
    """MACs per output channel (int64, shape ``(c_out,)``) when some input channels are pruned.

    Output channel o of group g reads only the alive input channels of group g, so its MACs are
    ``alive_in(g) · prod(kernel) · prod(out_spatial)``. Which input channels are dead (0-bit
    kernels of the producing layer) is the graph's business; this only does the counting.
    """
    c_in = len(in_alive)
    _check_shape(c_in, c_out, groups, kernel, out_spatial)
    mask = _as_mask(in_alive, c_in, "input-channel")
    alive_per_group = mask.view(groups, c_in // groups).sum(dim=1, dtype=torch.int64)
    per_window = math.prod(kernel) * math.prod(out_spatial)
    return alive_per_group.repeat_interleave(c_out // groups) * per_window


def layer_macs_pruned(c_in_alive: int | Sequence[bool] | torch.Tensor,
                      c_out_alive: int | Sequence[bool] | torch.Tensor, groups: int = 1,
                      kernel: Sequence[int] = (), out_spatial: Sequence[int] = ()) -> int:
    """MACs of a layer with pruned input and/or output channels.

    With ``groups == 1`` the alive counts suffice: ``c_in_alive · c_out_alive · kh·kw · H·W``.
    With ``groups > 1`` the result depends on *which* channels are alive (a depthwise channel
    survives only if both its input and output do), so pass boolean masks (length C_in, C_out);
    counts are then refused. Masks are accepted for ``groups == 1`` too.
    """
    if isinstance(c_in_alive, int) and isinstance(c_out_alive, int):
        if groups != 1:
            raise NumericsError(f"layer_macs_pruned with groups={groups} needs boolean masks of "
                                "the alive input and output channels, not counts")
        return layer_macs(c_in_alive, c_out_alive, 1, kernel, out_spatial)
    if isinstance(c_in_alive, int) or isinstance(c_out_alive, int):
        raise NumericsError("layer_macs_pruned: pass both alive sets as counts or both as masks")
    out_mask = _as_mask(c_out_alive, len(c_out_alive), "output-channel")
    per_kernel = kernel_macs_pruned(c_in_alive, out_mask.numel(), groups, kernel, out_spatial)
    return int(per_kernel[out_mask].sum())


# --------------------------------------------------------------------------------------------
# BitOPs and size (integer or fractional, differentiable bits)
# --------------------------------------------------------------------------------------------

def _check_nonneg(x: BitsLike | Sequence[int], what: str) -> None:
    if isinstance(x, torch.Tensor):
        if bool((x.detach() < 0).any()):
            raise NumericsError(f"{what} must be >= 0 (0 means pruned), got a negative entry")
    elif isinstance(x, (int, float)):
        if x < 0:
            raise NumericsError(f"{what} must be >= 0 (0 means pruned), got {x}")
    elif any(v < 0 for v in x):
        raise NumericsError(f"{what} must be >= 0 (0 means pruned), got a negative entry")


def _is_vector(x: object) -> bool:
    return isinstance(x, Sequence) or (isinstance(x, torch.Tensor) and x.dim() > 0)


def _weighted_sum(per_kernel: int | Sequence[int] | torch.Tensor, w_bits: BitsLike | Sequence,
                  other: BitsLike, num_kernels: int | None, what: str) -> int | float | torch.Tensor:
    """``Σ_k per_kernel_k · w_bits_k · other`` with broadcasting and exact integer arithmetic.

    Without tensors the result is a Python int (all integers) or float. With any tensor it is a
    0-d tensor: int64 when every input is integral, else float64 (keeps 1e9-scale MAC counts
    precise; autograd casts the gradient back to λ's dtype).
    """
    _check_nonneg(w_bits, f"{what}: weight bits")
    _check_nonneg(other, f"{what}: activation/bias bits")
    if _is_vector(other):
        raise NumericsError(f"{what}: activation/bias bits must be a scalar per layer")
    if not _is_vector(per_kernel) and not _is_vector(w_bits):
        if num_kernels is None:
            raise NumericsError(f"{what}: per-kernel count and bits are both scalars; pass "
                                "num_kernels (the number of output channels)")
        scale = num_kernels
    else:
        scale = 1
        n = max(torch.as_tensor(per_kernel).numel(), torch.as_tensor(w_bits).numel())
        if num_kernels is not None and n != num_kernels:
            raise NumericsError(f"{what}: num_kernels={num_kernels} but vectors have {n} entries")
    tensors = [t for t in (per_kernel, w_bits, other) if isinstance(t, torch.Tensor)]
    if not tensors and not _is_vector(per_kernel) and not _is_vector(w_bits):
        return per_kernel * w_bits * other * scale  # plain Python numbers: exact for ints
    device = tensors[0].device if tensors else None
    integral = all(not torch.is_floating_point(torch.as_tensor(t))
                   for t in (per_kernel, w_bits, other))
    dtype = torch.int64 if integral else torch.float64
    pk = torch.as_tensor(per_kernel, device=device).to(dtype)
    wb = torch.as_tensor(w_bits, device=device).to(dtype)
    ot = torch.as_tensor(other, device=device).to(dtype)
    if pk.dim() > 1 or wb.dim() > 1 or (pk.dim() == wb.dim() == 1 and pk.numel() != wb.numel()):
        raise NumericsError(f"{what}: per-kernel counts {tuple(pk.shape)} and weight bits "
                            f"{tuple(wb.shape)} must be scalars or vectors of length C_out")
    total = (pk * wb).sum() * ot * scale
    return total if tensors else total.item()


def layer_bitops(macs_per_kernel: int | Sequence[int] | torch.Tensor,
                 w_bits: BitsLike | Sequence[int], a_bits: BitsLike,
                 num_kernels: int | None = None) -> int | float | torch.Tensor:
    """BitOPs of one layer: ``Σ_k MACs_k · b_w,k · b_a`` (FracBits Eq. 4-5).

    ``macs_per_kernel`` is the MACs of one output channel (scalar, e.g. :func:`kernel_macs`) or a
    vector of them (e.g. :func:`kernel_macs_pruned`). ``w_bits`` is a scalar or one bit-width per
    output kernel (0 = pruned, contributes 0); ``a_bits`` is the scalar bit-width of the layer's
    input. When both ``macs_per_kernel`` and ``w_bits`` are scalars, ``num_kernels`` (C_out) is
    required. With real-valued torch tensors the result is differentiable in λ_w and λ_a; because
    the cost is bilinear, this equals FracBits' bilinear interpolation over the integer grid.
    """
    return _weighted_sum(macs_per_kernel, w_bits, a_bits, num_kernels, "layer_bitops")


def layer_size_bits(params_per_kernel: int | Sequence[int] | torch.Tensor,
                    w_bits: BitsLike | Sequence[int], bias_count: int = 0, bias_bits: int = 32,
                    num_kernels: int | None = None) -> int | float | torch.Tensor:
    """Storage of one layer in bits: ``Σ_k params_k · b_w,k + bias_count · bias_bits``.

    FracBits' size convention: weights at their bit-width, biases as fp32
    (``bias_bits=32``), BN parameters not counted (fold them first or leave them out).
    ``bias_count`` is the number of stored bias elements (the caller decides whether biases of
    pruned kernels are kept). Scalar ``params_per_kernel`` and ``w_bits`` need ``num_kernels``.
    Differentiable in fractional ``w_bits`` tensors.
    """
    if bias_count < 0 or bias_bits < 0:
        raise NumericsError(f"bias_count={bias_count} and bias_bits={bias_bits} must be >= 0")
    weights = _weighted_sum(params_per_kernel, w_bits, 1, num_kernels, "layer_size_bits")
    return weights + bias_count * bias_bits


def product_macs(a_shape: Sequence[int], out_shape: Sequence[int],
                 rows_per_sample: int = 1) -> int:
    """MACs of an activation x activation product ``out = a @ b`` (matmul/bmm), per sample.

    ``prod(batch dims) · M · K · N`` with ``K = a_shape[-1]``, i.e. ``numel(out) · K``; like the
    conv/linear counts (``out_spatial`` excludes the batch), the leading dim of an output of rank
    >= 3 is the sample dim and is left out — ``rows_per_sample`` of its rows are one sample's
    (e.g. Swin's windows: batch·windows rows). A rank-1/2 output has no sample dim.
    """
    if len(a_shape) < 1 or len(out_shape) < 1 or rows_per_sample < 1:
        raise NumericsError(f"product_macs needs tensor shapes and rows_per_sample >= 1, got "
                            f"{a_shape}, {out_shape}, {rows_per_sample}")
    per_sample = out_shape[1:] if len(out_shape) >= 3 else out_shape
    rows = rows_per_sample if len(out_shape) >= 3 else 1
    return rows * int(math.prod(per_sample)) * int(a_shape[-1])


def product_bitops(macs: int, a_bits: BitsLike, b_bits: BitsLike) -> int | float | torch.Tensor:
    """BitOPs of an activation x activation product: ``MACs · b_a1 · b_a2`` (no weights)."""
    _check_nonneg(a_bits, "product_bitops a_bits")
    _check_nonneg(b_bits, "product_bitops b_bits")
    return macs * a_bits * b_bits


def bits_to_bytes(bits: int | float | torch.Tensor) -> float | torch.Tensor:
    """Bytes = bits / 8 (no rounding up: sizes are summed over the model first)."""
    return bits / 8


def bits_to_mb(bits: int | float | torch.Tensor) -> float | torch.Tensor:
    """Megabytes with MB = 1e6 bytes (FracBits' unit)."""
    return bits / 8 / 1e6


def to_giga(x: int | float | torch.Tensor) -> float | torch.Tensor:
    """GBitOPs / GMACs (×1e-9), the unit FracBits' κ and targets are expressed in."""
    return x / 1e9


# --------------------------------------------------------------------------------------------
# Accumulator width
# --------------------------------------------------------------------------------------------

def _long(x: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x)
    if torch.is_floating_point(t):
        if not bool((t == t.round()).all()):
            raise NumericsError("accumulator widths need integer bit-widths / zero points")
    return t.to(torch.int64)


def int_range(bits: int | Sequence[int] | torch.Tensor, signed: bool,
              narrow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer range ``(qmin, qmax)`` of an n-bit code, vectorized over ``bits``.

    Signed: ``[−2^{n−1}, 2^{n−1} − 1]`` (narrow: ``−2^{n−1} + 1``); unsigned: ``[0, 2^n − 1]``
    (narrow: ``[1, 2^n − 1]``). 0 bits (pruned) gives ``[0, 0]``.
    """
    n = _long(bits)
    if bool((n < 0).any()) or bool((n > 32).any()):
        raise NumericsError("bit-widths for accumulator bounds must lie in [0, 32]")
    one = torch.ones_like(n)
    if signed:
        half = torch.where(n > 0, one << (n - 1).clamp(min=0), torch.zeros_like(n))
        qmin, qmax = -half + (1 if narrow else 0) * (n > 0), half - 1 * (n > 0)
    else:
        top = (one << n) - 1
        qmin, qmax = (1 if narrow else 0) * (n > 0) * one, top
    return qmin, qmax


def signed_width(lo: int | torch.Tensor, hi: int | torch.Tensor) -> torch.Tensor:
    """Minimal two's-complement width P (>= 1) with ``−2^{P−1} <= lo`` and ``hi <= 2^{P−1} − 1``.

    ``P = 1 + max(bitlen(max(hi, 0)), bitlen(max(−lo − 1, 0)))``, computed exactly on int64
    (no floating log2). For a symmetric bound M = max|value| this is
    ``ceil(log2(M + 1)) + 1``, one bit less only when the most negative value is exactly
    ``−2^{P−1}``.
    """
    lo_t, hi_t = _long(lo), _long(hi)
    if bool((lo_t > hi_t).any()):
        raise NumericsError("signed_width: lo must be <= hi")
    pos = hi_t.clamp(min=0)
    neg = (-lo_t - 1).clamp(min=0)
    # bitlen(x) = #{k >= 0 : 2^k <= x}; searchsorted on exact int64 powers of two.
    powers = torch.tensor([1 << k for k in range(63)], dtype=torch.int64, device=pos.device)
    need = torch.maximum(torch.searchsorted(powers, pos, right=True),
                         torch.searchsorted(powers, neg, right=True))
    return need + 1


def _products(a_lo: torch.Tensor, a_hi: torch.Tensor, b_lo: torch.Tensor,
              b_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Range of a·b for a ∈ [a_lo, a_hi], b ∈ [b_lo, b_hi]: min/max over the four corners."""
    corners = torch.stack(torch.broadcast_tensors(a_lo * b_lo, a_lo * b_hi, a_hi * b_lo,
                                                  a_hi * b_hi))
    return corners.min(dim=0).values, corners.max(dim=0).values


def acc_range_worst_case(w_bits: int | Sequence[int] | torch.Tensor,
                         a_bits: int | torch.Tensor, fan_in: int | Sequence[int] | torch.Tensor,
                         w_signed: bool = True, a_signed: bool = False,
                         w_zero_point: int | Sequence[int] | torch.Tensor = 0,
                         a_zero_point: int | torch.Tensor = 0, w_narrow: bool = False,
                         a_narrow: bool = False,
                         bias_abs_max: int | Sequence[int] | torch.Tensor = 0,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``(min, max)`` of ``Σ_{i<K} (w_i − z_w)(x_i − z_x) + b`` over all codes.

    Each factor ranges over ``[qmin − z, qmax − z]`` (see :func:`int_range`); every term takes
    values in ``[p_min, p_max]`` = the extreme corner products, and all K terms can reach the
    same corner at once, so the sum ranges exactly over ``[K·p_min − |b|, K·p_max + |b|]``.
    Vectorized: ``w_bits``, ``w_zero_point``, ``fan_in`` and ``bias_abs_max`` may be per kernel.
    A 0-bit (pruned) kernel has no weight terms.
    """
    w_lo, w_hi = int_range(w_bits, w_signed, w_narrow)
    a_lo, a_hi = int_range(a_bits, a_signed, a_narrow)
    zw, za, k, b = _long(w_zero_point), _long(a_zero_point), _long(fan_in), _long(bias_abs_max)
    if bool((k < 0).any()) or bool((b < 0).any()):
        raise NumericsError("fan_in and bias_abs_max must be >= 0")
    pruned = _long(w_bits) == 0
    w_lo, w_hi = torch.where(pruned, 0, w_lo - zw), torch.where(pruned, 0, w_hi - zw)
    a_lo, a_hi = a_lo - za, a_hi - za
    # Checked in float64 first: the int64 products below must not wrap around.
    bound = (torch.maximum(w_lo.abs(), w_hi.abs()).double()
             * torch.maximum(a_lo.abs(), a_hi.abs()).double() * k.double() + b.double()).max()
    if float(bound) >= _INT64_SAFE:
        raise NumericsError("accumulator bound exceeds int64; operands too wide")
    p_lo, p_hi = _products(w_lo, w_hi, a_lo, a_hi)
    return k * p_lo - b, k * p_hi + b


def acc_bits_worst_case(w_bits: int | Sequence[int] | torch.Tensor,
                        a_bits: int | torch.Tensor, fan_in: int | Sequence[int] | torch.Tensor,
                        w_signed: bool = True, a_signed: bool = False,
                        w_zero_point: int | Sequence[int] | torch.Tensor = 0,
                        a_zero_point: int | torch.Tensor = 0, w_narrow: bool = False,
                        a_narrow: bool = False,
                        bias_abs_max: int | Sequence[int] | torch.Tensor = 0) -> torch.Tensor:
    """Data-free minimal signed accumulator width, per kernel when bits are per kernel.

    ``signed_width(*acc_range_worst_case(...))``. Example: K = 3·3·512, W8 signed, A8
    unsigned → range ``[−4608·128·255, 4608·127·255]`` → 29 bits. Returns an int64 tensor
    (0-d for scalar inputs); the layer's width is its max. A pruned kernel's accumulator is
    constant (its bias), 1 bit when there is no bias.
    """
    lo, hi = acc_range_worst_case(w_bits, a_bits, fan_in, w_signed, a_signed, w_zero_point,
                                  a_zero_point, w_narrow, a_narrow, bias_abs_max)
    return signed_width(lo, hi)


def acc_bits_distiller(w_bits: int, a_bits: int, fan_in: int) -> int:
    """Distiller's conservative rule: ``n_w + n_a + ceil(log2 K)``.

    Never below :func:`acc_bits_worst_case` when at least one operand is signed and zero points
    are 0; for unsigned × unsigned operands into a *signed* accumulator it can be one bit short
    (e.g. 2-bit × 2-bit, K = 1: 3·3 = 9 needs 5 signed bits, the rule gives 4).
    """
    if fan_in < 1:
        raise NumericsError(f"fan_in must be >= 1, got {fan_in}")
    return w_bits + a_bits + math.ceil(math.log2(fan_in))


def acc_range_data(int_weight: torch.Tensor, a_qmin: int, a_qmax: int, a_zero_point: int = 0,
                   int_bias: torch.Tensor | Sequence[int] | None = None,
                   w_zero_point: int | Sequence[int] | torch.Tensor = 0,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight per-channel ``(min, max)`` of the accumulator given the integer weights.

    With ``v = w − z_w`` for output channel j (flattened over its fan-in), activation offsets
    ``x − z_x ∈ [lo, hi] = [a_qmin − z_x, a_qmax − z_x]`` chosen independently per term, and
    ``S⁺_j = Σ_{v>0} v``, ``S⁻_j = Σ_{v<0} |v|``:

        max_j = S⁺_j·hi − S⁻_j·lo + b_j,    min_j = S⁺_j·lo − S⁻_j·hi + b_j.

    Both are attained (set x = hi where v > 0 and lo where v < 0, and vice versa), so the bound
    is tight; for unsigned inputs with z_x = 0 it is the A2Q-style ``max(S⁺, S⁻)·(2^N − 1) + |b|``
    refined to the sign-aware interval. Returns int64 tensors of shape ``(C_out,)``.
    """
    w = _long(int_weight)
    if w.dim() < 1:
        raise NumericsError("int_weight must have the output channels on dim 0")
    if a_qmin > a_qmax:
        raise NumericsError(f"a_qmin={a_qmin} > a_qmax={a_qmax}")
    c_out = w.shape[0]
    v = w.reshape(c_out, -1) - _long(w_zero_point).reshape(-1, 1)
    lo, hi = a_qmin - a_zero_point, a_qmax - a_zero_point
    s_pos = v.clamp(min=0).sum(dim=1)
    s_neg = (-v).clamp(min=0).sum(dim=1)
    b = torch.zeros(c_out, dtype=torch.int64) if int_bias is None else _long(int_bias).reshape(-1)
    if b.numel() != c_out:
        raise NumericsError(f"int_bias has {b.numel()} entries, expected {c_out}")
    if c_out and (float((s_pos + s_neg).max()) * max(abs(lo), abs(hi))
                  + float(b.abs().max())) >= _INT64_SAFE:
        raise NumericsError("accumulator bound exceeds int64; operands too wide")
    return s_pos * lo - s_neg * hi + b, s_pos * hi - s_neg * lo + b


def acc_bits_data(int_weight: torch.Tensor, a_qmin: int, a_qmax: int, a_zero_point: int = 0,
                  int_bias: torch.Tensor | Sequence[int] | None = None,
                  w_zero_point: int | Sequence[int] | torch.Tensor = 0) -> torch.Tensor:
    """Data-aware minimal signed accumulator width per output channel.

    ``signed_width(*acc_range_data(...))``; always <= :func:`acc_bits_worst_case` for the same
    ranges. Report ``.max()`` per layer. Shape ``(C_out,)``, int64.
    """
    lo, hi = acc_range_data(int_weight, a_qmin, a_qmax, a_zero_point, int_bias, w_zero_point)
    return signed_width(lo, hi)
