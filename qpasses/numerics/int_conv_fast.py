"""Fast exact integer conv/linear accumulators with prepared (cached) weights.

Same integers as :func:`qpasses.numerics.int_ops.int_conv` / ``int_linear`` — ``Σ (x − z_x)(w − z_w)``
exactly — organised for speed: the weights are converted once (:func:`prepare_conv` /
:func:`prepare_linear`), activations of any integer dtype are read channels-last (``NHWC``; the
integer simulation's fast backend keeps them in that memory layout), and the accumulators come out
as *rows* ``(pixels, out channels)``, the layout the fused requantization and the next layer want.
:func:`conv_blocks` / :func:`linear_blocks` produce them block by block (patches gathered and
multiplied into reused scratch buffers, so the working set stays in cache) with
``Σ (x − z_x)(w − z_w) = acc + offset[channel]`` exactly; the caller adds ``offset`` (with the bias)
inside its requantization pass, so no int64 accumulator is ever materialised. :func:`conv_rows`,
:func:`fast_conv` and friends assemble the blocks into ordinary tensors.

Kernels (each exact only under the bound the caller proved, see ``int_ops.choose_kernel``):

``int8-mm``  activations are shifted by a constant ``c`` into int8 (``x − c``, ``c`` from the
             declared input range; ``uint8`` codes with ``c = 128`` by flipping the top bit),
             padding is filled with ``z_x − c`` so it contributes nothing, patches in int8,
             ``torch._int_mm`` (int8 × int8 → int32; every partial sum within int32 by the bound);
             ``offset = (c − z_x)·Σ_k w``. Groups run one ``_int_mm`` each (use it for few groups).
``float32``  float GEMM (BLAS) on float patches of ``x − z_x``; exact when every partial sum is an
``float64``  integer below 2^24 / 2^53, whatever the summation order. Depthwise convolutions use a
             sum over kernel offsets of strided slices times per-channel weights instead (also a
             sum of integer products under the same bound). ``offset`` is None.

Patches follow the channels-last order ``(k_1, .., k_nd, C)`` (contiguous runs of channels); a 1×1
stride-1 convolution needs no copy at all. Library convolutions are never used (they may choose
Winograd/FFT, which are not exact), and float GEMMs on a GPU run with TF32 disabled.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qpasses.errors import NumericsError

from qpasses.numerics import fast_requant
from qpasses.numerics.fast_requant import scratch_like, workspace

__all__ = ["PreparedConv", "PreparedLinear", "RowBlocks", "channels_last", "conv_blocks",
           "conv_rows", "exact_float_matmul", "fast_conv", "fast_linear", "input_offset", "linear_blocks", "linear_rows",
           "prepare_conv", "prepare_linear", "rows_to_output"]

_FLOAT = {"float32": torch.float32, "float64": torch.float64}


def input_offset(qmin: int, qmax: int) -> int:
    """``c`` such that ``[qmin − c, qmax − c]`` lies in int8 (needs ``qmax − qmin <= 255``):
    0 or 128 when they do (int8 / uint8 codes then need no arithmetic, see ``_to_int8``)."""
    if qmax - qmin > 255:
        raise NumericsError(f"int8-mm: input range [{qmin}, {qmax}] is wider than 8 bits")
    for c in (0, 128):
        if -128 <= qmin - c and qmax - c <= 127:
            return c
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
    w_mats: list[Tensor]          # per group (K_g, O_g), K in (k_1..k_nd, C_g) order
    w_colsum: Tensor              # int64 (O,): Σ_k (w − z_w)
    w_dw: Tensor | None           # depthwise float weights (*k, C): channels last
    x_offset: int                 # c of the int8 shift (int8-mm)


@dataclass
class PreparedLinear:
    kernel: str
    w_mat: Tensor                 # (K, O)
    w_colsum: Tensor
    x_offset: int


def _tuple(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _centered(w: Tensor, w_zp: Tensor | int) -> Tensor:
    """``w − z_w``: ``w`` itself (read only, in its narrow storage dtype) when every zero point is
    0, else as int64. Callers sum it as int64 and cast it to their operand dtype."""
    wz = torch.as_tensor(w_zp, dtype=torch.int64)
    if not w.dtype.is_floating_point and not bool((wz != 0).any()):
        return w
    return w.to(torch.int64) - (wz.reshape(-1, *([1] * (w.dim() - 1))) if wz.dim() and
                                wz.numel() > 1 else wz.reshape(()))


def _check_int8(ws: Tensor) -> None:
    if ws.numel() and (int(ws.min()) < -128 or int(ws.max()) > 127):
        raise NumericsError("int8-mm: centred weight codes do not fit int8")


def prepare_conv(w: Tensor, w_zp: Tensor | int, *, kernel: str, stride: int | Sequence[int],
                 padding: int | Sequence[int], dilation: int | Sequence[int], groups: int,
                 x_qmin: int, x_qmax: int) -> PreparedConv:
    nd = w.dim() - 2
    ws = _centered(w, w_zp)
    o, cg = ws.shape[:2]
    og = o // groups
    colsum = ws.reshape(o, -1).sum(1, dtype=torch.int64)
    # (O, C_g, *k) -> (O, *k, C_g): the channels-last patch order
    wl = ws.permute(0, *range(2, 2 + nd), 1)
    mats: list[Tensor] = []
    w_dw = None
    x_offset = 0
    if kernel == "int8-mm":
        _check_int8(ws)
        x_offset = input_offset(x_qmin, x_qmax)
        dt = torch.int8
    elif kernel in _FLOAT:
        dt = _FLOAT[kernel]
    else:
        raise NumericsError(f"no fast conv kernel {kernel!r}")
    if kernel in _FLOAT and cg == 1 and groups == o:
        w_dw = wl.reshape(o, *ws.shape[2:]).permute(*range(1, nd + 1), 0).to(dt).contiguous()
    else:
        for g in range(groups):
            mats.append(wl[g * og:(g + 1) * og].reshape(og, -1).t().to(dt).contiguous())
    return PreparedConv(kernel, groups, tuple(ws.shape[2:]), _tuple(stride, nd),
                        _tuple(padding, nd), _tuple(dilation, nd), o, mats, colsum, w_dw,
                        x_offset)


def _to_int8(x: Tensor, c: int) -> Tensor:
    """``(x − c)`` as int8 for codes with ``x − c`` in int8, in ``x``'s memory layout and without
    an int64 temporary: nothing for int8 codes with c = 0, ``uint8(x) XOR 0x80`` reinterpreted as
    int8 for uint8 codes with c = 128 (into scratch: the caller only reads it)."""
    if c == 0:
        return x if x.dtype == torch.int8 else x.to(torch.int8)
    if c == 128 and x.dtype == torch.uint8:
        return torch.bitwise_xor(x, 128, out=scratch_like("conv-int8", x, torch.uint8)).view(
            torch.int8)
    if x.dtype in (torch.uint8, torch.int8):
        x = x.to(torch.int16)
    return (x - c).to(torch.int8)


def channels_last(x: Tensor) -> Tensor:
    """(N, C, *S) -> the (N, *S, C) view, contiguous (a copy only if ``x`` is not channels-last)."""
    nd = x.dim() - 2
    return x.permute(0, *range(2, 2 + nd), 1).contiguous()


def rows_to_output(rows: Tensor, n: int, out_sizes: Sequence[int]) -> Tensor:
    """(N·L, O) rows -> the logical (N, O, *out) tensor, channels-last in memory (a view)."""
    nd = len(out_sizes)
    return rows.view(n, *out_sizes, rows.shape[-1]).permute(0, nd + 1, *range(1, nd + 1))


def _pad_last(x: Tensor, padding: tuple[int, ...], value: float) -> Tensor:
    """Pad the spatial dims of a channels-last (N, *S, C) tensor."""
    if not any(padding):
        return x
    pads: list[int] = [0, 0]
    for q in reversed(padding):
        pads += [q, q]
    return F.pad(x, pads, value=value)


def _patches(xp: Tensor, p: PreparedConv) -> tuple[Tensor, tuple[int, ...]]:
    """(N, *S, C) padded channels-last input -> (N, *out, *k, C) strided view of the patches."""
    nd = len(p.kernel_size)
    st = xp.stride()
    outs = tuple((xp.shape[1 + d] - p.dilation[d] * (p.kernel_size[d] - 1) - 1) // p.stride[d] + 1
                 for d in range(nd))
    size = (xp.shape[0], *outs, *p.kernel_size, xp.shape[-1])
    strides = (st[0], *[st[1 + d] * p.stride[d] for d in range(nd)],
               *[st[1 + d] * p.dilation[d] for d in range(nd)], st[-1])
    return xp.as_strided(size, strides, xp.storage_offset()), outs


@contextlib.contextmanager
def exact_float_matmul(t: Tensor) -> Iterator[None]:
    """TF32 truncates float32 mantissas on CUDA: keep it off around the exact float GEMMs."""
    if not t.is_cuda:
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


def _int_mm(a: Tensor, b: Tensor) -> Tensor:
    """``torch._int_mm`` (exact int8 × int8 → int32). The CPU kernel takes any shape; CUDA wants
    M > 16 and K, N multiples of 8, so pad with zeros there (exact)."""
    if not a.is_cuda:
        return torch._int_mm(a, b)
    m, n = a.shape[0], b.shape[1]
    k_pad, n_pad, m_pad = (-a.shape[1]) % 8, (-n) % 8, max(0, 17 - m)
    a = F.pad(a, (0, k_pad, 0, m_pad))
    b = F.pad(b, (0, n_pad, 0, k_pad))
    return torch._int_mm(a.contiguous(), b.contiguous())[:m, :n]


def _matmul(cols: Tensor, w: Tensor, out: Tensor) -> Tensor:
    if w.dtype == torch.int8:
        if cols.is_cuda:
            return out.copy_(_int_mm(cols, w))
        return torch._int_mm(cols, w, out=out)
    with exact_float_matmul(cols):
        return torch.mm(cols, w, out=out)


@dataclass
class RowBlocks:
    """The accumulator of a conv/linear as blocks of rows: ``rows`` (pixels × batch), ``offset``
    (an int64 per-output-channel vector or None, see :func:`conv_blocks`), output spatial sizes,
    and ``blocks``: ``(r0, r1, acc)`` with ``acc`` the (r1 − r0, O) block — a scratch buffer,
    valid (and the caller's to overwrite) until the next block is produced."""
    rows: int
    offset: Tensor | None
    out_sizes: tuple[int, ...]
    blocks: Iterator[tuple[int, int, Tensor]]


def _conv_input(x: Tensor, p: PreparedConv, x_zero_point: int
                ) -> tuple[Tensor, Tensor | None]:
    """The padded channels-last operand ((x − c) int8 for int8-mm, (x − z_x) float otherwise)
    and the exact correction ``offset = (c − z_x)·Σ_k w`` of the int8 shift."""
    if p.kernel == "int8-mm":
        c = p.x_offset
        xl = channels_last(_to_int8(x, c))
        offset = (c - x_zero_point) * p.w_colsum if c != x_zero_point else None
        return _pad_last(xl, p.padding, x_zero_point - c), offset
    xl = channels_last(x).to(_FLOAT[p.kernel])
    if x_zero_point:
        xl = xl - x_zero_point
    return _pad_last(xl, p.padding, 0.0), None


def conv_blocks(x: Tensor, p: PreparedConv, x_zero_point: int,
                block_elems: int | None = None) -> RowBlocks:
    """``Σ (x − z_x)(w − z_w) = acc + offset`` exactly, as :class:`RowBlocks` of about
    ``block_elems`` accumulators each (int32 for int8-mm, exact integers in float32/float64
    otherwise). Patches are gathered and multiplied block by block into reused scratch buffers, so
    the working set stays in cache and no large temporary is allocated."""
    n = x.shape[0]
    xp, offset = _conv_input(x, p, x_zero_point)
    o = p.out_channels
    if p.w_dw is not None:
        acc, outs = _depthwise(xp, p)
        acc = acc.reshape(-1, o)
        return RowBlocks(acc.shape[0], offset, outs, iter([(0, acc.shape[0], acc)]))
    cg = xp.shape[-1] // p.groups
    og = o // p.groups
    pts = []
    outs: tuple[int, ...] = ()
    for g in range(p.groups):      # a few groups at most (int8-mm) — never a loop over channels
        pt, outs = _patches(xp if p.groups == 1 else xp[..., g * cg:(g + 1) * cg], p)
        pts.append(pt)
    per_image = math.prod(outs)
    rows = n * per_image
    # a 1x1 stride-1 convolution reads its channels-last input in place
    direct = p.groups == 1 and all(k == 1 for k in p.kernel_size) and \
        all(st == 1 for st in p.stride) and not any(p.padding)
    target = max(1, (block_elems or fast_requant.CHUNK_ELEMS) // max(o, 1))
    if direct:
        spans = [(r, min(r + target, rows)) for r in range(0, rows, target)]
    elif per_image >= target:       # blocks of output rows of one image
        inner = per_image // outs[0]
        step = max(1, target // inner)
        spans = [(i * per_image + h * inner, i * per_image + min(h + step, outs[0]) * inner)
                 for i in range(n) for h in range(0, outs[0], step)]
    else:                           # blocks of whole images
        step = max(1, target // per_image)
        spans = [(i * per_image, min(i + step, n) * per_image) for i in range(0, n, step)]
    acc_dt = torch.int32 if p.kernel == "int8-mm" else _FLOAT[p.kernel]

    def blocks() -> Iterator[tuple[int, int, Tensor]]:
        flat = xp.reshape(rows, -1) if direct else None
        for r0, r1 in spans:
            m = r1 - r0
            acc = workspace("conv-acc", m * o, acc_dt, xp.device).view(m, o)
            for g in range(p.groups):
                if flat is not None:
                    cols = flat[r0:r1]
                else:
                    i0, i1 = r0 // per_image, (r1 - 1) // per_image + 1
                    src = pts[g][i0:i1]
                    if i1 - i0 == 1 and m < per_image:
                        inner = per_image // outs[0]
                        h0 = (r0 - i0 * per_image) // inner
                        src = src[:, h0:h0 + m // inner]
                    buf = workspace("conv-cols", src.numel(), xp.dtype, xp.device)
                    cols = buf.view(src.shape).copy_(src).view(m, -1)
                if p.groups == 1:
                    _matmul(cols, p.w_mats[0], acc)
                else:
                    acc[:, g * og:(g + 1) * og] = _matmul(
                        cols, p.w_mats[g], workspace("conv-acc-g", m * og, acc_dt,
                                                     xp.device).view(m, og))
            yield r0, r1, acc
    return RowBlocks(rows, offset, outs, blocks())


def conv_rows(x: Tensor, p: PreparedConv, x_zero_point: int
              ) -> tuple[Tensor, Tensor | None, tuple[int, ...]]:
    """``(acc, offset, out_sizes)``: all the blocks of :func:`conv_blocks` in one (N·L, O)
    tensor (a fresh one, not scratch)."""
    run = conv_blocks(x, p, x_zero_point)
    acc = None
    for r0, r1, block in run.blocks:
        if acc is None:
            acc = torch.empty((run.rows, block.shape[1]), dtype=block.dtype, device=block.device)
        acc[r0:r1] = block
    if acc is None:
        acc = torch.empty((0, p.out_channels), dtype=torch.int32)
    return acc, run.offset, run.out_sizes


def _depthwise(xp: Tensor, p: PreparedConv) -> tuple[Tensor, tuple[int, ...]]:
    """Σ over kernel offsets of strided slices times per-channel weights, channels last (exact
    under the bound: every partial sum is an integer below 2^24 / 2^53)."""
    nd = len(p.kernel_size)
    outs = tuple((xp.shape[1 + d] - p.dilation[d] * (p.kernel_size[d] - 1) - 1) // p.stride[d] + 1
                 for d in range(nd))
    w = p.w_dw
    assert w is not None
    acc = None
    for off in itertools.product(*[range(k) for k in p.kernel_size]):
        idx = tuple(slice(off[d] * p.dilation[d],
                          off[d] * p.dilation[d] + p.stride[d] * (outs[d] - 1) + 1, p.stride[d])
                    for d in range(nd))
        term = xp[(slice(None),) + idx] * w[off]
        acc = term if acc is None else acc.add_(term)
    assert acc is not None
    return acc.contiguous(), outs


def prepare_linear(w: Tensor, w_zp: Tensor | int, *, kernel: str, x_qmin: int,
                   x_qmax: int) -> PreparedLinear:
    ws = _centered(w, w_zp)
    colsum = ws.sum(1, dtype=torch.int64)
    if kernel == "int8-mm":
        _check_int8(ws)
        return PreparedLinear(kernel, ws.t().to(torch.int8).contiguous(), colsum,
                              input_offset(x_qmin, x_qmax))
    if kernel in _FLOAT:
        return PreparedLinear(kernel, ws.t().to(_FLOAT[kernel]).contiguous(), colsum, 0)
    raise NumericsError(f"no fast linear kernel {kernel!r}")


def linear_blocks(x: Tensor, p: PreparedLinear, x_zero_point: int,
                  block_elems: int | None = None) -> RowBlocks:
    """:func:`conv_blocks` for a linear layer: ``(x − z_x)(w − z_w)ᵀ = acc + offset`` over the
    rows of ``x`` flattened to (M, K)."""
    a = x.reshape(-1, x.shape[-1])
    o = p.w_colsum.numel()
    if p.kernel == "int8-mm":
        c = p.x_offset
        a = _to_int8(a, c).contiguous()
        offset = (c - x_zero_point) * p.w_colsum if c != x_zero_point else None
    else:
        a = a.to(p.w_mat.dtype)
        if x_zero_point:
            a = a - x_zero_point
        a, offset = a.contiguous(), None
    rows = a.shape[0]
    target = max(1, (block_elems or fast_requant.CHUNK_ELEMS) // max(o, 1))
    acc_dt = torch.int32 if p.kernel == "int8-mm" else p.w_mat.dtype

    def blocks() -> Iterator[tuple[int, int, Tensor]]:
        for r0 in range(0, rows, target):
            r1 = min(r0 + target, rows)
            acc = workspace("conv-acc", (r1 - r0) * o, acc_dt, a.device).view(r1 - r0, o)
            yield r0, r1, _matmul(a[r0:r1], p.w_mat, acc)
    return RowBlocks(rows, offset, (), blocks())


def linear_rows(x: Tensor, p: PreparedLinear, x_zero_point: int) -> tuple[Tensor, Tensor | None]:
    """``(acc, offset)`` with ``(x − z_x)(w − z_w)ᵀ = acc + offset`` exactly, acc (M, O) rows."""
    run = linear_blocks(x, p, x_zero_point)
    acc = torch.empty((run.rows, p.w_colsum.numel()),
                      dtype=torch.int32 if p.kernel == "int8-mm" else p.w_mat.dtype)
    for r0, r1, block in run.blocks:
        acc[r0:r1] = block
    return acc, run.offset


def _int64_acc(acc: Tensor, add: Tensor | None) -> Tensor:
    out = acc.round().to(torch.int64) if acc.is_floating_point() else acc.to(torch.int64)
    return out if add is None else out.add_(add)


def fast_conv(x: Tensor, p: PreparedConv, x_zero_point: int,
              add: Tensor | None = None) -> Tensor:
    """``Σ (x − z_x)(w − z_w)`` [+ ``add``, a per-output-channel int64 vector such as the bias]
    as int64 of shape (N, O, *out) (channels-last in memory)."""
    acc, offset, outs = conv_rows(x, p, x_zero_point)
    extra = offset if add is None else (add if offset is None else offset + add)
    return rows_to_output(_int64_acc(acc, extra), x.shape[0], outs)


def fast_linear(x: Tensor, p: PreparedLinear, x_zero_point: int,
                add: Tensor | None = None) -> Tensor:
    """``(x − z_x)(w − z_w)ᵀ`` [+ ``add`` per output feature] as int64."""
    acc, offset = linear_rows(x, p, x_zero_point)
    extra = offset if add is None else (add if offset is None else offset + add)
    return _int64_acc(acc, extra).reshape(*x.shape[:-1], acc.shape[-1])

