"""Joins, pools, clamps and lookup tables of the integer simulation (see
:mod:`qpasses.modules.int_sim` for the node vocabulary and the backends)."""
from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qpasses.errors import NumericsError
from qpasses.numerics.fixed_point import (channel_view, multiply_by_quantized_multiplier,
                                          quantize_multiplier, requantize)
from qpasses.numerics.int_ops import int_avg_pool_sum, int_max_pool
from qpasses.numerics.int_sim_math import adaptive_avg_pool_sum, add_rescale_params
from qpasses.numerics.native_requant import native_add
from qpasses.numerics.quant_utils import is_compiling
from qpasses.numerics.fast_requant import (code_dtype, lut_gather, lut_gather2, max_pool_codes,
                                           requantize_fast, scratch_like)
from qpasses.modules.tensor_keys import tensor_versions
from qpasses.modules.int_sim import MAX_TABLE_ENTRIES, IntSimModule, Requantize

__all__ = ["IntAdd", "IntAvgPoolSum", "IntCat", "IntClamp", "IntLUT", "IntMaxPool", "IntMul"]

_I64 = torch.int64


def _holds(dtype: torch.dtype, lo: int, hi: int) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= lo and hi <= info.max


# ------------------------------------------------------------------------------------------------
# joins


class IntAdd(IntSimModule):
    """Residual add of integer inputs onto the output grid.

    ``exact`` (every input scale equals the output scale): ``clamp(Σ(q_i − z_i) + z_y)``, no rounding.
    ``float-rne``: ``rne((Σ float32((q_i − z_i)·s_i)) · float32(1/s_y)) + z_y``, the fake-quant /
    torch order. Integer contracts: TFLite's add — each ``(q_i − z_i)·2^L`` times its multiplier
    ``s_i/(2 max s)`` under the contract, the sum times ``2 max s/(2^L s_y)``, one clamp.
    """

    def __init__(self, in_scales: Sequence[float], in_zero_points: Sequence[int],
                 in_max_abs: Sequence[int], out_scale: float, out_zero_point: int, qmin: int,
                 qmax: int, rounding: str, multiplier_bits: int = 31) -> None:
        super().__init__()
        self.in_scales = [float(s) for s in in_scales]
        self.in_zero_points = [int(z) for z in in_zero_points]
        self.in_max_abs = [int(m) for m in in_max_abs]
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.qmin, self.qmax, self.rounding = int(qmin), int(qmax), rounding
        self.multiplier_bits = int(multiplier_bits)
        self.backend = "reference"
        exact = all(s == self.out_scale for s in self.in_scales)
        self.mode = "exact" if exact else ("float" if rounding == "float-rne" else "fixed")
        self.left_shift = 0
        if self.mode == "fixed":
            self.left_shift, ms, m_out = add_rescale_params(self.in_scales, in_max_abs, out_scale)
            m, s = quantize_multiplier(torch.tensor(ms, dtype=torch.float64), multiplier_bits)
            self.register_buffer("in_multiplier", m)
            self.register_buffer("in_shift", s)
            mo, so = quantize_multiplier(m_out, multiplier_bits)
            self.register_buffer("out_multiplier", mo)
            self.register_buffer("out_shift", so)

    def _grid(self, i: int) -> tuple[int, int]:
        """(lowest code, number of codes) of input ``i`` (``z_i ± max |q_i − z_i|``)."""
        z, m = self.in_zero_points[i], self.in_max_abs[i]
        return z - m, 2 * m + 1

    def _table(self) -> Tensor:
        """The output code of every pair of input codes (this module's reference arithmetic)."""
        (a0, na), (b0, nb) = self._grid(0), self._grid(1)
        a = torch.arange(a0, a0 + na).repeat_interleave(nb)
        b = torch.arange(b0, b0 + nb).repeat(na)
        return self._reference(a, b).to(self.out_dtype)

    def forward(self, *qs: Tensor) -> Tensor:
        if len(qs) != len(self.in_scales):
            raise NumericsError(f"IntAdd expects {len(self.in_scales)} inputs, got {len(qs)}")
        if not self.fast:
            return self._reference(*qs)
        if self.mode == "exact":
            # exact sum in the narrowest dtype that holds it, then the output clamp
            lo = sum(z - m for z, m in zip(self.in_zero_points, self.in_max_abs))
            hi = sum(z + m for z, m in zip(self.in_zero_points, self.in_max_abs))
            c = self.out_zero_point - sum(self.in_zero_points)
            dt = code_dtype(min(lo, lo + c, -1), max(hi, hi + c, 1))
            if len(qs) == 2:          # one compiled pass where it applies
                y = native_add(qs[0], qs[1], c, self.qmin, self.qmax, self.out_dtype)
                if y is not None:
                    return y
            y = scratch_like("add-sum", qs[0], dt).copy_(qs[0])
            for q in qs[1:]:       # same-dtype adds: mixed-dtype in-place adds are slow
                y += scratch_like("add-term", q, dt).copy_(q)
            if c:
                y += c
            y.clamp_(self.qmin, self.qmax)
            return torch.empty_like(qs[0], dtype=self.out_dtype).copy_(y)
        if len(qs) == 2 and self._grid(0)[1] * self._grid(1)[1] <= MAX_TABLE_ENTRIES:
            # two narrow inputs: one exact table lookup per value
            key = (tuple(self.in_scales), tuple(self.in_zero_points), tuple(self.in_max_abs),
                   self.out_scale, self.out_zero_point, self.qmin, self.qmax) + tensor_versions(
                *(getattr(self, n, None) for n in ("in_multiplier", "in_shift", "out_multiplier",
                                                   "out_shift")))
            table = self._cached("table", key, self._table)
            (a0, _), (b0, nb) = self._grid(0), self._grid(1)
            return lut_gather2(table, qs[0], a0, qs[1], b0, nb)
        return self._reference(*qs).to(self.out_dtype)

    def _reference(self, *qs: Tensor) -> Tensor:
        qs = tuple(q.to(_I64) for q in qs)
        if self.mode == "exact":
            y = qs[0] + qs[1] if len(qs) > 1 else qs[0].clone()
            for q in qs[2:]:
                y += q
            c = self.out_zero_point - sum(self.in_zero_points)
            if c:
                y += c
            return y.clamp_(self.qmin, self.qmax)
        if self.mode == "float":
            v = None
            for q, z, s in zip(qs, self.in_zero_points, self.in_scales):
                t = (q - z).to(torch.float32) * torch.tensor(s, dtype=torch.float32)
                v = t if v is None else v + t
            inv = 1.0 / torch.tensor(self.out_scale, dtype=torch.float32)
            y = torch.round(v * inv).to(_I64) + self.out_zero_point
            return y.clamp(self.qmin, self.qmax)
        acc = None
        fast = self.fast                # inputs are proven inside their declared ranges
        for i, (q, z) in enumerate(zip(qs, self.in_zero_points)):
            x = (q - z) * (1 << self.left_shift)
            if fast:
                t = requantize_fast(x, self.in_multiplier[i], self.in_shift[i], 0, -(2 ** 62),
                                    2 ** 62, self.rounding, self.multiplier_bits)
            else:
                t = multiply_by_quantized_multiplier(x, self.in_multiplier[i], self.in_shift[i],
                                                     self.rounding,
                                                     multiplier_bits=self.multiplier_bits)
            acc = t if acc is None else acc + t
        if fast:
            return requantize_fast(acc, self.out_multiplier, self.out_shift, self.out_zero_point,
                                   self.qmin, self.qmax, self.rounding, self.multiplier_bits)
        return requantize(acc, self.out_multiplier, self.out_shift, self.out_zero_point,
                          self.qmin, self.qmax, self.rounding,
                          multiplier_bits=self.multiplier_bits)

    def extra_repr(self) -> str:
        return (f"mode={self.mode}, inputs={len(self.in_scales)}, out_scale={self.out_scale:.6g}, "
                f"z_out={self.out_zero_point}, range=[{self.qmin}, {self.qmax}], "
                f"rounding={self.rounding}" + (f", left_shift={self.left_shift}"
                                               if self.mode == "fixed" else ""))


