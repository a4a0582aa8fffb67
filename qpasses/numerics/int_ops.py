"""Exact integer kernels for the integer simulation: conv/linear accumulators, pooling, lookup tables.

Pure tensor math. Two families with one contract, ``acc = Σ (x − z_x)(w − z_w) + bias`` computed
exactly:

* ``reference`` — int64 tensors only: im2col by ``Tensor.unfold`` (a view, any dtype) and an int64
  matmul. Obviously correct, slow.
* fast kernels — the same integers on fast hardware paths, each exact only under a bound the
  caller proves (the accumulator-width analysis):
    ``int8-mm``  ``torch._int_mm`` (int8 × int8 → int32) on im2col; operands must fit int8 after
                 an exact offset (unsigned inputs are shifted by −128 and corrected per channel),
                 every partial sum must fit int32.
    ``float32``  float32 GEMM on im2col: exact when every partial sum is an integer below 2^24 in
                 magnitude, whatever the summation order (bound: ``L1(w) · max|x| + |b|``).
    ``float64``  the same below 2^53.
  Convolutions always go through explicit im2col + GEMM: library convolutions may pick Winograd or
  FFT algorithms, which are not exact on integers (and TF32 on GPU truncates mantissas).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qpasses.errors import NumericsError

__all__ = ["FAST_KERNELS", "STORAGE_INT_DTYPES", "choose_kernel", "exactness_bound",
           "int_avg_pool_sum", "int_conv", "int_linear", "int_max_pool", "build_lut", "apply_lut",
           "codes_dtype", "narrow_int", "narrowest_int_dtype"]

FAST_KERNELS = ("int8-mm", "float32", "float64")
_FLOAT32_EXACT = 2 ** 24
_FLOAT64_EXACT = 2 ** 53
_INT32_MAX = 2 ** 31 - 1


# storage dtypes of integer constants (weight codes), narrowest first; the kernels widen to int64
STORAGE_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def narrowest_int_dtype(lo: int, hi: int) -> torch.dtype:
    """The narrowest signed integer dtype holding every integer in ``[lo, hi]`` (int8, int16,
    int32, else int64)."""
    for dt in STORAGE_INT_DTYPES:
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return torch.int64


def codes_dtype(t: Tensor) -> torch.dtype:
    """:func:`narrowest_int_dtype` of the values of the integer tensor ``t`` (int8 when empty)."""
    _check_int(t, "codes_dtype: t")
    if not t.numel():
        return torch.int8
    lo, hi = torch.aminmax(t)       # one full reduction (exact)
    return narrowest_int_dtype(int(lo), int(hi))


def narrow_int(t: Tensor) -> Tensor:
    """``t`` (integer) in :func:`codes_dtype`: the same integers, stored in 1, 2 or 4 bytes
    instead of 8 (``t`` itself when it already has that dtype)."""
    return t.to(codes_dtype(t))


def _tuple(v: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    out = tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n
    if len(out) != n:
        raise NumericsError(f"{name} needs {n} values, got {out}")
    return out


def _check_int(t: Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise NumericsError(f"{name} must be an integer tensor, got {t.dtype}")


def _im2col(x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...],
            dilation: tuple[int, ...]) -> Tensor:
    """(N, C, *S) padded input -> (N, L, C·prod(kernel)) patches, channel-major like conv weights."""
    nd = len(kernel)
    cols = x
    for d in range(nd):
        span = dilation[d] * (kernel[d] - 1) + 1
        cols = cols.unfold(2 + d, span, stride[d])          # (..., out_d, ..., span_d)
        if dilation[d] > 1:
            cols = cols[..., ::dilation[d]]
    # cols: (N, C, out_1..out_nd, k_1..k_nd) -> (N, L, C·k)
    n, c = cols.shape[:2]
    out_sizes = cols.shape[2:2 + nd]
    cols = cols.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return cols.reshape(n, math.prod(out_sizes), c * math.prod(kernel)), tuple(out_sizes)


def _pad(x: Tensor, padding: tuple[int, ...]) -> Tensor:
    if not any(padding):
        return x
    pads: list[int] = []
    for p in reversed(padding):
        pads += [p, p]
    return F.pad(x, pads, value=0)


def int_conv(x: Tensor, w: Tensor, bias: Tensor | None = None, *, stride: int | Sequence[int] = 1,
             padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, groups: int = 1,
             x_zero_point: int = 0, w_zero_point: int | Tensor = 0,
             kernel: str = "reference") -> Tensor:
    """Integer N-d convolution accumulator, int64 result of shape (N, O, *out).

    ``x``: integer codes (N, C, *S); ``w``: integer codes (O, C/groups, *k); ``bias``: int64 (O,)
    already in accumulator units (scale s_x·s_w). Padding contributes zero (it pads ``x − z_x``),
    as in TFLite/fbgemm. ``kernel``: ``reference`` or one of :data:`FAST_KERNELS`; a fast kernel is
    exact only if the caller proved its bound (see :func:`choose_kernel`).
    """
    _check_int(x, "x")
    _check_int(w, "w")
    nd = w.dim() - 2
    if nd < 1 or x.dim() != nd + 2:
        raise NumericsError(f"int_conv: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    stride_t, pad_t = _tuple(stride, nd, "stride"), _tuple(padding, nd, "padding")
    dil_t = _tuple(dilation, nd, "dilation")
    o, cg = w.shape[:2]
    if x.shape[1] != cg * groups or o % groups:
        raise NumericsError(f"int_conv: {x.shape[1]} input channels, weight {tuple(w.shape)} and "
                            f"groups={groups} do not match")
    xs = x.to(torch.int64) - int(x_zero_point)
    wz = torch.as_tensor(w_zero_point, dtype=torch.int64)
    ws = w.to(torch.int64) - (wz.reshape(-1, *([1] * (nd + 1))) if wz.dim() else wz)
    cols, out_sizes = _im2col(_pad(xs, pad_t), tuple(w.shape[2:]), stride_t, dil_t)
    n, length, _ = cols.shape
    cols = cols.reshape(n, length, groups, -1)               # (N, L, g, C/g·k)
    wmat = ws.reshape(groups, o // groups, -1)               # (g, O/g, C/g·k)
    acc = _grouped_matmul(cols, wmat, kernel)                # (N, L, g, O/g) int64
    acc = acc.reshape(n, length, o).permute(0, 2, 1).reshape(n, o, *out_sizes)
    if bias is not None:
        _check_int(bias, "bias")
        acc = acc + bias.to(torch.int64).reshape(1, o, *([1] * nd))
    return acc


def int_linear(x: Tensor, w: Tensor, bias: Tensor | None = None, *, x_zero_point: int = 0,
               w_zero_point: int | Tensor = 0, kernel: str = "reference") -> Tensor:
    """Integer linear accumulator ``(x − z_x)(w − z_w)ᵀ + bias`` over the last dim, int64."""
    _check_int(x, "x")
    _check_int(w, "w")
    if x.shape[-1] != w.shape[1]:
        raise NumericsError(f"int_linear: x {tuple(x.shape)} and w {tuple(w.shape)} do not match")
    lead = x.shape[:-1]
    xs = x.reshape(1, -1, 1, x.shape[-1]).to(torch.int64) - int(x_zero_point)
    wz = torch.as_tensor(w_zero_point, dtype=torch.int64)
    ws = w.to(torch.int64) - (wz.reshape(-1, 1) if wz.dim() else wz)
    acc = _grouped_matmul(xs, ws.unsqueeze(0), kernel).reshape(*lead, w.shape[0])
    if bias is not None:
        _check_int(bias, "bias")
        acc = acc + bias.to(torch.int64)
    return acc


def _grouped_matmul(cols: Tensor, wmat: Tensor, kernel: str) -> Tensor:
    """cols (N, L, g, K) int64 · wmat (g, O, K) int64 -> (N, L, g, O) int64, exactly."""
    if kernel == "reference":
        return torch.einsum("nlgk,gok->nlgo", cols, wmat)
    if kernel in ("float32", "float64"):
        dt = torch.float32 if kernel == "float32" else torch.float64
        out = torch.einsum("nlgk,gok->nlgo", cols.to(dt), wmat.to(dt))
        return out.round().to(torch.int64)   # exact integers already; round() guards -0.0
    if kernel == "int8-mm":
        return _int8_matmul(cols, wmat)
    raise NumericsError(f"unknown integer kernel '{kernel}' (valid: reference, "
                        f"{', '.join(FAST_KERNELS)})")


def _int8_matmul(cols: Tensor, wmat: Tensor) -> Tensor:
    """torch._int_mm per group. Inputs outside int8 are offset by a constant c (exact):
    Σ x·w = Σ (x − c)·w + c·Σ w."""
    n, length, g, k = cols.shape
    lo, hi = int(cols.min()) if cols.numel() else 0, int(cols.max()) if cols.numel() else 0
    offset = 0
    if lo < -128 or hi > 127:
        offset = (lo + hi + 1) // 2
        if lo - offset < -128 or hi - offset > 127:
            raise NumericsError(f"int8-mm: input codes span [{lo}, {hi}], wider than 8 bits")
    if wmat.numel() and (int(wmat.min()) < -128 or int(wmat.max()) > 127):
        raise NumericsError("int8-mm: weight codes do not fit int8")
    a = (cols - offset).to(torch.int8).permute(2, 0, 1, 3).reshape(g, n * length, k)
    b = wmat.to(torch.int8)
    outs = []
    # _int_mm needs M > 16 and K, N multiples of 8 on some builds: pad K and N with zeros (exact).
    k_pad = (-k) % 8
    for gi in range(g):   # loop over groups (few), never over channels or pixels
        ag, bg = a[gi], b[gi].t()
        m = ag.shape[0]
        if k_pad:
            ag = F.pad(ag, (0, k_pad))
            bg = F.pad(bg, (0, 0, 0, k_pad))
        n_out = bg.shape[1]
        n_pad = (-n_out) % 8
        if n_pad:
            bg = F.pad(bg, (0, n_pad))
        m_pad = max(0, 17 - m)
        if m_pad:
            ag = F.pad(ag, (0, 0, 0, m_pad))
        out = torch._int_mm(ag.contiguous(), bg.contiguous())[:m, :n_out]
        outs.append(out.to(torch.int64))
    acc = torch.stack(outs).reshape(g, n, length, -1).permute(1, 2, 0, 3)
    if offset:
        acc = acc + offset * wmat.sum(-1).reshape(1, 1, g, -1)
    return acc


def exactness_bound(w: Tensor, x_absmax: int, bias_absmax: int = 0,
                    w_zero_point: int | Tensor = 0) -> int:
    """Largest |partial sum| any summation order can produce: ``max_o L1(w_o − z_w) · max|x| + |b|``.
    Temporaries are bounded by chunks of output channels (never an int64 copy of all of ``w``)."""
    wz = torch.as_tensor(w_zero_point, dtype=torch.int64)
    if not w.numel():
        return int(bias_absmax)
    flat = w.reshape(w.shape[0], -1)
    wz = wz.reshape(-1, 1) if wz.numel() > 1 else wz.reshape(())
    step = max(1, (1 << 22) // max(flat.shape[1], 1))
    l1 = 0
    for i in range(0, flat.shape[0], step):     # chunks of rows, not single channels
        z = wz[i:i + step] if wz.dim() else wz
        l1 = max(l1, int((flat[i:i + step].to(torch.int64) - z).abs().sum(1).max()))
    return l1 * int(x_absmax) + int(bias_absmax)


def choose_kernel(bound: int, x_bits: int, w_bits: int, *, allow_int8: bool = True) -> str:
    """The fastest kernel that is provably exact for a layer.

    ``bound`` from :func:`exactness_bound` (or the accumulator-width analysis); ``x_bits``/``w_bits``
    the widths of the operands after zero-point subtraction (int8-mm needs both ≤ 8 after the
    offset, and ``bound`` within int32).
    """
    if allow_int8 and x_bits <= 8 and w_bits <= 8 and bound <= _INT32_MAX:
        return "int8-mm"
    if bound < _FLOAT32_EXACT:
        return "float32"
    if bound < _FLOAT64_EXACT:
        return "float64"
    return "reference"


def int_max_pool(x: Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
                 ceil_mode: bool = False, pad_value: int | None = None) -> Tensor:
    """Max pooling on integer codes (monotone, so it commutes with quantization). int64 result.

    Padding uses ``pad_value`` (default: the smallest int64, i.e. never selected, as in PyTorch).
    """
    _check_int(x, "x")
    nd = x.dim() - 2
    k = _tuple(kernel_size, nd, "kernel_size")
    s = _tuple(stride if stride is not None else kernel_size, nd, "stride")
    p, d = _tuple(padding, nd, "padding"), _tuple(dilation, nd, "dilation")
    fill = torch.iinfo(torch.int64).min if pad_value is None else pad_value
    xs = x.to(torch.int64)
    if any(p) or ceil_mode:
        pads: list[int] = []
        for i in reversed(range(nd)):
            extra = 0
            if ceil_mode:
                size = x.shape[2 + i] + 2 * p[i]
                span = d[i] * (k[i] - 1) + 1
                out = -(-(size - span) // s[i]) + 1
                if (out - 1) * s[i] >= x.shape[2 + i] + p[i]:
                    out -= 1
                extra = max(0, (out - 1) * s[i] + span - size)
            pads += [p[i], p[i] + extra]
        xs = F.pad(xs, pads, value=fill)
    cols = xs
    for i in range(nd):
        span = d[i] * (k[i] - 1) + 1
        cols = cols.unfold(2 + i, span, s[i])
        if d[i] > 1:
            cols = cols[..., ::d[i]]
    return cols.flatten(-nd).amax(-1)


def int_avg_pool_sum(x: Tensor, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None,
                     padding: int | Sequence[int] = 0) -> tuple[Tensor, Tensor]:
    """Window sums of ``x`` (int64) and the number of non-padding elements per window.

    The caller multiplies the sum by a fixed-point reciprocal of the count (count_include_pad=False)
    or of prod(kernel) (count_include_pad=True) and requantizes.
    """
    _check_int(x, "x")
    nd = x.dim() - 2
    k = _tuple(kernel_size, nd, "kernel_size")
    s = _tuple(stride if stride is not None else kernel_size, nd, "stride")
    p = _tuple(padding, nd, "padding")
    xs = _pad(x.to(torch.int64), p)
    ones = _pad(torch.ones((1, 1, *x.shape[2:]), dtype=torch.int64), p)
    sums, counts = xs, ones
    for i in range(nd):
        sums = sums.unfold(2 + i, k[i], s[i])
        counts = counts.unfold(2 + i, k[i], s[i])
    return sums.flatten(-nd).sum(-1), counts.flatten(-nd).sum(-1)


def build_lut(fn: Callable[[Tensor], Tensor], in_scale: float, in_zero_point: int, in_qmin: int,
              in_qmax: int, out_scale: float, out_zero_point: int, out_qmin: int,
              out_qmax: int) -> Tensor:
    """Exact lookup table of an elementwise function over every input code (≤ 16-bit ranges).

    ``table[q − in_qmin] = clamp(rne(fn(s_in·(q − z_in)) / s_out) + z_out)``, computed in float64.
    """
    if in_qmax - in_qmin + 1 > 2 ** 16:
        raise NumericsError(f"lookup tables cover at most 16-bit inputs, got [{in_qmin}, {in_qmax}]")
    if not (in_scale > 0 and out_scale > 0):
        raise NumericsError("lookup-table scales must be > 0")
    codes = torch.arange(in_qmin, in_qmax + 1, dtype=torch.float64)
    real = fn((codes - in_zero_point) * in_scale)
    q = torch.round(real / out_scale) + out_zero_point
    return q.clamp(out_qmin, out_qmax).to(torch.int64)


def apply_lut(q: Tensor, table: Tensor, in_qmin: int) -> Tensor:
    """``table[q − in_qmin]`` elementwise (int64)."""
    _check_int(q, "q")
    idx = q.to(torch.int64) - in_qmin
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= table.numel()):
        raise NumericsError("lookup-table input outside the table's range")
    return table[idx]
