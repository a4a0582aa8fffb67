"""Runtime modules of the integer simulation (the node vocabulary after ``lower-to-int-sim``).

Every tensor between a :class:`Quantize` and a :class:`Dequantize` is an integer tensor of codes
inside the module's declared range ``[qmin, qmax]`` (checked by ``verify-int-sim``): ``int64`` on
the ``reference`` backend, the narrowest dtype holding the declared range on the ``fast`` one
(uint8 / int8 codes, int32 accumulators; conv outputs channels-last in memory). The values are the
same. The arithmetic comes from :mod:`qpasses.numerics` (``fixed_point`` requantization contracts,
``int_ops`` and ``int_conv_fast`` kernels, ``int_sim_math``); these modules only hold parameters
and call it.

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
IntMatMul          matmul of two integer activations (exact accumulator, optional requantize)
IntSoftmax         softmax: exponent table, int64 sum, Q30 division, requantize
IntLayerNorm       LayerNorm: integer mean/variance, exact isqrt, fixed-point γ/β requantize
IntL2Normalize     F.normalize (p=2, any dim): IntLayerNorm's arithmetic, no mean, no affine
=================  ===========================================================================

This module holds the base class, :class:`Quantize`, :class:`Dequantize`, :class:`Requantize` and
the graph-level helpers; the layers are in :mod:`qpasses.modules.int_sim_layers`, the joins, pools,
clamps and tables in :mod:`qpasses.modules.int_sim_ops`, matmul / softmax / LayerNorm in
:mod:`qpasses.modules.int_sim_transformer`.

Shape-only ops (flatten, view/reshape, permute, transpose, squeeze, unsqueeze, contiguous,
getitem, size) stay as ordinary ``call_function`` / ``call_method`` nodes on the integer tensors.
Ops that cannot be lowered run in float between a Dequantize and a Quantize ("float islands",
``QMeta.float_island`` says why).

Backends: every :class:`~qpasses.modules.int_sim_layers.IntLayer` holds ``kernel`` (what runs)
and ``fast_kernel`` (the fastest kernel proven exact for it at lowering); every module holds
``backend``. :func:`set_backend` switches a lowered graph between ``reference`` (int64, the
checked ``fixed_point`` functions) and ``fast``: fused requantization by
:class:`~qpasses.numerics.int_sim_math.RequantPlan` (exact float passes on a proven window),
requantizations of narrow codes by a float32 map checked on every code
(or a table), adds by exact int16 sums or tables, narrow dtypes throughout. Both agree bit for bit:
the fast kernels are exact under the bounds the lowering proved.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from passes_registry import get_record, has_record, set_record

from qpasses.errors import NumericsError
from qpasses.ir.records import INT_SIM_KEY
from qpasses.modules.tensor_keys import tensor_versions
from qpasses.numerics.fixed_point import (ROUNDING_CONTRACTS, channel_view, quantize_multiplier,
                                          requantize, requantize_float)
from qpasses.numerics.int_sim_math import quantize_codes
from qpasses.numerics.native_requant import native_affine, native_lut
from qpasses.numerics.quant_utils import is_compiling
from qpasses.numerics.fast_requant import (AffineFloor, RequantPlan, code_dtype, lut_gather,
                                           requantize_float_fast)

__all__ = [
    "BACKENDS", "MAX_TABLE_ENTRIES", "Dequantize", "IntSimModule", "Quantize",
    "Requantize", "int_sim_modules", "is_int_sim_graph", "set_backend",
]

BACKENDS = ("reference", "fast")
_I64 = torch.int64
# Largest table the fast backend builds for a requantization or a two-input add (entries).
MAX_TABLE_ENTRIES = 2 ** 16


def _scalar_or_vector(values: Sequence[float] | float, dtype: torch.dtype) -> Tensor:
    t = torch.as_tensor(values, dtype=dtype)
    return t.reshape(-1) if t.dim() else t.reshape(1)


class IntSimModule(nn.Module):
    """Base of the integer-simulation modules: ``qmin``/``qmax`` declare the output range;
    ``backend`` is set by :func:`set_backend`."""

    qmin: int
    qmax: int
    produces_float: bool = False
    backend: str = "reference"

    def set_backend(self, backend: str) -> bool:
        """Switch to ``backend``; True when that changed something."""
        changed = self.backend != backend
        self.backend = backend
        return changed

    def declared_range(self) -> tuple[int, int]:
        return int(self.qmin), int(self.qmax)

    @property
    def fast(self) -> bool:
        """On the fast backend, except while tracing (torch.export / torch.compile): the fast
        paths' caches, scratch buffers and prepared weights are eager-only, so a traced program
        runs the reference arithmetic (the same integers, docs/export.md)."""
        return self.backend == "fast" and not is_compiling()

    @property
    def out_dtype(self) -> torch.dtype:
        """int64 on the reference backend, the narrowest dtype of the declared range on fast."""
        return code_dtype(int(self.qmin), int(self.qmax)) if self.fast else _I64

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_cache", None)          # derived constants, rebuilt on first use
        return state

    def _cached(self, name: str, key: tuple, build: Any, reuse: Any = None) -> Any:
        """``build()``, kept until ``key`` changes; ``reuse(kept key)``: whether what is kept
        under another key serves this call as well."""
        cache = self.__dict__.setdefault("_cache", {})
        hit = cache.get(name)
        if hit is None or (hit[0] != key and not (reuse is not None and reuse(hit[0]))):
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

    def cache_key(self) -> tuple:
        """What the cached fast forms (table, affine map, plan) of this module depend on."""
        return tensor_versions(self.multiplier, self.shift, self.scale_f32) + (
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
        return self.reference(codes, None).to(self.out_dtype)

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
            if bias_f is None and self.multiplier.numel() == 1 and 2 * b + 1 <= MAX_TABLE_ENTRIES:
                # narrow input codes: a float32 affine map checked on every code, else a table
                table = self._cached("table", self.cache_key(), self._table)
                affine = self._cached("affine", self.cache_key(), lambda: AffineFloor.fit(
                    torch.arange(self.in_zero_point - b, self.in_zero_point + b + 1),
                    table.to(_I64), float(self.real[0]), self.qmin, self.qmax, self.out_dtype))
                # one compiled pass where it applies (the affine map, else the table)
                out = native_affine(affine, q, self.out_dtype) if affine is not None else \
                    native_lut(table, q, self.in_zero_point - b)
                if out is not None:
                    return out
                if affine is not None:
                    return affine.apply(q, torch.empty_like(q, dtype=self.out_dtype))
                return lut_gather(table, q, self.in_zero_point - b)
            if bias_f is None:
                plan = self._cached("plan", self.cache_key(),
                                    lambda: self.plan(b, pre_add=-self.in_zero_point))
                out = torch.empty_like(q, dtype=self.out_dtype)
                return plan.apply(q, out, axis=-1 if self.axis is None else self.axis,
                                  owned=owned)
            x = q.to(_I64) - self.in_zero_point
            return requantize_float_fast(
                x, channel_view(self.scale_f32, x, self.axis, "scale"), self.out_zero_point,
                self.qmin, self.qmax, channel_view(bias_f, x, self.axis, "bias")
            ).to(self.out_dtype)
        return self.reference(q, bias_f)

    def reference(self, q: Tensor, bias_f: Tensor | None = None) -> Tensor:
        """The requantization on the reference backend (int64, the checked contract functions)."""
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



# ------------------------------------------------------------------------------------------------
# graph-level helpers


def is_int_sim_graph(gm: torch.fx.GraphModule) -> bool:
    """Whether ``gm`` has been lowered (it has the int-sim record)."""
    return has_record(gm, INT_SIM_KEY)


def int_sim_modules(gm: torch.fx.GraphModule) -> dict[str, IntSimModule]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, IntSimModule)}


def set_backend(gm: torch.fx.GraphModule, backend: str) -> bool:
    """Switch every integer-simulation module of a lowered graph (and every integer layer's
    kernel) to ``reference`` or ``fast``, and the int-sim record's ``backend``; True when a module
    changed."""
    if backend not in BACKENDS:
        raise NumericsError(f"unknown int-sim backend {backend!r}; valid: {', '.join(BACKENDS)}")
    changed = False
    for m in gm.modules():
        if isinstance(m, IntSimModule):
            changed |= m.set_backend(backend)
    rec = get_record(gm, INT_SIM_KEY)
    if rec is not None and rec.backend != backend:
        set_record(gm, INT_SIM_KEY, dataclasses.replace(rec, backend=backend))
    return changed