class IntMul(IntSimModule):
    """Elementwise product of two integer tensors requantized onto the output grid:
    ``clamp(z_y + contract((a − z_a)(b − z_b)·s_a s_b/s_y))``; ``float-rne`` follows the fake-quant
    float32 order ``rne(float32(x̂_a·x̂_b)·float32(1/s_y))``."""

    def __init__(self, a: tuple[float, int], b: tuple[float, int], out_scale: float,
                 out_zero_point: int, qmin: int, qmax: int, rounding: str,
                 multiplier_bits: int = 31) -> None:
        super().__init__()
        (self.a_scale, self.a_zero_point), (self.b_scale, self.b_zero_point) = a, b
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.qmin, self.qmax, self.rounding = int(qmin), int(qmax), rounding
        self.rq = Requantize(self.a_scale * self.b_scale / self.out_scale,
                             out_zero_point=out_zero_point, qmin=qmin, qmax=qmax,
                             rounding="hawq" if rounding == "float-rne" else rounding,
                             multiplier_bits=multiplier_bits)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = a.to(_I64), b.to(_I64)
        if self.rounding == "float-rne":
            xa = (a - self.a_zero_point).to(torch.float32) * torch.tensor(self.a_scale,
                                                                          dtype=torch.float32)
            xb = (b - self.b_zero_point).to(torch.float32) * torch.tensor(self.b_scale,
                                                                          dtype=torch.float32)
            inv = 1.0 / torch.tensor(self.out_scale, dtype=torch.float32)
            y = torch.round((xa * xb) * inv).to(_I64) + self.out_zero_point
            return y.clamp(self.qmin, self.qmax).to(self.out_dtype)
        return self.rq((a - self.a_zero_point) * (b - self.b_zero_point), owned=True)

    def extra_repr(self) -> str:
        return (f"M={self.a_scale * self.b_scale / self.out_scale:.6g}, z_a={self.a_zero_point}, "
                f"z_b={self.b_zero_point}, z_out={self.out_zero_point}, "
                f"range=[{self.qmin}, {self.qmax}], rounding={self.rounding}")


