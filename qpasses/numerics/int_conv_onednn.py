"""A direct int8 convolution (oneDNN, u8 × s8 → s32) for the fast integer simulation.

``torch.ops.onednn.qconv_pointwise`` convolves uint8 codes with int8 weights without im2col, reading
and writing channels-last tensors. Called with every scale 1, weight zero points 0 and the input
zero point ``z``, it returns ``Σ (x − z)(w − z_w)`` (the padding taken as ``z``, i.e. contributing
nothing, exactly the integer simulation's convention) as **float32**: oneDNN accumulates in int32
(``vpdpbusd``/AMX, no intermediate saturation) and converts the int32 result to float32 once
(``1.0·1.0·acc``, rounded to nearest). Hence, with ``acc`` the exact accumulator and ``fl`` that
rounding:

* ``fl(acc) == acc`` whenever ``|acc| <= 2^24``;
* otherwise ``fl(acc)`` and ``acc`` are both ``>= 2^24`` (or both ``<= −2^24``), because rounding
  is monotone and ``±2^24`` is representable.

So the kernel is exact for a layer whose accumulator bound is at most ``2^24``, and, for larger
bounds, for a fused requantization whose exact window (:class:`~qpasses.numerics.fast_requant.
RequantPlan`: ``A`` is clamped to ``[lo, hi]`` first, which changes no output) satisfies
``hi − add <= 2^(24+k)`` and ``lo − add >= −2^(24+k)`` per channel (``A = acc·2^k + add``): then
every ``acc`` beyond ``±2^24`` and its float32 image land on the same side of the window and clamp
to the same bound (:func:`window_fits_float32`).

Preconditions checked here, per layer: 2-d convolution on CPU; centred weights in int8; input
codes in uint8 (or int8, flipped to uint8 by ``x XOR 0x80`` with ``z + 128``); every partial sum
oneDNN may form (``Σ x·w`` and ``z·Σ w``, whatever the order) inside int32; no output window
wholly in the padding (``padding <= dilation·(k − 1)``: oneDNN was seen leaving such outputs
unwritten). Per process: a CPU with
VNNI or AMX (without them oneDNN's u8×s8 path sums pairs in saturating int16) and a self-test of
saturation-prone extremes (:func:`onednn_conv_ok`). Anything else uses ``int_conv_fast``'s
``_int_mm`` kernel.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from qpasses.numerics import fast_requant
from qpasses.numerics.fast_requant import scratch_like
from qpasses.numerics.int_conv_fast import RowBlocks

__all__ = ["PreparedOnednnConv", "onednn_conv_blocks", "onednn_conv_ok", "prepare_onednn_conv",
           "window_fits_float32"]

_F32_EXACT = 2 ** 24
# Switch for tests and benchmarks (False: every layer runs ``int_conv_fast``'s ``_int_mm`` kernel).
ENABLED = True
_INT32_MAX = 2 ** 31 - 1


@dataclass
class PreparedOnednnConv:
    packed: Tensor                # oneDNN's packed weight
    w_scales: Tensor              # ones (O,) float32
    w_zps: Tensor                 # zeros (O,) int64
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    groups: int
    out_channels: int
    kernel_size: tuple[int, int]
    flip: bool                    # int8 codes: run on x XOR 0x80 (uint8) with z + 128


def _op_available() -> bool:
    try:
        return hasattr(torch.ops.onednn, "qconv_pointwise") and \
            hasattr(torch.ops.onednn, "qconv_prepack") and torch.backends.mkldnn.is_available()
    except (AttributeError, RuntimeError):
        return False


def _cpu_has_int8_dot() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, n, None) for n in ("_is_vnni_supported", "_is_amx_tile_supported")]
    return any(bool(c()) for c in checks if c is not None)


def _pack(w: Tensor, x_zp: int, stride: Sequence[int], padding: Sequence[int],
          dilation: Sequence[int], groups: int,
          image: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    o = w.shape[0]
    ws = torch.ones(o, dtype=torch.float32)
    # with the input's size, oneDNN packs the weights in the blocking its kernel for that size
    # reads (one image suffices: the batch does not change it); without, it reorders every call
    args = (w.contiguous(), ws, 1.0, int(x_zp), list(stride), list(padding), list(dilation),
            int(groups))
    packed = None
    if image is not None and int(image[0]) == w.shape[1] * groups:
        try:
            packed = torch.ops.onednn.qconv_prepack(*args, [1, *map(int, image)])
        except RuntimeError:            # a size oneDNN cannot plan for: the generic packing
            packed = None
    if packed is None:
        packed = torch.ops.onednn.qconv_prepack(*args, None)
    return packed, ws, torch.zeros(o, dtype=torch.int64)


def _run(xu: Tensor, x_zp: int, p: PreparedOnednnConv) -> Tensor:
    return torch.ops.onednn.qconv_pointwise(xu, 1.0, int(x_zp), p.packed, p.w_scales, p.w_zps,
                                            None, p.stride, p.padding, p.dilation, p.groups, 1.0,
                                            0, torch.float32, "none", [], "")


@functools.lru_cache(maxsize=1)
def onednn_conv_ok() -> bool:
    """oneDNN's int8 convolution is present, the CPU has int8 dot products (VNNI/AMX), and a
    self-test on extreme codes (255 × ±127/−128 in long runs, which saturate a pairwise int16
    sum; zero points, padding, strides, groups) returns the exact accumulators."""
    if not (_op_available() and _cpu_has_int8_dot()):
        return False
    g = torch.Generator().manual_seed(0)
    try:
        for c, k, s, groups, zp in ((256, 1, 1, 1, 0), (64, 3, 2, 1, 255), (32, 3, 1, 4, 7)):
            x = torch.randint(0, 256, (2, c, 6, 6), generator=g, dtype=torch.uint8)
            x[0] = 255
            w = torch.randint(-128, 128, (16, c // groups, k, k), generator=g, dtype=torch.int8)
            w[:8] = 127
            w[8:12] = -128
            pad = k // 2
            packed, ws, wz = _pack(w, zp, [s, s], [pad, pad], [1, 1], groups)
            p = PreparedOnednnConv(packed, ws, wz, [s, s], [pad, pad], [1, 1], groups, 16,
                                   (k, k), False)
            y = _run(x.contiguous(memory_format=torch.channels_last), zp, p)
            ref = F.conv2d(x.to(torch.float64) - zp, w.to(torch.float64), None, s, pad, 1, groups)
            small = ref.abs() <= _F32_EXACT      # exact there; beyond, the same side of ±2^24
            big = y.to(torch.float64)[~small] * ref[~small].sign()
            if not torch.equal(y.to(torch.float64)[small], ref[small]) or \
                    bool((big < _F32_EXACT).any()):
                return False
    except RuntimeError:
        return False
    return True


def prepare_onednn_conv(w_centred: Tensor, *, stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], groups: int, x_qmin: int, x_qmax: int,
                        x_zero_point: int,
                        image: Sequence[int] | None = None) -> PreparedOnednnConv | None:
    """Packed weights for :func:`onednn_conv_blocks`, or None where a precondition fails (see the
    module docstring): ``w_centred`` are the (O, C/g, kh, kw) codes ``w − z_w``; ``image``: the
    (C, H, W) of the inputs it will see (packed for them; any other size still runs)."""
    if w_centred.dim() != 4 or w_centred.is_cuda or not onednn_conv_ok():
        return None
    if w_centred.numel() == 0 or int(w_centred.min()) < -128 or int(w_centred.max()) > 127:
        return None
    # an output whose window lies wholly in the padding: oneDNN may leave it unwritten (seen:
    # garbage accumulators with one input channel), so such layers take the GEMM path
    if any(int(p) > int(d) * (int(k) - 1) for p, d, k in zip(padding, dilation,
                                                               w_centred.shape[2:])):
        return None
    if 0 <= x_qmin and x_qmax <= 255:
        flip, zp = False, int(x_zero_point)
    elif -128 <= x_qmin and x_qmax <= 127:
        flip, zp = True, int(x_zero_point) + 128
    else:
        return None
    if not 0 <= zp <= 255:
        return None
    k = math.prod(w_centred.shape[1:])
    if k * (255 + zp) * 128 > _INT32_MAX:       # Σ x·w and z·Σ w, in any order, inside int32
        return None
    packed, ws, wz = _pack(w_centred.to(torch.int8), zp, stride, padding, dilation, groups,
                           image)
    return PreparedOnednnConv(packed, ws, wz, [int(v) for v in stride], [int(v) for v in padding],
                              [int(v) for v in dilation], int(groups), int(w_centred.shape[0]),
                              (int(w_centred.shape[2]), int(w_centred.shape[3])), flip)


def window_fits_float32(lo: Tensor, hi: Tensor, add: Tensor | None, pre_shift: int) -> bool:
    """Per channel ``hi − add <= 2^(24+k)`` and ``lo − add >= −2^(24+k)``: a requantization
    window that float32 accumulators beyond ±2^24 cannot cross (see the module docstring)."""
    lim = _F32_EXACT << int(pre_shift)
    a = add if add is not None else torch.zeros((), dtype=torch.int64)
    return bool(((hi - a) <= lim).all()) and bool(((lo - a) >= -lim).all())


def onednn_conv_blocks(x: Tensor, p: PreparedOnednnConv, x_zero_point: int,
                       block_elems: int | None = None) -> RowBlocks:
    """``Σ (x − z_x)(w − z_w)`` as float32 row blocks ``(images · pixels, O)`` (see the module
    docstring for when they are exact), a few images per oneDNN call (blocks of about
    ``block_elems`` accumulators, within the last-level cache); ``offset`` is None."""
    zp = int(x_zero_point)
    if p.flip:
        x8 = x if x.dtype == torch.int8 else x.to(torch.int8)
        xu = torch.bitwise_xor(x8.view(torch.uint8), 128,
                               out=scratch_like("onednn-x", x8, torch.uint8))
        zp += 128
    else:
        xu = x if x.dtype == torch.uint8 else x.to(torch.uint8)
    xu = xu.contiguous(memory_format=torch.channels_last)
    n = xu.shape[0]
    outs = tuple((xu.shape[2 + d] + 2 * p.padding[d] - p.dilation[d] * (p.kernel_size[d] - 1)
                  - 1) // p.stride[d] + 1 for d in range(2))
    per_image = outs[0] * outs[1]
    # blocks of about 2 MiB of float32 accumulators, which the epilogue then reads while they
    # are still in cache (16 MiB blocks spilled: ResNet-50 batch 8 took 5-15% more CPU time on
    # a loaded machine); each call allocates its output, so not much smaller either
    step = max(1, (block_elems or 2 * fast_requant.CHUNK_ELEMS) //
               max(1, per_image * p.out_channels))

    def blocks() -> Iterator[tuple[int, int, Tensor]]:
        for i in range(0, n, step):
            y = _run(xu[i:i + step], zp, p)          # (b, O, *outs), channels-last
            yield i * per_image, min(i + step, n) * per_image, \
                y.permute(0, 2, 3, 1).reshape(-1, p.out_channels)
    return RowBlocks(n * per_image, None, outs, blocks())
