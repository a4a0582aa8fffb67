"""Integer-simulation helpers that :mod:`qpasses.numerics.int_ops` and ``fixed_point`` do not cover.

Pure tensor math (no graph code), used by the integer-simulation modules (``qpasses.modules.int_sim``):

* :func:`quantize_codes` — float → integer codes exactly as the fake-quant modules compute them
  (``clamp(rnd(x · float32(1/s)) + z, qmin, qmax)``, the torch.ao convention), with a typed error for
  NaN/inf inputs;
* :func:`adaptive_avg_pool_sum` — exact window sums and counts of adaptive average pooling (PyTorch's
  ``floor(i·in/out) .. ceil((i+1)·in/out)`` windows) through an int64 integral image;
* :func:`uniform_count_factor` — turns per-window counts into one common divisor ``L = lcm(counts)``
  and integer factors ``L / count``, so a window *mean* is exactly ``Σ·(L/count) / L``: average
  pooling stays exact (no rounding at all) until the next requantization;
* :func:`build_lut_f32` — lookup table of an elementwise function that reproduces the fake-quant
  graph's float32 computation for every input code (``x̂ = float32((q − z)·s)``, ``v = f(x̂)`` in
  float32, ``q' = clamp(rne(v · float32(1/s')) + z', ...)``), so a lowered nonlinearity equals the
  fake-quant one bit for bit;
* :func:`add_rescale_params` — the TFLite-style parameters of an integer add of inputs with
  different scales (left shift, per-input and output multipliers);

The fast backend's requantization and code tables are in :mod:`qpasses.numerics.fast_requant`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from qpasses.errors import NumericsError
from qpasses.numerics.quantizers import round_tensor

__all__ = ["MAX_LCM", "adaptive_avg_pool_sum", "add_rescale_params", "build_lut_f32",
           "quantize_codes", "uniform_count_factor"]

# Largest common divisor accepted by uniform_count_factor (keeps Σ·factor far inside int64 and,
# for ≤ 16-bit codes and windows below 2^8 elements, inside int32).
MAX_LCM = 2 ** 12


def quantize_codes(x: Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                   rounding: str = "rne", where: str = "quantize",
                   dtype: torch.dtype = torch.int64) -> Tensor:
    """Integer codes (``dtype``, int64 by default) of a float tensor, exactly like the fake-quant
    modules.

    ``x`` is first cast to float32 (the fake-quant graph's dtype); the scale's float32 reciprocal
    multiplies it (torch.ao convention); ``rounding`` is a :data:`quantizers.ROUNDING_MODES` name.
    NaN or inf raise :class:`NumericsError` naming ``where``.
    """
    if not x.dtype.is_floating_point:
        raise NumericsError(f"{where}: expects a float tensor, got {x.dtype}")
    xf = x.to(torch.float32)
    if torch.compiler.is_compiling():
        # torch.export / torch.compile: no data-dependent Python branch; the same check as a
        # runtime assertion in the traced program (docs/export.md, "torch.export")
        torch._assert_async(torch.isfinite(xf).all(),
                            f"{where}: input has non-finite values (NaN or inf)")
    elif xf.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(xf)):
        # one pass: min / max are NaN when any value is, +-inf when one is
        finite = torch.isfinite(xf)
        bad = int((~finite).sum())
        kind = "NaN" if bool(torch.isnan(xf).any()) else "inf"
        raise NumericsError(f"{where}: input has {bad} non-finite value(s) ({kind}); the integer "
                            "simulation accepts finite inputs only (clean the data)")
    inv = 1.0 / torch.tensor(scale, dtype=torch.float32)
    q = round_tensor(xf * inv, rounding)  # type: ignore[arg-type]
    return q.add_(float(zero_point)).clamp_(qmin, qmax).to(dtype)


def _adaptive_bounds(size: int, out: int) -> tuple[Tensor, Tensor]:
    i = torch.arange(out, dtype=torch.int64)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    return start, end


def adaptive_avg_pool_sum(x: Tensor, output_size: int | Sequence[int | None]) -> tuple[Tensor, Tensor]:
    """Window sums (int64, shape ``(N, C, *out)``) and counts (``(1, 1, *out)``) of adaptive
    average pooling over the trailing ``len(output_size)`` dims of an integer tensor ``x``.

    Exact: one int64 integral image per dim, then differences at PyTorch's window bounds.
    ``None`` in ``output_size`` keeps that dim.
    """
    if x.dtype.is_floating_point or x.dtype == torch.bool:
        raise NumericsError(f"adaptive_avg_pool_sum expects an integer tensor, got {x.dtype}")
    nd = len(output_size) if isinstance(output_size, (tuple, list)) else x.dim() - 2
    outs = (list(output_size) if isinstance(output_size, (tuple, list))
            else [int(output_size)] * nd)
    if nd < 1 or x.dim() < nd + 1:
        raise NumericsError(f"adaptive_avg_pool_sum: output size {output_size} does not fit input "
                            f"of shape {tuple(x.shape)}")
    dims = tuple(range(x.dim() - nd, x.dim()))
    if all(o is not None and int(o) == 1 for o in outs):     # global pooling: one window
        ones = (1,) * (x.dim() - nd)
        return (x.sum(dims, keepdim=True, dtype=torch.int64),
                torch.full(ones + (1,) * nd, math.prod(x.shape[-nd:]), dtype=torch.int64))
    sums = x.to(torch.int64)
    counts = torch.ones((1,) * (x.dim() - nd) + tuple(x.shape[-nd:]), dtype=torch.int64)
    for d in range(nd):
        dim = x.dim() - nd + d
        size = x.shape[dim]
        out = size if outs[d] is None else int(outs[d])
        start, end = _adaptive_bounds(size, out)
        for name in ("sums", "counts"):
            t = sums if name == "sums" else counts
            cs = torch.cumsum(t, dim)
            zero = torch.zeros_like(t.narrow(dim, 0, 1))
            cs = torch.cat([zero, cs], dim)          # cs[k] = sum of the first k entries
            t = cs.index_select(dim, end) - cs.index_select(dim, start)
            if name == "sums":
                sums = t
            else:
                counts = t
    return sums, counts


def uniform_count_factor(counts: Tensor, max_lcm: int = MAX_LCM) -> tuple[int, Tensor] | None:
    """``(L, factor)`` with ``L = lcm(counts)`` and ``factor = L // counts`` (int64, same shape),
    so that ``mean = Σ·factor / L`` exactly; ``None`` when ``L`` exceeds ``max_lcm``."""
    vals = sorted({int(v) for v in counts.reshape(-1).tolist()})
    if not vals or vals[0] < 1:
        raise NumericsError(f"window counts must be >= 1, got {vals[:4]}")
    lcm = 1
    for v in vals:
        lcm = lcm * v // math.gcd(lcm, v)
        if lcm > max_lcm:
            return None
    return lcm, torch.div(torch.full_like(counts, lcm), counts, rounding_mode="floor")


def build_lut_f32(fn: Callable[[Tensor], Tensor], in_scale: float, in_zero_point: int,
                  in_qmin: int, in_qmax: int, out_scale: float, out_zero_point: int,
                  out_qmin: int, out_qmax: int, out_rounding: str = "rne") -> Tensor:
    """Table (int64, ``in_qmax − in_qmin + 1`` entries) of ``fn`` over every input code, computed in
    the fake-quant graph's float32 order: ``x̂ = float32(q − z)·float32(s)``, ``v = fn(x̂)`` (float32),
    ``q' = clamp(rnd(v · float32(1/s')) + z', qmin', qmax')``.

    ``fn`` must be elementwise. Inputs wider than 16 bits are refused. A non-finite ``fn`` value
    raises :class:`NumericsError` (a NaN would otherwise become an arbitrary code).
    """
    n = in_qmax - in_qmin + 1
    if n < 1 or n > 2 ** 16:
        raise NumericsError(f"lookup tables cover 1..2^16 input codes, got [{in_qmin}, {in_qmax}]")
    codes = torch.arange(in_qmin, in_qmax + 1, dtype=torch.int64)
    s_in = torch.tensor(in_scale, dtype=torch.float32)
    x = (codes - in_zero_point).to(torch.float32) * s_in
    with torch.no_grad():
        v = fn(x)
    if not isinstance(v, Tensor) or v.shape != x.shape:
        raise NumericsError("lookup-table function must be elementwise (same shape out as in)")
    v = v.to(torch.float32)
    if not bool(torch.isfinite(v).all()):
        raise NumericsError("lookup-table function returned non-finite values on the input grid")
    inv = 1.0 / torch.tensor(out_scale, dtype=torch.float32)
    q = round_tensor(v * inv, out_rounding) + float(out_zero_point)  # type: ignore[arg-type]
    return q.clamp(out_qmin, out_qmax).to(torch.int64)


def add_rescale_params(in_scales: Sequence[float], in_max_abs: Sequence[int],
                       out_scale: float) -> tuple[int, list[float], float]:
    """TFLite's integer-add rescaling: ``(left_shift, input multipliers, output multiplier)``.

    Each centred input ``(q_i − z_i)`` is shifted left by ``left_shift`` (as large as int32 allows
    for the widest input, at most 20 like TFLite), multiplied by ``s_i / (2·max s)`` (≤ 1/2), the
    results summed (≤ 2^30, fits int32) and the sum multiplied by ``2·max s / (2^left_shift · s_y)``.
    """
    if not in_scales or len(in_scales) != len(in_max_abs):
        raise NumericsError("add_rescale_params: one scale and one max |q − z| per input")
    widest = max(int(m) for m in in_max_abs)
    shift = min(20, 30 - max(widest, 1).bit_length())
    if shift < 0:
        raise NumericsError(f"integer add: inputs up to |{widest}| are too wide for int32 rescaling")
    twice = 2.0 * max(float(s) for s in in_scales)
    return shift, [float(s) / twice for s in in_scales], twice / (2.0 ** shift * float(out_scale))
