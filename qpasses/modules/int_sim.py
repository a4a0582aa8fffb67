"""Runtime modules of the integer simulation (the node vocabulary after ``lower-to-int-sim``).

Every tensor between a :class:`Quantize` and a :class:`Dequantize` is an integer tensor of codes
inside the module's declared range ``[qmin, qmax]`` (checked by ``verify-int-sim``): ``int64`` on
the ``reference`` backend, the narrowest dtype holding the declared range on the ``fast`` one
(uint8 / int8 codes, int32 accumulators; conv outputs channels-last in memory). The values are the
same. The
arithmetic comes from :mod:`qpasses.numerics` (``fixed_point`` requantization contracts, ``int_ops``
and ``int_conv_fast`` kernels, ``int_sim_math``); these modules only hold parameters and call it.

=================  ===========================================================================
module             computes
=================  ===========================================================================
Quantize           float → codes, ``clamp(rnd(x·float32(1/s)) + z)`` like the fake quantizers
Dequantize         codes → float32, ``s·(q − z)`` (per-tensor, or per channel for accumulators)
IntConv1d/2d/3d    ``Σ(x − z_x)(w − z_w) + b_q`` on a kernel (``reference`` int64 / fast), then an
IntLinear          optional fused :class:`Requantize` (the accumulator itself when not fused)
Requantize         ``clamp(z_y + contract((q − z_in)·M))``, ``M`` per tensor or per channel;
                   fused ReLU/ReLU6/clamp is just a tighter ``[qmin, qmax]``
IntAdd             residual add: exact ``Σ(q_i − z_i) + z_y`` when scales agree, otherwise
                   TFLite's left-shift + per-input multipliers + output multiplier
IntMul             ``(a − z_a)(b − z_b)·M`` requantized (squeeze-excitation gates)
IntCat             concatenation, inputs requantized to the output grid where they differ
IntMaxPool         max pooling on codes (monotone, so exact)
IntAvgPoolSum      average / adaptive-average pooling as an exact window sum times ``L/count``
                   (``L`` = lcm of the counts): the mean stays exact at scale ``s/L`` until the
                   next requantization, which applies the fixed-point reciprocal
IntClamp           an unfused ReLU/ReLU6/clamp on codes
IntLUT             an elementwise nonlinearity as a table over every input code
=================  ===========================================================================

Shape-only ops (flatten, view/reshape, permute, transpose, squeeze, unsqueeze, contiguous,
getitem, size) stay as ordinary ``call_function`` / ``call_method`` nodes on the integer tensors.
Ops that cannot be lowered run in float between a Dequantize and a Quantize ("float islands",
``QMeta.float_island`` says why).

Backends: every :class:`IntLayer` holds ``kernel`` (what runs) and ``fast_kernel`` (the fastest
kernel proven exact for it at lowering); every module holds ``backend``. :func:`set_backend`
switches a lowered graph between ``reference`` (int64, the checked ``fixed_point`` functions) and
``fast``: fused requantization by :class:`~qpasses.numerics.int_sim_math.RequantPlan` (exact float
passes on a proven window), requantizations of narrow codes by a float32 map checked on every code
(or a table), adds by exact int16 sums or tables, narrow dtypes throughout. Both agree bit for bit:
the fast kernels are exact under the bounds the lowering proved.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from qpasses.errors import NumericsError
from qpasses.numerics.fixed_point import (ROUNDING_CONTRACTS, channel_view,
                                    multiply_by_quantized_multiplier, quantize_multiplier,
                                    requantize, requantize_float)
from qpasses.numerics.int_conv_fast import (RowBlocks, conv_blocks, fast_conv, fast_linear,
                                      linear_blocks, prepare_conv, prepare_linear,
                                      rows_to_output)
from qpasses.numerics.int_ops import int_avg_pool_sum, int_conv, int_linear, int_max_pool
from qpasses.numerics.int_sim_math import (AffineFloor, RequantPlan, adaptive_avg_pool_sum, code_dtype,
                                     lut_gather, lut_gather2, max_pool_codes, quantize_codes,
                                     requantize_fast, requantize_float_fast, scratch_like)

__all__ = [
    "BACKENDS", "INT_SIM_META_KEY", "Dequantize", "IntAdd", "IntAvgPoolSum", "IntCat", "IntClamp",
    "IntConv1d", "IntConv2d", "IntConv3d", "IntLUT", "IntLayer", "IntLinear", "IntMaxPool",
    "IntMul", "IntSimModule", "Quantize", "Requant", "Requantize", "int_sim_modules",
    "is_int_sim_graph", "kernel_table", "set_backend",
]

BACKENDS = ("reference", "fast")
INT_SIM_META_KEY = "qpasses.int_sim"   # gm.meta record written by lower-to-int-sim
_I64 = torch.int64
# Largest table the fast backend builds for a requantization or a two-input add (entries).
_MAX_TABLE = 2 ** 16


def _scalar_or_vector(values: Sequence[float] | float, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(values, dtype=dtype)
    return t.reshape(-1) if t.dim() else t.reshape(1)


def _versions(*ts: Tensor | None) -> tuple:
    """Identity and version of tensors a cached derived value depends on (in-place edits of a
    buffer, e.g. by a test or a user, invalidate the cache)."""
    return tuple((id(t), t._version) if t is not None else None for t in ts)


def _holds(dtype: torch.dtype, lo: int, hi: int) -> bool:
    info = torch.iinfo(dtype)
    return info.min <= lo and hi <= info.max


class IntSimModule(nn.Module):
    """Base of the integer-simulation modules: ``qmin``/``qmax`` declare the output range;
    ``backend`` is set by :func:`set_backend`."""

    qmin: int
    qmax: int
    produces_float: bool = False
    backend: str = "reference"

    def declared_range(self) -> tuple[int, int]:
        return int(self.qmin), int(self.qmax)

    @property
    def fast(self) -> bool:
        return self.backend == "fast"

    @property
    def out_dtype(self) -> torch.dtype:
        """int64 on the reference backend, the narrowest dtype of the declared range on fast."""
        return code_dtype(int(self.qmin), int(self.qmax)) if self.fast else _I64

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_cache", None)          # derived constants, rebuilt on first use
        return state

    def _cached(self, name: str, key: tuple, build: Any) -> Any:
        """``build()``, kept until ``key`` changes."""
        cache = self.__dict__.setdefault("_cache", {})
        hit = cache.get(name)
        if hit is None or hit[0] != key:
            hit = cache[name] = (key, build())
        return hit[1]


# ------------------------------------------------------------------------------------------------
# quantize / dequantize / requantize


class Quantize(IntSimModule):
    """Float input → integer codes, exactly as the activation fake quantizer it replaces."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int,
                 rounding: str = "rne", where: str = "") -> None:
        super().__init__()
        self.scale, self.zero_point = float(scale), int(zero_point)
        self.qmin, self.qmax, self.rounding, self.where = int(qmin), int(qmax), rounding, where

    def forward(self, x: Tensor) -> Tensor:
        return quantize_codes(x, self.scale, self.zero_point, self.qmin, self.qmax, self.rounding,
                              where=f"int-sim quantize '{self.where}'", dtype=self.out_dtype)

    def extra_repr(self) -> str:
        return (f"scale={self.scale:.6g}, zero_point={self.zero_point}, "
                f"range=[{self.qmin}, {self.qmax}], rounding={self.rounding}")