class IntCat(IntSimModule):
    """Concatenation on the output grid; ``requants[i]`` (or None when input i already is on it)."""

    def __init__(self, dim: int, requants: Sequence[Requantize | None], qmin: int,
                 qmax: int) -> None:
        super().__init__()
        self.dim, self.qmin, self.qmax = int(dim), int(qmin), int(qmax)
        self.requants = nn.ModuleList([r if r is not None else nn.Identity() for r in requants])

    def forward(self, *qs: Tensor) -> Tensor:
        return torch.cat([r(q).to(self.out_dtype) for r, q in zip(self.requants, qs)], self.dim)

    def extra_repr(self) -> str:
        n = sum(not isinstance(r, nn.Identity) for r in self.requants)
        return f"dim={self.dim}, inputs={len(self.requants)}, requantized={n}"


# ------------------------------------------------------------------------------------------------
# pooling, clamps, tables


class IntMaxPool(IntSimModule):
    """Max pooling on integer codes (exact: max commutes with monotone quantization)."""

    def __init__(self, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
                 ceil_mode: bool, qmin: int, qmax: int) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, bool(ceil_mode)
        self.qmin, self.qmax = int(qmin), int(qmax)

    def forward(self, x: Tensor) -> Tensor:
        if self.fast:      # on the narrow codes themselves, channels-last
            return max_pool_codes(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                  self.ceil_mode)
        return int_max_pool(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode).to(x.dtype if self.fast else _I64)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class IntAvgPoolSum(IntSimModule):
    """Average pooling as exact integer window sums times ``factor = L / count``.

    The output ``Σ·(L/count)`` represents the window mean at scale ``s/L`` and zero point ``L·z``
    (no rounding); the next requantization applies the fixed-point reciprocal. ``mode``: ``avg``
    (kernel/stride/padding, ``count_include_pad``, ``divisor_override``) or ``adaptive``
    (``output_size``). The counts depend on the spatial size the graph was lowered for; another
    size raises :class:`NumericsError`. ``zero_point`` is the input's: padding is the real value 0,
    i.e. the code ``z``, wherever the divisor counts padded positions.
    """

    factor: Tensor

    def __init__(self, mode: str, *, lcm: int, factor: Tensor, qmin: int, qmax: int,
                 kernel_size: Any = None, stride: Any = None, padding: Any = 0,
                 count_include_pad: bool = True, divisor_override: int | None = None,
                 output_size: Any = None, zero_point: int = 0) -> None:
        super().__init__()
        self.zero_point = int(zero_point)
        self.mode, self.lcm = mode, int(lcm)
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override
        self.output_size = output_size
        self.register_buffer("factor", factor.to(_I64))
        self.qmin, self.qmax = int(qmin), int(qmax)

    def window_sums(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mode == "adaptive":
            return adaptive_avg_pool_sum(x, self.output_size)
        sums, present = int_avg_pool_sum(x, self.kernel_size, self.stride, self.padding)
        counts = present
        if self.divisor_override:
            counts = torch.full_like(present, int(self.divisor_override))
        elif self.count_include_pad:
            k = self.kernel_size
            counts = torch.full_like(present, math.prod(k) if isinstance(k, (tuple, list)) else
                                     int(k) ** (x.dim() - 2))
        if self.zero_point:
            # int_avg_pool_sum pads with code 0; the float pool pads with 0.0, whose code is z:
            # Σ(q − z)/D = (Σ q + (D − present)·z)/D − z
            sums = sums + (counts - present) * self.zero_point
        return sums, counts

    def forward(self, x: Tensor) -> Tensor:
        sums, counts = self.window_sums(x)
        expect = torch.div(torch.full_like(counts, self.lcm), counts, rounding_mode="floor")
        msg = (f"int-sim average pool: the window counts for input {tuple(x.shape)} differ from "
               "those the graph was lowered for (the output scale depends on them); lower the "
               "graph again with example inputs of this spatial size")
        if expect.shape != self.factor.shape:
            raise NumericsError(msg)
        if is_compiling():
            # torch.export: the same check as a runtime assertion, no data-dependent branch
            torch._assert_async(((expect == self.factor) & (expect * counts == self.lcm)).all(),
                                msg)
        elif not torch.equal(expect, self.factor) or bool((expect * counts != self.lcm).any()):
            raise NumericsError(msg)
        return (sums * self.factor).to(self.out_dtype)

    def extra_repr(self) -> str:
        what = (f"output_size={self.output_size}" if self.mode == "adaptive" else
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}")
        return f"mode={self.mode}, {what}, L={self.lcm}" + (
            f", z_in={self.zero_point}" if self.zero_point else "")


class IntClamp(IntSimModule):
    """An unfused ReLU / ReLU6 / clamp on codes: ``clamp(q, lo, hi)`` (per tensor or per channel)."""

    lo: Tensor
    hi: Tensor

    def __init__(self, lo: Tensor, hi: Tensor, axis: int | None = None) -> None:
        super().__init__()
        self.register_buffer("lo", lo.to(_I64).reshape(-1))
        self.register_buffer("hi", hi.to(_I64).reshape(-1))
        self.axis = axis
        self.qmin, self.qmax = int(self.lo.min()), int(self.hi.max())

    def forward(self, q: Tensor) -> Tensor:
        if not self.fast:
            q = q.to(_I64)
        elif not _holds(q.dtype, int(self.lo.min()), int(self.hi.max())):
            q = q.to(torch.promote_types(q.dtype, code_dtype(int(self.lo.min()),
                                                             int(self.hi.max()))))
        lo = channel_view(self.lo, q, self.axis, "lo").to(q.dtype)
        hi = channel_view(self.hi, q, self.axis, "hi").to(q.dtype)
        return torch.minimum(torch.maximum(q, lo), hi).to(self.out_dtype)

    def extra_repr(self) -> str:
        if self.lo.numel() == 1 and self.hi.numel() == 1:
            return f"lo={int(self.lo)}, hi={int(self.hi)}"
        return f"per-channel bounds (axis {self.axis})"


class IntLUT(IntSimModule):
    """``table[q − in_qmin]``: an elementwise function over every input code (``fn_name`` says
    which; ``in_*``/``out_*`` the grids it maps between)."""

    table: Tensor

    def __init__(self, table: Tensor, in_qmin: int, fn_name: str, *, in_scale: float,
                 in_zero_point: int, out_scale: float, out_zero_point: int,
                 qmin: int, qmax: int, out_qmin: int | None = None,
                 out_qmax: int | None = None) -> None:
        super().__init__()
        self.out_qmin = int(qmin if out_qmin is None else out_qmin)
        self.out_qmax = int(qmax if out_qmax is None else out_qmax)
        self.register_buffer("table", table.to(_I64))
        self.in_qmin, self.fn_name = int(in_qmin), fn_name
        self.in_scale, self.in_zero_point = float(in_scale), int(in_zero_point)
        self.out_scale, self.out_zero_point = float(out_scale), int(out_zero_point)
        self.qmin, self.qmax = int(qmin), int(qmax)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        fn = state.get("fn")
        if fn is not None:      # a lambda cannot be pickled (torch.save): keep the table only
            try:
                pickle.dumps(fn)
            except Exception:  # noqa: BLE001 - any pickling failure
                state.pop("fn")
        return state

    def forward(self, q: Tensor) -> Tensor:
        if self.fast:
            table = self._cached("table", tensor_versions(self.table),
                                 lambda: self.table.to(self.out_dtype))
            return lut_gather(table, q, self.in_qmin)
        idx = q.to(_I64) - self.in_qmin
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.table.numel()):
            raise NumericsError(f"int-sim lookup table '{self.fn_name}': input code outside "
                                f"[{self.in_qmin}, {self.in_qmin + self.table.numel() - 1}]")
        return self.table[idx]

    def extra_repr(self) -> str:
        return (f"fn={self.fn_name}, entries={self.table.numel()}, "
                f"in=({self.in_scale:.6g}, {self.in_zero_point}), "
                f"out=({self.out_scale:.6g}, {self.out_zero_point}), "
                f"range=[{self.qmin}, {self.qmax}]")
