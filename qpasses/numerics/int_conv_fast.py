"""Fast exact integer conv/linear accumulators with prepared (cached) weights.

Same contract as :func:`qpasses.numerics.int_ops.int_conv` / ``int_linear`` — ``acc = Σ (x − z_x)(w −
z_w)`` exactly, as int64 — but organised for speed: the weights are converted once
(:func:`prepare_conv` / :func:`prepare_linear`) and activations never go through int64 im2col.

Kernels (each exact only under the bound the caller proved, see ``int_ops.choose_kernel``):

``int8-mm``  activations are shifted by a constant ``c`` into int8 (``x − c``, ``c`` from the
             declared input range, padding filled with ``z_x − c`` so it contributes nothing),
             im2col in int8, ``torch._int_mm`` (int8 × int8 → int32; every partial sum within
             int32 by the bound), then ``+ (c − z_x)·Σ_k w`` per output channel. Groups run one
             ``_int_mm`` each (use it for few groups).
``float32``  float GEMM (BLAS) on float im2col of ``x − z_x``; exact when every partial sum is an
``float64``  integer below 2^24 / 2^53, whatever the summation order. Depthwise convolutions use a
             sum over kernel offsets of strided slices times per-channel weights instead (also a
             sum of integer products under the same bound).

Library convolutions are never used (they may choose Winograd/FFT, which are not exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qpasses.errors import NumericsError

__all__ = ["PreparedConv", "PreparedLinear", "fast_conv", "fast_linear", "input_offset",
           "prepare_conv", "prepare_linear"]

_FLOAT = {"float32": torch.float32, "float64": torch.float64}


def input_offset(qmin: int, qmax: int) -> int:
    """``c`` such that ``[qmin − c, qmax − c]`` lies in int8 (needs ``qmax − qmin <= 255``)."""
    if qmax - qmin > 255:
        raise NumericsError(f"int8-mm: input range [{qmin}, {qmax}] is wider than 8 bits")
    c = (qmin + qmax + 1) // 2
    if qmin - c < -128:
        c = qmin + 128
    if qmax - c > 127:
        c = qmax - 127
    return c


@dataclass
class PreparedConv:
    kernel: str
    groups: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    out_channels: int
    w_mats: list[Tensor]          # per group: int8 (K_pad, O_g) for int8-mm, float (K, O_g) else
    w_colsum: Tensor              # int64 (O,): Σ_k (w − z_w)
    w_dw: Tensor | None           # depthwise float weights (C, *k)
    x_offset: int
    k_pad: int


@dataclass
class PreparedLinear:
    kernel: str
    w_mat: Tensor
    w_colsum: Tensor
    x_offset: int
    k_pad: int


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _centered(w: Tensor, w_zp: Tensor | int) -> Tensor:
    wz = torch.as_tensor(w_zp, dtype=torch.int64)
    return w.to(torch.int64) - (wz.reshape(-1, *([1] * (w.dim() - 1))) if wz.dim() and
                                wz.numel() > 1 else wz.reshape(()))


def prepare_conv(w: Tensor, w_zp: Tensor | int, *, kernel: str, stride: int | Sequence[int],
                 padding: int | Sequence[int], dilation: int | Sequence[int], groups: int,
                 x_qmin: int, x_qmax: int) -> PreparedConv:
    nd = w.dim() - 2
    ws = _centered(w, w_zp)
    o, cg = ws.shape[:2]
    k = cg * math.prod(ws.shape[2:])
    og = o // groups
    colsum = ws.reshape(o, -1).sum(1)
    mats: list[Tensor] = []
    w_dw = None
    k_pad = 0
    x_offset = 0
    if kernel == "int8-mm":
        if int(ws.min()) < -128 or int(ws.max()) > 127:
            raise NumericsError("int8-mm: centred weight codes do not fit int8")
        x_offset = input_offset(x_qmin, x_qmax)
        k_pad = (-k) % 8
        for g in range(groups):
            m = ws[g * og:(g + 1) * og].reshape(og, k).t().to(torch.int8)
            n_pad = (-og) % 8
            m = F.pad(m, (0, n_pad, 0, k_pad))
            mats.append(m.contiguous())
    elif kernel in _FLOAT:
        dt = _FLOAT[kernel]
        if cg == 1 and groups == o:
            w_dw = ws.reshape(o, *ws.shape[2:]).to(dt)
        else:
            for g in range(groups):
                mats.append(ws[g * og:(g + 1) * og].reshape(og, k).t().to(dt).contiguous())
    else:
        raise NumericsError(f"no fast conv kernel {kernel!r}")
    return PreparedConv(kernel, groups, tuple(ws.shape[2:]), _tuple(stride, nd),
                        _tuple(padding, nd), _tuple(dilation, nd), o, mats, colsum, w_dw,
                        x_offset, k_pad)


def _to_int8(x: Tensor, c: int) -> Tensor:
    """``(x − c)`` as int8 for codes with ``x − c`` in int8, without an int64 temporary: a plain
    cast for c = 0, ``uint8(x) XOR 0x80`` reinterpreted as int8 for c = 128."""
    if c == 0:
        return x.to(torch.int8)
    if c == 128:
        return (x.to(torch.uint8) ^ 128).view(torch.int8)
    return (x - c).to(torch.int8)


def _im2col(x: Tensor, p: PreparedConv) -> tuple[Tensor, tuple[int, ...]]:
    """(N, C, *S) padded input -> (N·L, C·prod(k)) contiguous patches, channel-major."""
    nd = len(p.kernel_size)
    cols = x
    for d in range(nd):
        span = p.dilation[d] * (p.kernel_size[d] - 1) + 1
        cols = cols.unfold(2 + d, span, p.stride[d])
        if p.dilation[d] > 1:
            cols = cols[..., ::p.dilation[d]]
    n, c = cols.shape[:2]
    outs = tuple(cols.shape[2:2 + nd])
    cols = cols.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return cols.reshape(n * math.prod(outs), c * math.prod(p.kernel_size)), outs


def _pad(x: Tensor, padding: tuple[int, ...], value: float) -> Tensor:
    if not any(padding):
        return x
    pads: list[int] = []
    for q in reversed(padding):
        pads += [q, q]
    return F.pad(x, pads, value=value)


def fast_conv(x: Tensor, p: PreparedConv, x_zero_point: int,
              add: Tensor | None = None) -> Tensor:
    """``Σ (x − z_x)(w − z_w)`` [+ ``add``, a per-output-channel int64 vector such as the bias]
    as int64 of shape (N, O, *out)."""
    n = x.shape[0]
    nd = len(p.kernel_size)
    if p.kernel == "int8-mm":
        c = p.x_offset
        x8 = _to_int8(x, c)
        x8 = _pad(x8, p.padding, x_zero_point - c)
        cg = x.shape[1] // p.groups
        og = p.out_channels // p.groups
        outs_g = []
        out_sizes: tuple[int, ...] = ()
        for g in range(p.groups):
            xg = x8 if p.groups == 1 else x8[:, g * cg:(g + 1) * cg]
            cols, out_sizes = _im2col(xg, p)
            if p.k_pad:
                cols = F.pad(cols, (0, p.k_pad))
            m = cols.shape[0]
            if m <= 16:
                cols = F.pad(cols, (0, 0, 0, 17 - m))
            res = torch._int_mm(cols, p.w_mats[g])[:m, :og]
            outs_g.append(res)
        acc32 = outs_g[0] if p.groups == 1 else torch.cat(outs_g, 1)
        corr = (c - x_zero_point) * p.w_colsum if c != x_zero_point else None
        if add is not None:
            corr = add if corr is None else corr + add
        # int32 + int64 vector -> int64 in one pass
        acc = acc32 + corr if corr is not None else acc32.to(torch.int64)
        return acc.reshape(n, *out_sizes, p.out_channels).permute(0, nd + 1, *range(1, nd + 1))
    dt = _FLOAT[p.kernel]
    xs = _pad((x - x_zero_point).to(dt), p.padding, 0.0)
    if p.w_dw is not None:
        acc = _depthwise(xs, p).round().to(torch.int64)
        return acc if add is None else acc + add.reshape(1, -1, *([1] * nd))
    cg = x.shape[1] // p.groups
    outs_g = []
    out_sizes = ()
    for g in range(p.groups):
        xg = xs if p.groups == 1 else xs[:, g * cg:(g + 1) * cg]
        cols, out_sizes = _im2col(xg, p)
        outs_g.append(cols @ p.w_mats[g])
    acc = (outs_g[0] if p.groups == 1 else torch.cat(outs_g, 1)).round().to(torch.int64)
    if add is not None:
        acc += add
    return acc.reshape(n, *out_sizes, p.out_channels).permute(0, nd + 1, *range(1, nd + 1))


def _depthwise(xs: Tensor, p: PreparedConv) -> Tensor:
    """Σ over kernel offsets of strided slices times per-channel weights (exact under the
    bound: every partial sum is an integer below 2^24 / 2^53)."""
    nd = len(p.kernel_size)
    sizes = [(xs.shape[2 + d] - p.dilation[d] * (p.kernel_size[d] - 1) - 1) // p.stride[d] + 1
             for d in range(nd)]
    acc = None
    w = p.w_dw
    assert w is not None
    import itertools
    for off in itertools.product(*[range(k) for k in p.kernel_size]):
        idx = tuple(slice(off[d] * p.dilation[d],
                          off[d] * p.dilation[d] + p.stride[d] * (sizes[d] - 1) + 1, p.stride[d])
                    for d in range(nd))
        wk = w[(slice(None),) + off].reshape(1, -1, *([1] * nd))
        term = xs[(slice(None), slice(None)) + idx] * wk
        acc = term if acc is None else acc.add_(term)
    return acc


def prepare_linear(w: Tensor, w_zp: Tensor | int, *, kernel: str, x_qmin: int,
                   x_qmax: int) -> PreparedLinear:
    ws = _centered(w, w_zp)
    colsum = ws.sum(1)
    if kernel == "int8-mm":
        if int(ws.min()) < -128 or int(ws.max()) > 127:
            raise NumericsError("int8-mm: centred weight codes do not fit int8")
        k_pad = (-ws.shape[1]) % 8
        n_pad = (-ws.shape[0]) % 8
        m = F.pad(ws.t().to(torch.int8), (0, n_pad, 0, k_pad)).contiguous()
        return PreparedLinear(kernel, m, colsum, input_offset(x_qmin, x_qmax), k_pad)
    if kernel in _FLOAT:
        return PreparedLinear(kernel, ws.t().to(_FLOAT[kernel]).contiguous(), colsum, 0, 0)
    raise NumericsError(f"no fast linear kernel {kernel!r}")


def fast_linear(x: Tensor, p: PreparedLinear, x_zero_point: int,
                add: Tensor | None = None) -> Tensor:
    """``(x − z_x)(w − z_w)ᵀ`` [+ ``add`` per output feature] as int64."""
    lead = x.shape[:-1]
    o = p.w_colsum.numel()
    if p.kernel == "int8-mm":
        c = p.x_offset
        a = _to_int8(x.reshape(-1, x.shape[-1]), c)
        if p.k_pad:
            a = F.pad(a, (0, p.k_pad))
        m = a.shape[0]
        if m <= 16:
            a = F.pad(a, (0, 0, 0, 17 - m))
        acc32 = torch._int_mm(a.contiguous(), p.w_mat)[:m, :o]
        corr = (c - x_zero_point) * p.w_colsum if c != x_zero_point else None
        if add is not None:
            corr = add if corr is None else corr + add
        acc = acc32 + corr if corr is not None else acc32.to(torch.int64)
        return acc.reshape(*lead, o)
    a = (x.reshape(-1, x.shape[-1]) - x_zero_point).to(p.w_mat.dtype)
    acc = (a @ p.w_mat).round().to(torch.int64)
    if add is not None:
        acc += add
    return acc.reshape(*lead, o)