class Dequantize(IntSimModule):
    """Integer codes → float32 ``s·(q − z)`` (computed in float64, rounded once to float32)."""

    produces_float = True
    scale: Tensor

    def __init__(self, scale: Sequence[float] | float, zero_point: int = 0,
                 axis: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", _scalar_or_vector(scale, torch.float64))
        self.zero_point, self.axis = int(zero_point), axis
        self.qmin, self.qmax = -(2 ** 63), 2 ** 63 - 1

    def forward(self, q: Tensor) -> Tensor:
        s = channel_view(self.scale, q, self.axis, "scale")
        return ((q.to(torch.float64) - self.zero_point) * s).to(torch.float32)

    def extra_repr(self) -> str:
        what = f"{self.scale.numel()} channels (axis {self.axis})" if self.scale.numel() > 1 \
            else f"scale={float(self.scale[0]):.6g}"
        return f"{what}, zero_point={self.zero_point}"


class Requantize(IntSimModule):
    """``clamp(z_out + contract((q − z_in)·M), qmin, qmax)`` with ``M`` per tensor or per channel.

    Integer contracts (``gemmlowp``, ``single``, ``hawq``) use the fixed-point ``(multiplier,
    shift)`` of ``M`` (``quantize_multiplier`` with ``multiplier_bits``); ``float-rne`` multiplies by
    ``scale_f32`` (fbgemm's float32 multiplier) and may add fbgemm's float bias first.
    """

    real: Tensor
    multiplier: Tensor
    shift: Tensor
    scale_f32: Tensor

    def __init__(self, real_multiplier: Sequence[float] | float, *, in_zero_point: int = 0,
                 out_zero_point: int = 0, qmin: int = -128, qmax: int = 127,
                 rounding: str = "gemmlowp", multiplier_bits: int = 31, axis: int | None = None,
                 scale_f32: Tensor | None = None) -> None:
        super().__init__()
        if rounding not in ROUNDING_CONTRACTS:
            raise NumericsError(f"unknown rounding contract {rounding!r}")
        real = _scalar_or_vector(real_multiplier, torch.float64)
        self.register_buffer("real", real)
        m, s = quantize_multiplier(real, multiplier_bits)
        self.register_buffer("multiplier", m)
        self.register_buffer("shift", s)
        self.register_buffer("scale_f32", (scale_f32 if scale_f32 is not None
                                           else real).to(torch.float32).reshape(-1))
        self.in_zero_point, self.out_zero_point = int(in_zero_point), int(out_zero_point)
        self.qmin, self.qmax = int(qmin), int(qmax)
        self.rounding, self.multiplier_bits, self.axis = rounding, int(multiplier_bits), axis
        self.backend = "reference"
        self.proven = False
        self.in_max_abs: int | None = None     # proven max |q − z_in| (see prove)

    def _key(self) -> tuple:
        return _versions(self.multiplier, self.shift, self.scale_f32) + (
            self.in_zero_point, self.out_zero_point, self.qmin, self.qmax, self.in_max_abs)

    def plan(self, bound: int, *, bias_f: Tensor | None = None, pre_shift: int = 0,
             pre_add: Tensor | int | None = None) -> RequantPlan:
        """The fast backend's exact form of this requantization for accumulators ``A = acc·2^
        pre_shift + pre_add`` with ``|A| <= bound`` (see :class:`RequantPlan`)."""
        return RequantPlan(self.rounding, multiplier=self.multiplier, shift=self.shift,
                           zero_point=self.out_zero_point, qmin=self.qmin, qmax=self.qmax,
                           bound=bound, multiplier_bits=self.multiplier_bits,
                           scale_f32=self.scale_f32 if self.rounding == "float-rne" else None,
                           bias_f=bias_f, pre_shift=pre_shift, pre_add=pre_add)

    def _table(self) -> Tensor:
        """The output code of every input code ``z_in ± in_max_abs`` (reference arithmetic)."""
        b = int(self.in_max_abs or 0)
        codes = torch.arange(self.in_zero_point - b, self.in_zero_point + b + 1)
        return self._reference(codes, None).to(self.out_dtype)

    def prove(self, in_max_abs: int) -> bool:
        """Record that every input satisfies ``|q − z_in| <= in_max_abs``; the fast backend then
        skips the runtime checks when that keeps the contract's int32 preconditions (the input,
        and for gemmlowp the left-shifted input, within int32)."""
        limit = 2 ** 31 - 1
        left = int(self.shift.clamp(min=0).max()) if self.shift.numel() else 0
        self.proven = in_max_abs <= limit and (self.rounding != "gemmlowp"
                                               or (in_max_abs << left) <= limit)
        self.in_max_abs = int(in_max_abs) if self.proven else None
        return self.proven

    def forward(self, q: Tensor, bias_f: Tensor | None = None, owned: bool = False) -> Tensor:
        """``owned``: the caller hands over ``q`` (a fresh accumulator) for in-place work."""
        if self.fast and self.proven:
            b = int(self.in_max_abs or 0)
            if bias_f is None and self.multiplier.numel() == 1 and 2 * b + 1 <= _MAX_TABLE:
                # narrow input codes: a float32 affine map checked on every code, else a table
                table = self._cached("table", self._key(), self._table)
                affine = self._cached("affine", self._key(), lambda: AffineFloor.fit(
                    torch.arange(self.in_zero_point - b, self.in_zero_point + b + 1),
                    table.to(_I64), float(self.real[0]), self.qmin, self.qmax, self.out_dtype))
                if affine is not None:
                    return affine.apply(q, torch.empty_like(q, dtype=self.out_dtype))
                return lut_gather(table, q, self.in_zero_point - b)
            if bias_f is None:
                plan = self._cached("plan", self._key(),
                                    lambda: self.plan(b, pre_add=-self.in_zero_point))
                out = torch.empty_like(q, dtype=self.out_dtype)
                return plan.apply(q, out, axis=-1 if self.axis is None else self.axis,
                                  owned=owned)
            x = q.to(_I64) - self.in_zero_point
            return requantize_float_fast(
                x, channel_view(self.scale_f32, x, self.axis, "scale"), self.out_zero_point,
                self.qmin, self.qmax, channel_view(bias_f, x, self.axis, "bias")
            ).to(self.out_dtype)
        return self._reference(q, bias_f)

    def _reference(self, q: Tensor, bias_f: Tensor | None) -> Tensor:
        x = q.to(_I64) - self.in_zero_point
        if self.rounding == "float-rne":
            return requantize_float(x, self.scale_f32, self.out_zero_point, self.qmin, self.qmax,
                                    axis=self.axis, bias=bias_f)
        return requantize(x, self.multiplier, self.shift, self.out_zero_point, self.qmin,
                          self.qmax, self.rounding, axis=self.axis,
                          multiplier_bits=self.multiplier_bits)

    def extra_repr(self) -> str:
        m = (f"M={float(self.real[0]):.6g}" if self.real.numel() == 1
             else f"M=[{self.real.numel()} channels, axis {self.axis}]")
        return (f"{m}, z_in={self.in_zero_point}, z_out={self.out_zero_point}, "
                f"range=[{self.qmin}, {self.qmax}], rounding={self.rounding}"
                + (f", bits={self.multiplier_bits}" if self.rounding != "float-rne" else ""))


Requant = Requantize


# ------------------------------------------------------------------------------------------------
# conv / linear


class IntLayer(IntSimModule):
    """Mixin of the integer conv/linear layers (subclasses of the float layer classes, so the
    report, cost and accumulator-width analyses still see the layer at its module path; the float
    ``weight``/``bias`` Parameters are kept, shared with the original model)."""

    w_q: Tensor
    w_zp: Tensor
    bias_q: Tensor | None
    bias_f: Tensor | None
    channel_axis: int = 1

    def _init_int(self, w_q: Tensor, w_zp: Tensor, x_zero_point: int, bias_q: Tensor | None,
                  bias_f: Tensor | None, acc_bound: int, x_bits: int, w_bits: int,
                  fast_kernel: str, kernel: str, kernel_reason: str, x_qmin: int,
                  x_qmax: int) -> None:
        self.register_buffer("w_q", w_q.to(_I64))
        self.register_buffer("w_zp", w_zp.to(_I64))
        self.register_buffer("bias_q", None if bias_q is None else bias_q.to(_I64))
        self.register_buffer("bias_f", None if bias_f is None else bias_f.to(torch.float32))
        self.x_zero_point = int(x_zero_point)
        self.x_qmin, self.x_qmax = int(x_qmin), int(x_qmax)   # declared input range
        self._prepared: tuple[Any, Any] | None = None          # (key, prepared weights)
        self.acc_bound = int(acc_bound)          # |Σ (x − z)(w − z_w)| of every partial sum
        self.x_bits, self.w_bits = int(x_bits), int(w_bits)
        self.fast_kernel, self.kernel, self.kernel_reason = fast_kernel, kernel, kernel_reason
        self.requant: Requantize | None = None
        self.acc_shift = 0       # bias fractional bits: acc = (Σ << acc_shift) + b_q
        self._declare()

    @property
    def acc_max(self) -> int:
        """Largest |acc| the layer can produce: ``(bound << acc_shift) + max |b_q|``."""
        bias_max = int(self.bias_q.abs().max()) if self.bias_q is not None and \
            self.bias_q.numel() else 0
        return (self.acc_bound << self.acc_shift) + bias_max

    def _declare(self) -> None:
        self.acc_bits = self.acc_max.bit_length() + 1
        if self.requant is not None:
            self.qmin, self.qmax = self.requant.qmin, self.requant.qmax
        else:
            self.qmin, self.qmax = -self.acc_max, self.acc_max

    def set_requant(self, rq: Requantize | None) -> None:
        """Fuse an output requantization (None: output the accumulator)."""
        self.requant = rq
        self._declare()

    def set_acc_shift(self, shift: int, bias_q: Tensor | None) -> None:
        """Keep ``shift`` fractional bits of the bias: the accumulator becomes
        ``(Σ << shift) + b_q`` at scale ``s_x·s_w / 2^shift`` (the caller rescales the requant)."""
        self.acc_shift = int(shift)
        if bias_q is not None:
            self.bias_q = bias_q.to(_I64)
        self._declare()

    @property
    def _float_bias_fused(self) -> bool:
        return (self.requant is not None and self.requant.rounding == "float-rne"
                and self.bias_f is not None)

    def accumulate(self, x: Tensor, kernel: str | None = None, with_bias: bool = True) -> Tensor:
        """``Σ (x − z_x)(w − z_w) [+ b_q]`` as int64 on ``kernel`` (default: ``self.kernel``)."""
        k = kernel or self.kernel
        bias = self.bias_q if with_bias else None
        if k == "reference":
            acc = self._reference_acc(x, with_bias=False)
        else:
            # without a shift the bias joins the int8 kernel's offset correction (one pass)
            acc = self._fast_acc(x, self._prepare(k), None if self.acc_shift else bias)
            if not self.acc_shift:
                return acc
        if self.acc_shift:
            acc = acc << self.acc_shift
        if bias is not None:
            acc = acc + channel_view(bias, acc, self.channel_axis, "bias")
        return acc

    def _prepare(self, kernel: str) -> Any:
        key = (kernel, id(self.w_q), self.w_q._version, id(self.w_zp), self.w_zp._version)
        if self._prepared is None or self._prepared[0] != key:
            self._prepared = (key, self._prepare_weights(kernel))
        return self._prepared[1]

    def _prepare_weights(self, kernel: str) -> Any:
        raise NotImplementedError

    def _fast_acc(self, x: Tensor, prepared: Any, add: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def _reference_acc(self, x: Tensor, with_bias: bool) -> Tensor:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_prepared"] = None          # derived, rebuilt on first use
        return state

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        if self.kernel != "reference":
            return self._fast_forward(x)
        if self.requant is None:
            return self.accumulate(x)
        if self._float_bias_fused:
            return self.requant(self.accumulate(x, with_bias=False), bias_f=self.bias_f)
        return self.requant(self.accumulate(x), owned=True)

    def _fast_forward(self, x: Tensor) -> Tensor:
        """Accumulator rows from the fast kernel, then one fused pass per chunk: the kernel's
        offset, the bias and its fractional bits, and the requantization (:class:`RequantPlan`)
        straight into narrow output codes."""
        p = self._prepare(self.kernel)
        run, rebuild = self._blocks(x, p)
        plan, add = self._epilogue(p)
        rq = self.requant
        # no plan: the accumulator itself (e.g. logits), or a requantization whose int32
        # preconditions the lowering could not prove for every accumulator (checked per value)
        dt = self.out_dtype if plan is not None or rq is None else _I64
        out = torch.empty((run.rows, int(self.w_q.shape[0])), dtype=dt)
        for r0, r1, acc in run.blocks:
            if plan is not None:
                plan.apply(acc, out[r0:r1], owned=True)
                continue
            a = acc.round().to(_I64) if acc.is_floating_point() else acc.to(_I64)
            if self.acc_shift:
                a <<= self.acc_shift
            out[r0:r1] = a if add is None else a.add_(add)
        if plan is None and rq is not None:
            return rq._reference(rebuild(out), self.bias_f if self._float_bias_fused
                                 else None).to(self.out_dtype)
        return rebuild(out)

    def _epilogue(self, p: Any) -> tuple[RequantPlan | None, Tensor | None]:
        """(plan, A − acc·2^k per channel): the int8 kernel's offset and the integer bias folded
        into one int64 vector; cached until the weights or the requantization change."""
        rq = self.requant
        key = (self.kernel, self.x_zero_point) + _versions(
            self.w_q, self.w_zp, self.bias_q, self.bias_f) + (self.acc_shift, id(rq)) + (
            rq._key() if rq is not None else ())

        def build() -> tuple[RequantPlan | None, Tensor | None]:
            k = self.acc_shift
            offset = (p.x_offset - self.x_zero_point) * p.w_colsum \
                if p.kernel == "int8-mm" and p.x_offset != self.x_zero_point else None
            add = None if offset is None else offset << k
            float_bias = self._float_bias_fused
            if self.bias_q is not None and not float_bias:
                add = self.bias_q.clone() if add is None else add + self.bias_q
            if rq is None or not rq.proven:
                return None, add
            return rq.plan(self.acc_max, bias_f=self.bias_f if float_bias else None,
                           pre_shift=k, pre_add=add), add
        return self._cached("epilogue", key, build)

    def _blocks(self, x: Tensor, p: Any) -> tuple[RowBlocks, Any]:
        """(the fast kernel's accumulator as blocks of rows (pixels, out channels), the function
        from the (rows, out channels) result to the output tensor)."""
        raise NotImplementedError

    def _int_repr(self) -> str:
        out = f"kernel={self.kernel} (fast={self.fast_kernel}), acc_bits={self.acc_bits}"
        if self.acc_shift:
            out += f", bias_frac_bits={self.acc_shift}"
        if self.requant is not None:
            out += f", requant=({self.requant.extra_repr()})"
        return out


class _IntConv(IntLayer):
    int_padding: tuple[int, ...]

    def _reference_acc(self, x: Tensor, with_bias: bool) -> Tensor:
        return int_conv(x, self.w_q, self.bias_q if with_bias else None, stride=self.stride,
                        padding=self.int_padding, dilation=self.dilation, groups=self.groups,
                        x_zero_point=self.x_zero_point,
                        w_zero_point=self.w_zp if self.w_zp.numel() > 1 else int(self.w_zp),
                        kernel="reference")

    def _prepare_weights(self, kernel: str) -> Any:
        return prepare_conv(self.w_q, self.w_zp, kernel=kernel, stride=self.stride,
                            padding=self.int_padding, dilation=self.dilation, groups=self.groups,
                            x_qmin=self.x_qmin, x_qmax=self.x_qmax)

    def _fast_acc(self, x: Tensor, prepared: Any, add: Tensor | None = None) -> Tensor:
        return fast_conv(x, prepared, self.x_zero_point, add)

    def _blocks(self, x: Tensor, p: Any) -> tuple[RowBlocks, Any]:
        run = conv_blocks(x, p, self.x_zero_point)
        n = x.shape[0]
        return run, lambda rows: rows_to_output(rows, n, run.out_sizes)

    def extra_repr(self) -> str:
        return nn.Conv2d.extra_repr(self) + ", " + self._int_repr()  # type: ignore[arg-type]


class IntConv1d(_IntConv, nn.Conv1d):
    """Integer Conv1d (see :class:`IntLayer`)."""


class IntConv2d(_IntConv, nn.Conv2d):
    """Integer Conv2d (see :class:`IntLayer`)."""


class IntConv3d(_IntConv, nn.Conv3d):
    """Integer Conv3d (see :class:`IntLayer`)."""


class IntLinear(IntLayer, nn.Linear):
    """Integer Linear (see :class:`IntLayer`); per-channel parameters along the last dim."""

    channel_axis = -1

    def _reference_acc(self, x: Tensor, with_bias: bool) -> Tensor:
        return int_linear(x, self.w_q, self.bias_q if with_bias else None,
                          x_zero_point=self.x_zero_point,
                          w_zero_point=self.w_zp if self.w_zp.numel() > 1 else int(self.w_zp),
                          kernel="reference")

    def _prepare_weights(self, kernel: str) -> Any:
        return prepare_linear(self.w_q, self.w_zp, kernel=kernel, x_qmin=self.x_qmin,
                              x_qmax=self.x_qmax)

    def _fast_acc(self, x: Tensor, prepared: Any, add: Tensor | None = None) -> Tensor:
        return fast_linear(x, prepared, self.x_zero_point, add)

    def _blocks(self, x: Tensor, p: Any) -> tuple[RowBlocks, Any]:
        lead = x.shape[:-1]
        return (linear_blocks(x, p, self.x_zero_point),
                lambda rows: rows.reshape(*lead, rows.shape[-1]))

    def extra_repr(self) -> str:
        return nn.Linear.extra_repr(self) + ", " + self._int_repr()


INT_LAYER_CLASSES: dict[type, type] = {nn.Conv1d: IntConv1d, nn.Conv2d: IntConv2d,
                                       nn.Conv3d: IntConv3d, nn.Linear: IntLinear}


def make_int_layer(layer: nn.Module, **int_params: Any) -> IntLayer:
    """An integer copy of a (fake-quant) conv/linear module sharing its Parameters; the weight
    fake quantizer is dropped."""
    base = next((b for b in type(layer).__mro__ if b in INT_LAYER_CLASSES), None)
    if base is None:
        raise NumericsError(f"{type(layer).__qualname__} is not a conv/linear layer")
    cls = INT_LAYER_CLASSES[base]
    new = cls.__new__(cls)
    state = {}
    for k, v in layer.__dict__.items():
        state[k] = dict(v) if k in ("_parameters", "_buffers", "_modules") else v
    state["_modules"].pop("weight_fake_quant", None)
    for k in [k for k in state if "hook" in k and isinstance(state[k], dict)]:
        state[k] = type(state[k])()
    new.__dict__.update(state)
    new.__dict__.pop("weight_fake_quant", None)
    padding = int_params.pop("int_padding", None)
    new._init_int(**int_params)
    if padding is not None:
        new.int_padding = padding
    return new


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
        from qpasses.numerics.int_sim_math import add_rescale_params
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
            y = scratch_like("add-sum", qs[0], dt).copy_(qs[0])
            for q in qs[1:]:       # same-dtype adds: mixed-dtype in-place adds are slow
                y += scratch_like("add-term", q, dt).copy_(q)
            if c:
                y += c
            y.clamp_(self.qmin, self.qmax)
            return torch.empty_like(qs[0], dtype=self.out_dtype).copy_(y)
        if len(qs) == 2 and self._grid(0)[1] * self._grid(1)[1] <= _MAX_TABLE:
            # two narrow inputs: one exact table lookup per value
            key = (tuple(self.in_scales), tuple(self.in_zero_points), tuple(self.in_max_abs),
                   self.out_scale, self.out_zero_point, self.qmin, self.qmax) + _versions(
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
        if expect.shape != self.factor.shape or not torch.equal(expect, self.factor) or \
                bool((expect * counts != self.lcm).any()):
            raise NumericsError(
                f"int-sim average pool: the window counts for input {tuple(x.shape)} differ from "
                "those the graph was lowered for (the output scale depends on them); lower the "
                "graph again with example inputs of this spatial size")
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
            import pickle
            try:
                pickle.dumps(fn)
            except Exception:  # noqa: BLE001 - any pickling failure
                state.pop("fn")
        return state

    def forward(self, q: Tensor) -> Tensor:
        if self.fast:
            table = self._cached("table", _versions(self.table),
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


# ------------------------------------------------------------------------------------------------
# graph-level helpers


def is_int_sim_graph(gm: torch.fx.GraphModule) -> bool:
    return INT_SIM_META_KEY in gm.meta


def int_sim_modules(gm: torch.fx.GraphModule) -> dict[str, IntSimModule]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, IntSimModule)}


def set_backend(gm: torch.fx.GraphModule, backend: str) -> bool:
    """Switch every integer layer of a lowered graph to ``reference`` or ``fast``; True when
    something changed."""
    if backend not in BACKENDS:
        raise NumericsError(f"unknown int-sim backend {backend!r}; valid: {', '.join(BACKENDS)}")
    changed = False
    for m in gm.modules():
        if isinstance(m, IntLayer):
            k = "reference" if backend == "reference" else m.fast_kernel
            changed |= m.kernel != k
            m.kernel = k
        if isinstance(m, IntSimModule):
            changed |= m.backend != backend
            m.backend = backend
    rec = gm.meta.get(INT_SIM_META_KEY)
    if isinstance(rec, dict):
        rec["backend"] = backend
    return changed


def kernel_table(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """One row per integer layer: module path, kernel in use, fast kernel, bound, widths, why."""
    rows = []
    for name, m in gm.named_modules():
        if isinstance(m, IntLayer):
            rows.append({"layer": name, "kernel": m.kernel, "fast_kernel": m.fast_kernel,
                         "acc_bound": m.acc_bound, "acc_bits": m.acc_bits, "x_bits": m.x_bits,
                         "acc_shift": m.acc_shift,
                         "w_bits": m.w_bits, "reason": m.kernel_reason})
    return rows
